//! The raw bound: the JetStream work of one 4-step saga with no business logic, done by minimal
//! emulated processes inside the benchmark, each on its own NATS connection.
//!
//! Per saga (the same count of durable operations as a jetsaga saga's critical path):
//! - 1 request publish to `raw.req` (by the load generator, `Nats-Msg-Id: req-<id>`);
//! - the emulated orchestrator pulls it from a durable consumer, writes the state with KV
//!   `create`, publishes command 0 (`Nats-Msg-Id`, PubAck awaited) and acks the request;
//! - each emulated participant pulls its commands from its durable consumer
//!   (`raw.cmd.<service>.>`), publishes the reply (`Nats-Msg-Id`, PubAck awaited), acks;
//! - the orchestrator pulls each reply, writes the state with a revision-checked KV `update`
//!   (the revision travels in the command and back in the reply, so no read is needed), publishes
//!   the next command or, after the fourth, reports the saga finished; acks the reply.
//!
//! That is 9 acked publishes, 5 revision-checked KV writes and 9 acks per saga, on streams and a
//! bucket of its own (work-queue streams, file storage, same consumer settings as jetsaga's), on
//! a fresh server started with the same configuration.

use std::{sync::Arc, time::Duration, time::Instant};

use anyhow::Context as _;
use async_nats::{
    jetstream::{self, consumer, kv, stream},
    HeaderMap,
};
use bytes::Bytes;
use futures::StreamExt;
use jetsaga_common::topology::Settings;
use tokio::{sync::mpsc, task::JoinSet};

use crate::load::{Notice, Notices, Outcome};

pub const REQUEST_SUBJECT: &str = "raw.req";
pub const KV_BUCKET: &str = "raw_sagas";
const STEPS: [(&str, &str); 4] = [
    ("order", "create"),
    ("payment", "deduct"),
    ("inventory", "reserve"),
    ("order", "approve"),
];

/// Sizes of what the emulation writes, so its server work resembles jetsaga's.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Bytes of each KV state write.
    pub state: usize,
    /// Bytes of each command and each reply.
    pub message: usize,
}

fn padded(head: String, size: usize) -> Bytes {
    let mut v = head.into_bytes();
    if v.len() < size {
        v.resize(size, b' ');
    }
    Bytes::from(v)
}

/// The running emulation; dropping it stops its tasks.
pub struct Raw {
    tasks: JoinSet<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn work_queue(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    s: &Settings,
) -> anyhow::Result<()> {
    js.create_or_update_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    })
    .await
    .with_context(|| format!("stream {name}"))?;
    Ok(())
}

async fn durable(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    filter: &str,
    s: &Settings,
) -> anyhow::Result<consumer::PullConsumer> {
    js.create_consumer_on_stream(
        consumer::pull::Config {
            durable_name: Some(name.into()),
            filter_subject: filter.into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: s.ack_wait,
            max_ack_pending: s.max_ack_pending,
            max_deliver: -1,
            ..Default::default()
        },
        stream,
    )
    .await
    .with_context(|| format!("consumer {name}"))
}

async fn connect(url: &str, name: &str) -> anyhow::Result<jetstream::Context> {
    let c = async_nats::ConnectOptions::new()
        .name(name)
        .connect(url)
        .await?;
    Ok(jetstream::new(c))
}

/// Publishes with a message id and waits for the PubAck.
async fn publish(
    js: &jetstream::Context,
    subject: String,
    id: String,
    payload: Bytes,
) -> anyhow::Result<()> {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id.as_str());
    js.publish_with_headers(subject, h, payload).await?.await?;
    Ok(())
}

/// Creates the streams, bucket and consumers, and starts the emulated orchestrator and
/// participants with up to `concurrency` messages in hand per consumer. Returns the emulation
/// and the channel of finished sagas.
pub async fn start(url: &str, concurrency: usize, sizes: Sizes) -> anyhow::Result<(Raw, Notices)> {
    let s = Settings::default();
    let admin = connect(url, "raw-admin").await?;
    work_queue(&admin, "RAW_REQUESTS", REQUEST_SUBJECT, &s).await?;
    work_queue(&admin, "RAW_COMMANDS", "raw.cmd.>", &s).await?;
    work_queue(&admin, "RAW_REPLIES", "raw.reply.>", &s).await?;
    admin
        .create_or_update_key_value(kv::Config {
            bucket: KV_BUCKET.into(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        })
        .await
        .context("bucket")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();

    // The orchestrator: one connection, two consumers, like jetsaga's.
    let ojs = connect(url, "raw-orchestrator").await?;
    let bucket = ojs.get_key_value(KV_BUCKET).await?;
    let state = padded(String::new(), sizes.state);
    let requests = durable(&ojs, "RAW_REQUESTS", "raw-orch-requests", "", &s).await?;
    let replies = durable(&ojs, "RAW_REPLIES", "raw-orch-replies", "", &s).await?;
    let ctx = Arc::new((ojs, bucket, state, sizes));
    {
        let ctx = ctx.clone();
        let msgs = requests
            .stream()
            .max_messages_per_batch(concurrency)
            .messages()
            .await?;
        tasks.spawn(async move {
            msgs.for_each_concurrent(concurrency, |m| {
                let ctx = ctx.clone();
                async move {
                    let Ok(m) = m else { return };
                    let (js, bucket, state, sizes) = &*ctx;
                    let Some(id) = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .and_then(|v| v.as_str().strip_prefix("req-"))
                        .map(str::to_string)
                    else {
                        let _ = m.ack().await;
                        return;
                    };
                    let Ok(rev) = bucket.create(&id, state.clone()).await else {
                        // Exists already (a redelivery) or failed: the saga shows up as lost.
                        let _ = m.ack().await;
                        return;
                    };
                    if send_command(js, &id, 0, rev, sizes.message).await.is_ok() {
                        let _ = m.ack().await;
                    }
                }
            })
            .await
        });
    }
    {
        let ctx = ctx.clone();
        let msgs = replies
            .stream()
            .max_messages_per_batch(concurrency)
            .messages()
            .await?;
        tasks.spawn(async move {
            msgs.for_each_concurrent(concurrency, |m| {
                let (ctx, tx) = (ctx.clone(), tx.clone());
                async move {
                    let Ok(m) = m else { return };
                    let (js, bucket, state, sizes) = &*ctx;
                    let Some((id, step, rev)) = parse(&m.payload) else {
                        let _ = m.ack().await;
                        return;
                    };
                    let Ok(rev) = bucket.update(&id, state.clone(), rev).await else {
                        let _ = m.ack().await; // a stale redelivery: the state moved on
                        return;
                    };
                    if step + 1 < STEPS.len() as u32 {
                        if send_command(js, &id, step + 1, rev, sizes.message)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    } else {
                        let _ = tx.send(Notice {
                            id: id.clone(),
                            outcome: Outcome::Completed,
                            at: Instant::now(),
                        });
                    }
                    let _ = m.ack().await;
                }
            })
            .await
        });
    }

    // The participants: one connection and one durable consumer each.
    for svc in ["order", "payment", "inventory"] {
        let js = connect(url, &format!("raw-{svc}")).await?;
        let c = durable(
            &js,
            "RAW_COMMANDS",
            &format!("raw-svc-{svc}"),
            &format!("raw.cmd.{svc}.>"),
            &s,
        )
        .await?;
        let msgs = c
            .stream()
            .max_messages_per_batch(concurrency)
            .messages()
            .await?;
        let size = sizes.message;
        tasks.spawn(async move {
            msgs.for_each_concurrent(concurrency, |m| {
                let js = js.clone();
                async move {
                    let Ok(m) = m else { return };
                    let Some((id, step, rev)) = parse(&m.payload) else {
                        let _ = m.ack().await;
                        return;
                    };
                    let reply = padded(format!("{id} {step} {rev}"), size);
                    let ok = publish(
                        &js,
                        format!("raw.reply.{svc}"),
                        format!("{id}.{step}.reply"),
                        reply,
                    )
                    .await
                    .is_ok();
                    if ok {
                        let _ = m.ack().await;
                    }
                }
            })
            .await
        });
    }
    // Let the pulls reach the server before the first request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((Raw { tasks }, rx))
}

async fn send_command(
    js: &jetstream::Context,
    id: &str,
    step: u32,
    rev: u64,
    size: usize,
) -> anyhow::Result<()> {
    let (svc, action) = STEPS[step as usize];
    publish(
        js,
        format!("raw.cmd.{svc}.{action}"),
        format!("{id}.{step}.{action}.1"),
        padded(format!("{id} {step} {rev}"), size),
    )
    .await
}

/// `"<id> <step> <revision>"` followed by padding.
fn parse(payload: &[u8]) -> Option<(String, u32, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut it = text.split_whitespace();
    let id = it.next()?.to_string();
    let step = it.next()?.parse().ok()?;
    let rev = it.next()?.parse().ok()?;
    Some((id, step, rev))
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_round_trip() {
        let p = super::padded("o-1 2 17".into(), 64);
        assert_eq!(p.len(), 64);
        assert_eq!(super::parse(&p), Some(("o-1".into(), 2, 17)));
    }
}
