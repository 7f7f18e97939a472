//! Names and configuration of the JetStream streams, consumers and the KV bucket, and the
//! idempotent reconciliation each process runs at start.
//!
//! Every process reconciles what it uses (`create_or_update`), so start order does not matter and a
//! changed setting reaches an existing server. Consumers are created with the "create or update"
//! action: `get_or_create_consumer` would silently keep an old config.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

pub const REQUESTS_STREAM: &str = "JETSAGA_REQUESTS";
pub const COMMANDS_STREAM: &str = "JETSAGA_COMMANDS";
pub const REPLIES_STREAM: &str = "JETSAGA_REPLIES";
pub const EVENTS_STREAM: &str = "JETSAGA_EVENTS";
pub const DLQ_STREAM: &str = "JETSAGA_DLQ";
pub const TIMERS_STREAM: &str = "JETSAGA_TIMERS";
/// Due timers, published by the server from their schedules; what the timers consumer reads.
pub const TIMER_SUBJECTS: &str = "saga.timer.>";
/// Timer schedules (`Nats-Schedule: @at ...`), stored until due, never consumed.
pub const SCHEDULE_SUBJECTS: &str = "saga.sched.>";
pub const OPS_STREAM: &str = "JETSAGA_OPS";
pub const SAGAS_BUCKET: &str = "sagas";

pub const ORCHESTRATOR_REQUESTS_CONSUMER: &str = "orchestrator-requests";
pub const ORCHESTRATOR_REPLIES_CONSUMER: &str = "orchestrator-replies";
pub const ORCHESTRATOR_TIMERS_CONSUMER: &str = "orchestrator-timers";
pub const ORCHESTRATOR_OPS_CONSUMER: &str = "orchestrator-ops";

/// Operator commands for one saga go to `saga.ops.<saga_id>`.
pub fn ops_subject(saga_id: &str) -> String {
    format!("saga.ops.{saga_id}")
}

/// Durable consumer name of a service on the commands stream.
pub fn service_consumer(service: &str) -> String {
    format!("svc-{service}")
}

/// Settings shared by everything the topology creates.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Replicas of every stream and the bucket: 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped by the server.
    pub duplicate_window: Duration,
    /// How long the server waits for an ack before redelivering. After a crash, what the dead
    /// process held comes back only after this, so it must stay well below the step timeouts
    /// (or a healthy step "times out" because its reply sat with a dead process). Handlers take
    /// milliseconds; a slow one is merely redelivered early, which the one rule makes harmless.
    pub ack_wait: Duration,
    /// Unacked messages a consumer hands out at once (the server default of 1000 is implicit;
    /// we set it on purpose).
    pub max_ack_pending: i64,
    /// How long saga lifecycle events are kept.
    pub events_max_age: Duration,
    /// How long dead letters are kept.
    pub dlq_max_age: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(5),
            max_ack_pending: 4096,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reconcile stream {name}: {source}")]
    Stream {
        name: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot reconcile consumer {name} on {stream}: {source}")]
    Consumer {
        stream: String,
        name: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot reconcile bucket {name}: {source}")]
    Bucket {
        name: String,
        #[source]
        source: async_nats::Error,
    },
}

fn work_queue(name: &str, subjects: Vec<String>, s: &Settings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects,
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

fn limits(name: &str, subject: &str, max_age: Duration, s: &Settings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        max_age,
        ..Default::default()
    }
}

async fn reconcile(js: &jetstream::Context, mut cfg: stream::Config) -> Result<(), Error> {
    let name = cfg.name.clone();
    // Per-message TTLs cannot be switched off once on (the server refuses the update), so never
    // ask: an orchestrator whose config lacks them (an older one, during a rollback) still starts.
    if !cfg.allow_message_ttl {
        if let Ok(existing) = js.get_stream(&name).await {
            cfg.allow_message_ttl = existing.cached_info().config.allow_message_ttl;
        }
    }
    js.create_or_update_stream(cfg)
        .await
        .map(|_| ())
        .map_err(|source| Error::Stream { name, source })
}

/// Streams both sides use: commands, replies, dead letters.
pub async fn ensure_shared(js: &jetstream::Context, s: &Settings) -> Result<(), Error> {
    reconcile(
        js,
        work_queue(COMMANDS_STREAM, vec!["saga.cmd.>".into()], s),
    )
    .await?;
    reconcile(
        js,
        work_queue(REPLIES_STREAM, vec!["saga.reply.>".into()], s),
    )
    .await?;
    reconcile(js, limits(DLQ_STREAM, "saga.dlq.>", s.dlq_max_age, s)).await
}

/// What a participant needs before it can consume: the shared streams must exist. Unlike
/// [`ensure_shared`] it never changes an existing stream: the orchestrator owns stream
/// configuration, and under the shipped `nats.conf` a service may only look streams up (it may
/// create one only where its permissions allow, e.g. in tests without the orchestrator).
pub async fn ensure_shared_exist(js: &jetstream::Context, s: &Settings) -> Result<(), Error> {
    let wanted = [
        work_queue(COMMANDS_STREAM, vec!["saga.cmd.>".into()], s),
        work_queue(REPLIES_STREAM, vec!["saga.reply.>".into()], s),
        limits(DLQ_STREAM, "saga.dlq.>", s.dlq_max_age, s),
    ];
    for cfg in wanted {
        if js.get_stream(&cfg.name).await.is_ok() {
            continue;
        }
        let name = cfg.name.clone();
        js.create_stream(cfg)
            .await
            .map(|_| ())
            .map_err(|e| Error::Stream {
                name,
                source: jetstream::context::CreateStreamError::with_source(e.kind(), e),
            })?;
    }
    Ok(())
}

/// Everything the orchestrator owns: the requests stream (one subject per definition trigger),
/// timers, operator commands, events, the `sagas` bucket, plus the shared streams.
pub async fn ensure_orchestrator(
    js: &jetstream::Context,
    s: &Settings,
    triggers: Vec<String>,
) -> Result<kv::Store, Error> {
    ensure_shared(js, s).await?;
    reconcile(js, work_queue(REQUESTS_STREAM, triggers, s)).await?;
    // Timers are message schedules (nats-server 2.12+): the orchestrator stores a schedule on
    // `saga.sched.<timer msg id>` and the server publishes its body to `saga.timer.<saga_id>`
    // when it is due, so the timers consumer sees a timer only once it is due.
    let mut timers = work_queue(
        TIMERS_STREAM,
        vec![TIMER_SUBJECTS.into(), SCHEDULE_SUBJECTS.into()],
        s,
    );
    timers.allow_message_schedules = true;
    // A saga that ends cancels its watchdog by rolling the schedule's subject up into an empty
    // message that expires in a second.
    timers.allow_rollup = true;
    timers.allow_message_ttl = true;
    reconcile(js, timers).await?;
    reconcile(js, work_queue(OPS_STREAM, vec!["saga.ops.>".into()], s)).await?;
    reconcile(
        js,
        limits(EVENTS_STREAM, "saga.events.>", s.events_max_age, s),
    )
    .await?;
    let bucket = kv::Config {
        bucket: SAGAS_BUCKET.to_string(),
        description: "jetsaga saga state, key = saga id".to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        // Lets a write carry its own TTL (`Nats-TTL`): the orchestrator gives terminal sagas a
        // retention so the bucket stays bounded, while running sagas never expire. When a key
        // expires the server leaves a delete marker for this long, so watchers see it go.
        limit_markers: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    js.create_or_update_key_value(bucket)
        .await
        .map_err(|e| Error::Bucket {
            name: SAGAS_BUCKET.into(),
            source: e.into(),
        })
}

/// Creates or updates a durable pull consumer with the settings every jetsaga consumer uses.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: Option<String>,
    s: &Settings,
) -> Result<consumer::PullConsumer, Error> {
    let cfg = consumer::pull::Config {
        durable_name: Some(durable.to_string()),
        filter_subject: filter.unwrap_or_default(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_ack_pending: s.max_ack_pending,
        // Never give up on a message: a dropped reply would strand a saga. Poison messages are
        // terminated explicitly by the handlers instead.
        max_deliver: -1,
        num_replicas: s.replicas,
        ..Default::default()
    };
    js.create_consumer_on_stream(cfg, stream)
        .await
        .map_err(|e| Error::Consumer {
            stream: stream.into(),
            name: durable.into(),
            source: e.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::NatsServer;

    /// A config without per-message TTLs (an older orchestrator's) still reconciles a stream
    /// that has them: the server refuses to switch them off, so reconcile keeps them on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconcile_keeps_message_ttls_that_cannot_be_switched_off() {
        let server = NatsServer::start();
        let client = crate::dev::connect_as(&server.url(), "orchestrator")
            .await
            .unwrap();
        let js = jetstream::new(client);
        let subjects = vec![TIMER_SUBJECTS.into(), SCHEDULE_SUBJECTS.into()];
        let mut cfg = work_queue(TIMERS_STREAM, subjects, &Settings::default());
        cfg.allow_message_ttl = true;
        reconcile(&js, cfg.clone()).await.unwrap();
        cfg.allow_message_ttl = false;
        reconcile(&js, cfg.clone())
            .await
            .expect("an older config reconciles");
        let info = js.get_stream(TIMERS_STREAM).await.unwrap();
        assert!(info.cached_info().config.allow_message_ttl);
        // Where TTLs were never on, they stay off.
        let plain = work_queue(OPS_STREAM, vec!["saga.ops.>".into()], &Settings::default());
        reconcile(&js, plain).await.unwrap();
        let info = js.get_stream(OPS_STREAM).await.unwrap();
        assert!(!info.cached_info().config.allow_message_ttl);
    }
}
