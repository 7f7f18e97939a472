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
#[derive(Debug, Clone, Default)]
pub struct ConnectConfig {
    /// One URL, or several comma-separated (the members of a cluster).
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: Tls,
}

/// TLS settings: a CA to trust (for a server certificate not signed by a public CA) and an
/// optional client certificate. Any of them, or a `tls://` URL, makes TLS required.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

impl Tls {
    /// Reads `NATS_CA_FILE`, `NATS_CERT_FILE` and `NATS_KEY_FILE`.
    pub fn from_env() -> Self {
        Tls {
            ca_file: env("NATS_CA_FILE").map(Into::into),
            cert_file: env("NATS_CERT_FILE").map(Into::into),
            key_file: env("NATS_KEY_FILE").map(Into::into),
        }
    }
}

impl ConnectConfig {
    /// Reads `NATS_URL` (default `nats://127.0.0.1:4222`), `NATS_USER`, `NATS_PASSWORD` and the
    /// TLS variables of [`Tls::from_env`].
    pub fn from_env() -> Self {
        ConnectConfig {
            url: env("NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            user: env("NATS_USER"),
            password: env("NATS_PASSWORD"),
            tls: Tls::from_env(),
        }
    }

    /// Applies credentials and TLS to connect options.
    pub fn apply(&self, mut opts: ConnectOptions) -> ConnectOptions {
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let t = &self.tls;
        if let Some(ca) = &t.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if t.ca_file.is_some() || t.cert_file.is_some() || self.url.starts_with("tls://") {
            opts = opts.require_tls(true);
        }
        opts
    }

    /// The server addresses of `url` (comma-separated).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
        self.url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
            })
    }
}

/// Connects with reconnects forever and every connection event logged. `name` shows up in the
/// server's connection list (`/connz`), which helps when several processes share a server.
pub async fn connect(cfg: &ConnectConfig, name: &str) -> Result<Client, async_nats::ConnectError> {
    let who = name.to_string();
    let opts = ConnectOptions::new()
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
    cfg.apply(opts).connect(cfg.servers()?).await
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
