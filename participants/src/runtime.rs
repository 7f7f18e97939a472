//! The participant runtime: consume a service's commands from JetStream, apply them through the
//! barrier in group-committed SQLite transactions, publish the replies, ack; and answer queries.
//!
//! One batch goes through these stages, in this order, because each one's durability is what
//! makes the next one safe:
//! 1. pull what is ready (up to `batch` commands) from the durable consumer `svc-<service>`;
//! 2. dead-letter what cannot be a command for this service (bad JSON, unknown fields, wrong
//!    service or subject) — never redelivered forever, never crashing the loop;
//! 3. apply the rest in **one** SQLite transaction, a savepoint per command, on a blocking thread
//!    (one fsync per batch instead of one per command);
//! 4. after the commit, publish every reply (awaiting each PubAck, all in flight together) and ack
//!    each command only once its reply is confirmed. A failed commit NAKs the batch; a reply that
//!    cannot be published leaves its command to be redelivered, and the barrier answers it again
//!    with the stored result (same reply message id, so the server drops a repeat).
//!
//! Stage 4 of a batch overlaps with stages 1–3 of the next (up to [`MAX_PUBLISHING_BATCHES`]),
//! which is safe: a command's reply is always derived from committed state.

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::{
    header::HeaderMap,
    jetstream::{
        self,
        consumer::pull::{MessagesErrorKind, Stream as PullStream},
        AckKind,
    },
    Client,
};
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use jetsaga_common::{
    dlq, ids,
    metrics::Readiness,
    nats::{connect, publish},
    otel,
    protocol::{self, Command, Outcome, Reply},
    topology, trace,
};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::{
    barrier::{self, Decision, Handled},
    config::{Config, Faults},
    db,
    metrics::Metrics,
    service::Service,
};

/// Batches whose replies may be publishing while the next batch is applied.
pub const MAX_PUBLISHING_BATCHES: usize = 4;
/// Redelivery delay after a failed commit or an unpublished reply.
const NAK_DELAY: Duration = Duration::from_millis(500);
/// Longest wait at shutdown for replies in flight and for the final flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause before reconciling the topology or re-opening the message stream again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Why the participant could not start. Once running, nothing stops it but the shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid service name {0:?}: use [a-z0-9_-], at most 32 characters")]
    ServiceName(String),
    #[error("cannot prepare the database {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot subscribe to queries: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
}

/// Logs an event about one command with the fields every such line carries.
macro_rules! cmd_event {
    ($level:ident, $cmd:expr, $($rest:tt)+) => {{
        let c: &Command = $cmd;
        tracing::$level!(
            saga_id = %c.saga_id,
            step = c.step,
            service = %c.service,
            op = c.op.as_str(),
            action = %c.action,
            attempt = c.attempt,
            $($rest)+
        )
    }};
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // Business code runs under catch_unwind, so poisoning would only follow a bug in the SDK;
    // the connection itself is still consistent (SQLite rolls back an unfinished transaction).
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the writer, creates the tables and applies the seed.
fn prepare_store<S: Service>(svc: &S, config: &Config) -> rusqlite::Result<Connection> {
    let mut conn = db::open_writer(&config.db, config.synchronous)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    barrier::migrate(&tx)?;
    svc.migrate(&tx)?;
    if let Some(seed) = &config.seed {
        svc.seed(&tx, seed)?;
    }
    tx.commit()?;
    Ok(conn)
}

/// Runs `service` until `shutdown` resolves: then stops pulling, finishes the batch in hand (its
/// replies and acks included), hands back unprocessed prefetched commands and returns.
pub async fn run<S: Service>(
    service: S,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let name = service.name();
    if !ids::validate_name(name) {
        return Err(Error::ServiceName(name.into()));
    }
    let svc = Arc::new(service);
    let config = Arc::new(config);

    let writer = {
        let (svc, cfg) = (svc.clone(), config.clone());
        tokio::task::spawn_blocking(move || prepare_store(&*svc, &cfg))
            .await?
            .map_err(|source| Error::Store {
                path: config.db.clone(),
                source,
            })?
    };
    let writer = Arc::new(Mutex::new(writer));
    let reader = db::open_reader(&config.db).map_err(|source| Error::Store {
        path: config.db.clone(),
        source,
    })?;
    tracing::info!(
        service = name,
        db = %config.db.display(),
        synchronous = config.synchronous.as_sql(),
        batch = config.batch,
        faults = ?config.faults,
        "store ready"
    );
    if config.faults.is_active() {
        tracing::warn!(service = name, faults = ?config.faults, "fault injection is ON");
    }

    let metrics = Metrics::default();
    // Served before connecting: /healthz answers even while NATS is away.
    let ready = match config.metrics_addr {
        Some(addr) => Some(
            jetsaga_common::metrics::serve(addr, metrics.registry())
                .await
                .map_err(Error::Metrics)?
                .1,
        ),
        None => None,
    };
    let client = connect(&config.nats, &format!("jetsaga-{name}")).await?;
    let js = jetstream::new(client.clone());
    if let Some(ready) = ready {
        ready.set(Readiness {
            client: client.clone(),
            streams: vec![
                topology::COMMANDS_STREAM.to_string(),
                topology::REPLIES_STREAM.to_string(),
            ],
        });
    }
    let lag = {
        let (m, js) = (metrics.clone(), js.clone());
        let consumers = vec![(
            topology::COMMANDS_STREAM.to_string(),
            topology::service_consumer(name),
        )];
        tokio::spawn(async move {
            m.common
                .sample_lag(js, consumers, Duration::from_secs(5))
                .await
        })
    };
    let mut shutdown = std::pin::pin!(shutdown);

    let queries = spawn_queries(&client, svc.clone(), reader).await?;

    let worker = Worker {
        svc,
        js,
        writer,
        config: config.clone(),
        metrics,
    };
    let mut publishing: JoinSet<()> = JoinSet::new();
    let mut messages: Option<PullStream> = None;
    loop {
        let stream = match &mut messages {
            Some(s) => s,
            None => {
                let opened = tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    opened = worker.open_stream() => opened,
                };
                match opened {
                    Ok(s) => messages.insert(s),
                    Err(e) => {
                        tracing::warn!(service = name, error = %e, "cannot consume commands yet; retrying");
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(RETRY_PAUSE) => continue,
                        }
                    }
                }
            }
        };
        let first = tokio::select! {
            biased;
            () = &mut shutdown => break,
            next = stream.next() => next,
        };
        let mut batch = match first {
            Some(Ok(msg)) => vec![msg],
            Some(Err(e)) => {
                tracing::warn!(service = name, error = %e, "error while consuming commands");
                if matches!(
                    e.kind(),
                    MessagesErrorKind::ConsumerDeleted
                        | MessagesErrorKind::PushBasedConsumer
                        | MessagesErrorKind::RequestLimitExceeded
                ) {
                    messages = None; // reconcile the consumer and pull again
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => {
                tracing::warn!(service = name, "command stream ended; re-opening it");
                messages = None;
                continue;
            }
        };
        // Group commit: take whatever else is already here, without waiting for more.
        while batch.len() < config.batch {
            match stream.next().now_or_never() {
                Some(Some(Ok(msg))) => batch.push(msg),
                Some(Some(Err(e))) => {
                    tracing::warn!(service = name, error = %e, "error while consuming commands");
                    break;
                }
                Some(None) => {
                    messages = None;
                    break;
                }
                None => break,
            }
        }
        while publishing.len() >= MAX_PUBLISHING_BATCHES {
            publishing.join_next().await;
        }
        let received = std::time::SystemTime::now();
        if let Some(replies) = worker.process(batch).await {
            publishing.spawn(publish_and_ack(worker.js.clone(), replies, received));
        }
    }

    tracing::info!(service = name, "shutting down: finishing replies in flight");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while publishing.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Safe to give up: the unacked commands are redelivered and answered from the barrier.
        tracing::warn!(
            service = name,
            "replies still unconfirmed at shutdown; their commands will be redelivered"
        );
        publishing.abort_all();
    }
    // Hand back what was prefetched but not processed, so it is redelivered now rather than
    // after the ack wait.
    if let Some(stream) = &mut messages {
        while let Some(Some(Ok(msg))) = stream.next().now_or_never() {
            if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(service = name, error = %e, "cannot hand back a prefetched command");
            }
        }
    }
    queries.abort();
    lag.abort();
    // `ack()` only queues the ack on the connection: flush before the client goes away.
    match tokio::time::timeout(SHUTDOWN_GRACE, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(service = name, error = %e, "cannot flush the connection at shutdown")
        }
        Err(_) => tracing::warn!(service = name, "connection flush timed out at shutdown"),
    }
    tracing::info!(service = name, "stopped");
    Ok(())
}

/// What processes batches: the service, the writer connection, JetStream.
struct Worker<S> {
    svc: Arc<S>,
    js: jetstream::Context,
    writer: Arc<Mutex<Connection>>,
    config: Arc<Config>,
    metrics: Metrics,
}

impl<S: Service> Worker<S> {
    /// Reconciles the shared streams and this service's durable consumer, then starts pulling.
    async fn open_stream(&self) -> Result<PullStream, String> {
        let name = self.svc.name();
        let settings = &self.config.topology;
        topology::ensure_shared_exist(&self.js, settings)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = topology::ensure_consumer(
            &self.js,
            topology::COMMANDS_STREAM,
            &topology::service_consumer(name),
            Some(protocol::command_filter(name)),
            settings,
        )
        .await
        .map_err(|e| e.to_string())?;
        let stream = consumer
            .stream()
            .max_messages_per_batch(self.config.batch)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            service = name,
            consumer = %topology::service_consumer(name),
            filter = %protocol::command_filter(name),
            "consuming commands"
        );
        Ok(stream)
    }

    /// Parses, dead-letters and applies one batch. Returns the replies to publish, or `None` if
    /// there is nothing to publish (all dead-lettered, or the commit failed and the batch was
    /// NAKed).
    async fn process(
        &self,
        batch: Vec<jetstream::Message>,
    ) -> Option<Vec<(jetstream::Message, Reply)>> {
        let name = self.svc.name();
        let mut msgs = Vec::with_capacity(batch.len());
        let mut cmds = Vec::with_capacity(batch.len());
        let consumer = topology::service_consumer(name);
        for msg in batch {
            self.metrics.common.note_delivery(&consumer, &msg);
            match parse(name, &msg) {
                Ok(cmd) => {
                    msgs.push(msg);
                    cmds.push(cmd);
                }
                Err(reason) => {
                    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                    tracing::warn!(service = name, subject = %msg.subject, seq, %reason, "refused a command; dead-lettering it");
                    match dlq::dead_letter(&self.js, "command", &msg, &reason).await {
                        Ok(()) => {
                            self.metrics
                                .common
                                .dead_letters
                                .get_or_create(&jetsaga_common::metrics::labels(&[(
                                    "source", "command",
                                )]))
                                .inc();
                        }
                        Err(e) => {
                            tracing::error!(service = name, subject = %msg.subject, seq, error = %e, "cannot dead-letter; it will be redelivered");
                        }
                    }
                }
            }
        }
        if cmds.is_empty() {
            return None;
        }
        if !self.config.faults.delay.is_zero() {
            tokio::time::sleep(self.config.faults.delay).await;
        }

        let started = std::time::Instant::now();
        let (svc, writer, config) = (self.svc.clone(), self.writer.clone(), self.config.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let result = apply_batch(&mut lock(&writer), &*svc, &cmds, &config.faults);
            (cmds, result)
        })
        .await;
        let (cmds, handled) = match joined {
            Ok((cmds, Ok(handled))) => (cmds, handled),
            Ok((cmds, Err(e))) => {
                for cmd in &cmds {
                    cmd_event!(error, cmd, error = %e, "batch transaction failed; command will be redelivered");
                }
                nak_all(&msgs).await;
                return None;
            }
            Err(e) => {
                tracing::error!(service = name, error = %e, "batch task failed; commands will be redelivered");
                nak_all(&msgs).await;
                return None;
            }
        };
        tracing::debug!(service = name, commands = cmds.len(), "batch committed");
        self.metrics.batch_size.observe(cmds.len() as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        for (cmd, h) in cmds.iter().zip(&handled) {
            log_handled(cmd, h);
            let outcome = h.reply.outcome.as_str();
            self.metrics.command(
                name,
                &cmd.action,
                cmd.op.as_str(),
                h.decision.as_str(),
                outcome,
            );
        }
        Some(
            msgs.into_iter()
                .zip(handled.into_iter().map(|h| h.reply))
                .collect(),
        )
    }
}

/// Applies `cmds` in one immediate transaction, a savepoint each, and commits once.
fn apply_batch<S: Service>(
    conn: &mut Connection,
    svc: &S,
    cmds: &[Command],
    faults: &Faults,
) -> rusqlite::Result<Vec<Handled>> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let handled = cmds
        .iter()
        .map(|cmd| {
            // Injected faults are decided before the barrier runs, so they record nothing and
            // change no business row: exactly a technical failure that rolled back.
            match faults.injected(cmd) {
                Some(reason) => Handled {
                    reply: Reply::to(cmd, Outcome::RetryableFailure, Some(reason.into()), None),
                    decision: Decision::Failed,
                },
                None => barrier::apply(&mut tx, svc, cmd),
            }
        })
        .collect();
    tx.commit()?;
    Ok(handled)
}

fn log_handled(cmd: &Command, h: &Handled) {
    let decision = h.decision.as_str();
    let outcome = format!("{:?}", h.reply.outcome);
    let error = h.reply.error.as_deref().unwrap_or("");
    match (h.decision, h.reply.outcome) {
        (Decision::Failed, _) => cmd_event!(
            warn,
            cmd,
            decision,
            outcome,
            error,
            "command failed; nothing recorded"
        ),
        (Decision::Ran, Outcome::Success) | (Decision::Duplicate, _) => {
            cmd_event!(debug, cmd, decision, outcome, error, "command handled")
        }
        _ => cmd_event!(info, cmd, decision, outcome, error, "command handled"),
    }
}

/// Checks that `msg` is a command this service should run.
fn parse(service: &str, msg: &jetstream::Message) -> Result<Command, String> {
    let cmd: Command =
        serde_json::from_slice(&msg.payload).map_err(|e| format!("not a command: {e}"))?;
    if cmd.service != service {
        return Err(format!(
            "command for service {:?} reached service {service:?}",
            cmd.service
        ));
    }
    if !ids::validate_name(&cmd.action) {
        return Err(format!("invalid action name {:?}", cmd.action));
    }
    if msg.subject.as_str() != cmd.subject() {
        return Err(format!(
            "command for {} arrived on {}",
            cmd.subject(),
            msg.subject
        ));
    }
    ids::validate(&cmd.saga_id).map_err(|e| format!("invalid saga_id: {e}"))?;
    Ok(cmd)
}

async fn nak_all(msgs: &[jetstream::Message]) {
    for msg in msgs {
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(NAK_DELAY))).await {
            tracing::warn!(subject = %msg.subject, error = %e, "cannot NAK; the command comes back after the ack wait");
        }
    }
}

/// Publishes every reply concurrently and acks each command once its reply is confirmed.
async fn publish_and_ack(
    js: jetstream::Context,
    replies: Vec<(jetstream::Message, Reply)>,
    received: std::time::SystemTime,
) {
    let mut pending: FuturesUnordered<_> = replies
        .into_iter()
        .map(|(msg, reply)| {
            let js = js.clone();
            async move {
                let payload = match serde_json::to_vec(&reply) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(saga_id = %reply.saga_id, step = reply.step, error = %e, "cannot encode a reply");
                        return;
                    }
                };
                // The reply continues the command's trace (W3C traceparent), with its own span.
                let mut headers = HeaderMap::new();
                let parent = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(trace::TRACEPARENT))
                    .map(|v| v.as_str().to_string());
                let trace = parent.as_deref().and_then(trace::trace_id).map(str::to_string);
                if let Some(t) = &trace {
                    let span = trace::span_id(&reply.msg_id());
                    headers.insert(trace::TRACEPARENT, trace::traceparent(t, &span).as_str());
                }
                match publish(&js, reply.subject(), &reply.msg_id(), headers, payload.into()).await {
                    Ok(_) => {
                        if let (Some(t), Some(p)) = (&trace, parent.as_deref()) {
                            export_span(&msg, &reply, t, p, received);
                        }
                        if let Err(e) = msg.ack().await {
                            tracing::warn!(saga_id = %reply.saga_id, step = reply.step, service = %reply.service, op = reply.op.as_str(), attempt = reply.attempt, error = %e, "cannot ack a command; it will be redelivered and answered again");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(saga_id = %reply.saga_id, step = reply.step, service = %reply.service, op = reply.op.as_str(), attempt = reply.attempt, error = %e, "cannot publish a reply; the command will be redelivered");
                        let _ = msg.ack_with(AckKind::Nak(Some(NAK_DELAY))).await;
                    }
                }
            }
        })
        .collect();
    while pending.next().await.is_some() {}
}

/// The OpenTelemetry span of one handled command (when export is on): the child of the
/// orchestrator's span for the attempt (the command's `traceparent`) and the parent of the
/// reply's, from the batch's arrival to the reply's confirmation.
fn export_span(
    msg: &jetstream::Message,
    reply: &Reply,
    trace_id: &str,
    traceparent: &str,
    received: std::time::SystemTime,
) {
    if !otel::enabled() {
        return;
    }
    let Some(parent) = trace::parent_span_id(traceparent) else {
        return;
    };
    let outcome = reply.outcome.as_str();
    let mut span = otel::Span::new(
        format!("process {}", msg.subject),
        otel::Kind::Consumer,
        trace_id,
        &trace::span_id(&reply.msg_id()),
    )
    .attr("saga.id", reply.saga_id.clone())
    .attr("saga.op", reply.op.as_str())
    .attr("saga.outcome", outcome)
    .attr("service", reply.service.clone())
    .attr("messaging.system", "nats")
    .attr("messaging.destination.name", msg.subject.to_string())
    .int("saga.step", reply.step as i64)
    .int("saga.attempt", reply.attempt as i64);
    if let Some(id) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
    {
        span = span.attr("messaging.message.id", id.as_str().to_string());
    }
    span.parent_span_id = Some(parent.to_string());
    span.parent_remote = true;
    span.start = received;
    span.end = std::time::SystemTime::now();
    span.error = (reply.outcome != Outcome::Success)
        .then(|| reply.error.clone().unwrap_or_else(|| "failed".into()));
    otel::export(span);
}

/// Answers `jetsaga.query.<service>.<what>` (queue group `svc-<service>`) from a read-only
/// connection. Besides the service's own queries, every service answers `barrier` (its barrier
/// rows, optionally `{"saga_id": ...}`) and `queries` (the list of query names).
async fn spawn_queries<S: Service>(
    client: &Client,
    svc: Arc<S>,
    reader: Connection,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let name = svc.name();
    let subject = protocol::query_subject(name, ">");
    let prefix = protocol::query_subject(name, "");
    let mut sub = client
        .queue_subscribe(subject, topology::service_consumer(name))
        .await?;
    let reader = Arc::new(Mutex::new(reader));
    let client = client.clone();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            let what = msg
                .subject
                .as_str()
                .strip_prefix(&prefix)
                .unwrap_or_default()
                .to_string();
            let req: Result<Value, String> = if msg.payload.iter().all(u8::is_ascii_whitespace) {
                Ok(json!({}))
            } else {
                serde_json::from_slice(&msg.payload)
                    .map_err(|e| format!("request is not JSON: {e}"))
            };
            let (svc, reader) = (svc.clone(), reader.clone());
            let answer = tokio::task::spawn_blocking(move || match req {
                Ok(req) => answer_query(&*svc, &lock(&reader), &what, &req),
                Err(e) => json!({ "error": e }),
            })
            .await
            .unwrap_or_else(|e| json!({ "error": format!("query failed: {e}") }));
            let mut body = serde_json::to_vec(&answer).unwrap_or_else(|_| b"{}".to_vec());
            // An answer the server would refuse is replaced by an error the asker can read
            // (otherwise the asker only sees a timeout).
            let limit = client.server_info().max_payload;
            if limit > 0 && body.len() + 512 > limit {
                body = serde_json::to_vec(&json!({
                    "error": format!("answer too large: {} bytes, the server allows {limit}", body.len())
                }))
                .unwrap_or_default();
            }
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(service = name, error = %e, "cannot answer a query");
            }
        }
    }))
}

fn answer_query<S: Service>(svc: &S, conn: &Connection, what: &str, req: &Value) -> Value {
    let result = match what {
        "barrier" => {
            let saga_id = req.get("saga_id").and_then(Value::as_str);
            barrier::records(conn, saga_id)
                .map(|rows| json!({ "rows": rows.iter().map(barrier::Record::to_json).collect::<Vec<_>>() }))
                .map_err(|e| format!("storage: {e}"))
        }
        "queries" => {
            let mut names: Vec<&str> = svc.queries().to_vec();
            names.extend(["barrier", "queries"]);
            Ok(json!({ "queries": names }))
        }
        what if svc.queries().contains(&what) => svc.query(conn, what, req),
        other => Err(format!(
            "unknown query {other:?}; {} answers {:?} plus \"barrier\" and \"queries\"",
            svc.name(),
            svc.queries()
        )),
    };
    result.unwrap_or_else(|e| json!({ "error": e }))
}
