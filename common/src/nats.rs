//! Connecting to NATS and publishing durably.
//!
//! Two things NATS does not surface through its API are handled here once: server errors (a
//! permission violation looks like a timeout to the caller; its reason only arrives as an event)
//! are logged, and a JetStream publish that meets a leader election (503 "no responders") or a
//! timeout is retried with the *same* `Nats-Msg-Id`, so the retry cannot double-write.

use std::time::Duration;

use async_nats::{
    header::HeaderMap,
    jetstream::{
        self,
        context::{PublishError, PublishErrorKind},
        publish::PublishAck,
    },
    Client, ConnectOptions, Event,
};
use bytes::Bytes;

use crate::protocol::MSG_ID;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl ConnectConfig {
    /// Reads `NATS_URL` (default `nats://127.0.0.1:4222`), `NATS_USER` and `NATS_PASSWORD`.
    pub fn from_env() -> Self {
        ConnectConfig {
            url: std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            user: std::env::var("NATS_USER").ok().filter(|s| !s.is_empty()),
            password: std::env::var("NATS_PASSWORD")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Connects with reconnects forever and every connection event logged. `name` shows up in the
/// server's connection list (`/connz`), which helps when several processes share a server.
pub async fn connect(cfg: &ConnectConfig, name: &str) -> Result<Client, async_nats::ConnectError> {
    let who = name.to_string();
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let who = who.clone();
            async move {
                match event {
                    Event::ServerError(err) => {
                        tracing::error!(process = %who, error = %err, "nats server error")
                    }
                    Event::ClientError(err) => {
                        tracing::warn!(process = %who, error = %err, "nats client error")
                    }
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(process = %who, sid, "nats slow consumer")
                    }
                    other => tracing::info!(process = %who, event = %other, "nats connection"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    opts.connect(&cfg.url).await
}

/// How long [`publish`] keeps retrying a publish the server did not confirm.
pub const PUBLISH_RETRY_BUDGET: Duration = Duration::from_secs(60);

fn retryable(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::StreamNotFound
            | PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
    )
}

/// Publishes to JetStream with `msg_id` as `Nats-Msg-Id` and waits for the PubAck, retrying
/// transient failures with the same id (so a retry after a lost ack is deduplicated by the server).
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    mut headers: HeaderMap,
    payload: Bytes,
) -> Result<PublishAck, PublishError> {
    headers.insert(MSG_ID, msg_id);
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(25);
    loop {
        let attempt = async {
            js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .await
        };
        match attempt.await {
            Ok(ack) => return Ok(ack),
            Err(err) if retryable(err.kind()) && started.elapsed() < PUBLISH_RETRY_BUDGET => {
                tracing::warn!(%subject, msg_id, error = %err, "publish not confirmed; retrying with the same message id");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(err) => return Err(err),
        }
    }
}
