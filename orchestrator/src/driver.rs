//! The driver: feeds JetStream inputs to the pure engine under the one rule (DESIGN.md §4).
//!
//! For every input (request, reply, timer, operator command):
//! 1. load the saga from KV (value + revision);
//! 2. if the input was already applied, skip to 4 (only republishing if it is the input that
//!    produced the current state, i.e. its earlier run may have crashed before publishing);
//! 3. compute the transition and write it with a revision-checked update (conflict: reload, retry);
//! 4. publish the commands/timers/events the state implies, awaiting every PubAck;
//! 5. ack the input.
//!
//! A crash anywhere leaves the input unacked; its redelivery finishes the job. No task or memory is
//! held per saga: a waiting saga is a KV entry and, at most, a timer message.

use std::{collections::HashMap, future::Future, path::PathBuf, sync::Arc, time::Duration};

use async_nats::{
    header::HeaderMap,
    jetstream::{
        self,
        consumer::PullConsumer,
        context::{PublishError, PublishErrorKind},
        kv::{self, CreateErrorKind},
        AckKind, Message,
    },
};
use bytes::Bytes;
use futures::{future::try_join_all, StreamExt};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    definition::{self, Definition, Registry},
    engine::{self, Effects, Input, Operator, Timer, Transition},
    metrics::Metrics,
    spans,
    state::SagaState,
};
use jetsaga_common::{
    dlq,
    metrics::Readiness,
    nats::{self as jsnats, ConnectConfig},
    otel,
    protocol::{Op, Reply},
    time::now_ms,
    topology::{self, Settings},
    trace,
};

/// Orchestrator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: ConnectConfig,
    /// Definition files; empty means the built-in order saga.
    pub definitions: Vec<PathBuf>,
    pub settings: Settings,
    /// Inputs handled at once per consumer.
    pub concurrency: usize,
    /// Connection name, shown by the server.
    pub name: String,
    /// Most sagas whose last written state is kept in memory (see [`StateCache`]).
    pub cache_size: usize,
    /// How long a completed or compensated saga stays in the bucket (`None`: forever). After it
    /// expires, a request with the same id would start a new saga.
    pub terminal_retention: Option<Duration>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Also publish step-level events (`step_succeeded`, `step_compensated`, `step_retrying`).
    pub step_events: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: ConnectConfig::from_env(),
            definitions: Vec::new(),
            settings: Settings::default(),
            concurrency: 256,
            name: "jetsaga-orchestrator".into(),
            cache_size: 100_000,
            terminal_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            metrics_addr: None,
            step_events: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Definition(#[from] definition::Error),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error(transparent)]
    Topology(#[from] topology::Error),
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
    #[error("consumer {name}: {source}")]
    Consume {
        name: String,
        #[source]
        source: async_nats::Error,
    },
}

/// Why an input was not handled.
#[derive(Debug)]
enum Fail {
    /// It can never be handled: dead-letter it with this reason.
    Bad(String),
    /// Try again later (NATS trouble); the message is NAKed with a delay.
    Transient(String),
}

fn transient(e: impl std::fmt::Display) -> Fail {
    Fail::Transient(e.to_string())
}

/// Shared by every handler task.
struct Ctx {
    js: jetstream::Context,
    kv: kv::Store,
    registry: Registry,
    cache: StateCache,
    terminal_retention: Option<Duration>,
    metrics: Metrics,
    step_events: bool,
}

/// Runs the orchestrator until `shutdown` resolves, then finishes the inputs in hand and returns.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let registry = Registry::load(&cfg.definitions)?;
    let metrics = Metrics::default();
    // Serve /healthz before connecting: the process is up even while NATS is not.
    let ready = match cfg.metrics_addr {
        Some(addr) => Some(
            jetsaga_common::metrics::serve(addr, metrics.registry())
                .await
                .map_err(Error::Metrics)?
                .1,
        ),
        None => None,
    };
    let client = jsnats::connect(&cfg.nats, &cfg.name).await?;
    let js = jetstream::new(client.clone());
    let mut shutdown = std::pin::pin!(shutdown);
    // Reconciling streams can time out transiently (a leader election; two instances creating
    // the same replicated stream at once): keep trying until it works or we are told to stop.
    let mut pause = Duration::from_millis(500);
    let (kv, pulls) = loop {
        match reconcile(&js, &cfg, &registry).await {
            Ok(done) => break done,
            Err(e) => {
                warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot set up streams and consumers yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = &mut shutdown => return Ok(()),
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    };
    info!(
        definitions = ?registry.triggers(),
        concurrency = cfg.concurrency,
        "orchestrator ready"
    );
    let ctx = Arc::new(Ctx {
        js,
        kv,
        registry,
        cache: StateCache::new(cfg.cache_size),
        terminal_retention: cfg.terminal_retention,
        metrics: metrics.clone(),
        step_events: cfg.step_events,
    });
    if let Some(ready) = ready {
        ready.set(Readiness {
            client: client.clone(),
            streams: [
                topology::REQUESTS_STREAM,
                topology::COMMANDS_STREAM,
                topology::REPLIES_STREAM,
                topology::TIMERS_STREAM,
                topology::OPS_STREAM,
            ]
            .map(String::from)
            .to_vec(),
        });
    }
    let lag = {
        let m = metrics.clone();
        let js = ctx.js.clone();
        let consumers = vec![
            (
                topology::REQUESTS_STREAM,
                topology::ORCHESTRATOR_REQUESTS_CONSUMER,
            ),
            (
                topology::REPLIES_STREAM,
                topology::ORCHESTRATOR_REPLIES_CONSUMER,
            ),
            (
                topology::TIMERS_STREAM,
                topology::ORCHESTRATOR_TIMERS_CONSUMER,
            ),
            (topology::OPS_STREAM, topology::ORCHESTRATOR_OPS_CONSUMER),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let c = ctx.clone();
        tokio::spawn(async move {
            let sample = m.common.sample_lag(js, consumers, Duration::from_secs(5));
            let cached = async {
                loop {
                    m.waiting_sagas_cached.set(c.cache.len() as i64);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            tokio::join!(sample, cached);
        })
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (durable, consumer) in pulls {
        let ctx = ctx.clone();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(consume(
            ctx,
            durable,
            consumer,
            cfg.concurrency,
            stop,
        )));
    }
    shutdown.await;
    info!("shutting down: finishing inputs in hand");
    let _ = stop_tx.send(true);
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "consumer loop ended with an error"),
            Err(e) => error!(error = %e, "consumer task panicked"),
        }
    }
    lag.abort();
    let _ = client.flush().await;
    info!("orchestrator stopped");
    Ok(())
}

/// Creates or updates everything the orchestrator uses; returns the bucket and its consumers.
async fn reconcile(
    js: &jetstream::Context,
    cfg: &Config,
    registry: &Registry,
) -> Result<(kv::Store, Vec<(&'static str, PullConsumer)>), Error> {
    let kv = topology::ensure_orchestrator(js, &cfg.settings, registry.triggers()).await?;
    let s = &cfg.settings;
    let consumers = [
        (
            topology::REQUESTS_STREAM,
            topology::ORCHESTRATOR_REQUESTS_CONSUMER,
            s.clone(),
        ),
        (
            topology::REPLIES_STREAM,
            topology::ORCHESTRATOR_REPLIES_CONSUMER,
            s.clone(),
        ),
        // A timer that arrives early (a schedule fires up to ~0.25 s late, never early, but a
        // timer written by an older version is delivered at once) is NAKed with a delay until
        // due, so this consumer gets more room.
        (
            topology::TIMERS_STREAM,
            topology::ORCHESTRATOR_TIMERS_CONSUMER,
            Settings {
                max_ack_pending: 1_000_000,
                ..s.clone()
            },
        ),
        (
            topology::OPS_STREAM,
            topology::ORCHESTRATOR_OPS_CONSUMER,
            s.clone(),
        ),
    ];
    let mut pulls = Vec::new();
    for (stream, durable, settings) in consumers {
        // The timers consumer reads due timers only, never the schedules that produce them
        // (acking a schedule in a work queue would delete it).
        let filter = (stream == topology::TIMERS_STREAM).then(|| topology::TIMER_SUBJECTS.into());
        let c = topology::ensure_consumer(js, stream, durable, filter, &settings).await?;
        pulls.push((durable, c));
    }
    Ok((kv, pulls))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Pulls from one durable consumer and handles up to `concurrency` messages at once, forever
/// (re-opening the pull after errors) or until stopped.
async fn consume(
    ctx: Arc<Ctx>,
    durable: &'static str,
    consumer: PullConsumer,
    concurrency: usize,
    stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    while !*stop.borrow() {
        let messages = match consumer
            .stream()
            .max_messages_per_batch(concurrency.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                warn!(consumer = durable, error = %e, "cannot open pull; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopped(stop.clone()) => break,
                }
            }
        };
        messages
            .take_until(stopped(stop.clone()))
            .for_each_concurrent(concurrency.max(1), |m| {
                let ctx = ctx.clone();
                async move {
                    match m {
                        Ok(msg) => handle(&ctx, durable, msg).await,
                        Err(e) => warn!(consumer = durable, error = %e, "pull error"),
                    }
                }
            })
            .await;
    }
    Ok(())
}

/// Handles one message and settles it: ack, dead-letter + term, or NAK with a delay.
async fn handle(ctx: &Ctx, durable: &'static str, msg: Message) {
    ctx.metrics.common.note_delivery(durable, &msg);
    ctx.metrics.inputs_in_hand.inc();
    let result = match durable {
        topology::ORCHESTRATOR_REQUESTS_CONSUMER => on_request(ctx, &msg).await,
        topology::ORCHESTRATOR_REPLIES_CONSUMER => on_reply(ctx, &msg).await,
        topology::ORCHESTRATOR_TIMERS_CONSUMER => on_timer(ctx, &msg).await,
        _ => on_operator(ctx, &msg).await,
    };
    match result {
        Ok(Settle::Ack) => {
            if let Err(e) = msg.ack().await {
                warn!(subject = %msg.subject, error = %e, "ack failed; the input will be redelivered");
            }
        }
        Ok(Settle::Later(delay)) => {
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
        Err(Fail::Bad(reason)) => {
            let kind = durable.trim_start_matches("orchestrator-");
            warn!(subject = %msg.subject, %reason, "input refused; dead-lettering it");
            match dlq::dead_letter(&ctx.js, kind, &msg, &reason).await {
                Ok(()) => {
                    ctx.metrics
                        .common
                        .dead_letters
                        .get_or_create(&jetsaga_common::metrics::labels(&[("source", kind)]))
                        .inc();
                }
                Err(e) => {
                    error!(subject = %msg.subject, error = %e, "cannot dead-letter; it will be redelivered")
                }
            }
        }
        Err(Fail::Transient(reason)) => {
            warn!(subject = %msg.subject, %reason, "input not handled now; retrying in 1s");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
    ctx.metrics.inputs_in_hand.dec();
}

/// How a handled input is settled.
enum Settle {
    Ack,
    /// Not due yet: hand it back for this long (a timer).
    Later(Duration),
}

fn stream_seq(msg: &Message) -> u64 {
    msg.info().map(|i| i.stream_sequence).unwrap_or(0)
}

async fn on_request(ctx: &Ctx, msg: &Message) -> Result<Settle, Fail> {
    let def = ctx
        .registry
        .by_trigger(msg.subject.as_str())
        .ok_or_else(|| {
            Fail::Bad(format!(
                "no saga definition is triggered by {}",
                msg.subject
            ))
        })?;
    let (saga_id, input) = validate_request(def, &msg.payload).map_err(Fail::Bad)?;
    let seq = stream_seq(msg);
    let mut state = engine::start(def, &saga_id, input, seq, now_ms());
    let incoming = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(trace::TRACEPARENT))
        .map(|v| v.as_str());
    state.trace_id = Some(
        incoming
            .and_then(trace::trace_id)
            .map_or_else(trace::new_trace_id, str::to_string),
    );
    state.parent_span_id = incoming.and_then(trace::parent_span_id).map(str::to_string);
    match ctx.kv.create(&saga_id, to_bytes(&state)).await {
        Ok(revision) => {
            info!(saga_id = %saga_id, kind = %def.kind, step = %state.steps[0].name, service = %state.steps[0].service, trace_id = state.trace_id.as_deref().unwrap_or("-"), "saga started");
            ctx.metrics.saga_event(&def.kind, "started");
            let fx = engine::effects(&state);
            ctx.cache.put(&saga_id, Arc::new(state), revision);
            publish_effects(ctx, &fx).await?;
        }
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let (existing, _) = load(ctx, &saga_id).await?.ok_or_else(|| {
                Fail::Transient(format!("saga {saga_id} exists but cannot be read"))
            })?;
            if existing.request_seq == seq {
                // Our own earlier attempt created it and may have crashed before publishing.
                publish_effects(ctx, &engine::effects(&existing)).await?;
            } else {
                info!(
                    saga_id = %saga_id, kind = %def.kind, status = existing.status.as_str(),
                    "request for a saga that already exists; starting nothing"
                );
            }
        }
        Err(e) => return Err(transient(e)),
    }
    Ok(Settle::Ack)
}

/// Checks a request against its definition and returns the saga id and the stored input (the
/// request plus derived fields). The error is the dead-letter reason.
pub fn validate_request(def: &Definition, payload: &[u8]) -> Result<(String, Value), String> {
    if payload.len() > def.max_request_bytes {
        return Err(format!(
            "payload is {} bytes; at most {} are accepted",
            payload.len(),
            def.max_request_bytes
        ));
    }
    let mut value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    def.input
        .validate(&value)
        .map_err(|e| format!("invalid request: {e}"))?;
    let saga_id = value[&def.key]
        .as_str()
        .ok_or_else(|| format!("invalid request: {} must be a string", def.key))?
        .to_string();
    for d in &def.derive {
        let v = d
            .compute(&value)
            .map_err(|e| format!("invalid request: {e}"))?;
        value[&d.name] = v;
    }
    Ok((saga_id, value))
}

async fn on_reply(ctx: &Ctx, msg: &Message) -> Result<Settle, Fail> {
    let reply: Reply = serde_json::from_slice(&msg.payload)
        .map_err(|e| Fail::Bad(format!("reply is not a valid reply: {e}")))?;
    let id = reply.saga_id.clone();
    let input = Input::Reply(reply);
    let input_id = input.id(0);
    apply_input(ctx, &id, input, &input_id).await?;
    Ok(Settle::Ack)
}

async fn on_timer(ctx: &Ctx, msg: &Message) -> Result<Settle, Fail> {
    let timer: Timer = serde_json::from_slice(&msg.payload)
        .map_err(|e| Fail::Bad(format!("timer is not a valid timer: {e}")))?;
    let now = now_ms();
    if timer.due_ms > now {
        return Ok(Settle::Later(Duration::from_millis(timer.due_ms - now)));
    }
    let id = timer.saga_id.clone();
    let input = Input::Timer(timer);
    let input_id = input.id(0);
    apply_input(ctx, &id, input, &input_id).await?;
    Ok(Settle::Ack)
}

async fn on_operator(ctx: &Ctx, msg: &Message) -> Result<Settle, Fail> {
    let saga_id = msg
        .subject
        .strip_prefix("saga.ops.")
        .filter(|id| jetsaga_common::ids::validate(id).is_ok())
        .ok_or_else(|| Fail::Bad(format!("{} is not saga.ops.<saga_id>", msg.subject)))?
        .to_string();
    let op: Operator = serde_json::from_slice(&msg.payload).map_err(|e| {
        Fail::Bad(format!(
            "operator command is not valid (want {{\"command\":\"abort\"|\"retry\"}}): {e}"
        ))
    })?;
    info!(saga_id = %saga_id, command = ?op, "operator command");
    let input = Input::Operator(op);
    let input_id = input.id(stream_seq(msg));
    apply_input(ctx, &saga_id, input, &input_id).await?;
    Ok(Settle::Ack)
}

fn definition_of<'a>(ctx: &'a Ctx, state: &SagaState) -> Result<&'a Definition, Fail> {
    ctx.registry.by_kind(&state.kind).ok_or_else(|| {
        Fail::Bad(format!(
            "saga {} is of kind {:?}, which this orchestrator has no definition for",
            state.saga_id, state.kind
        ))
    })
}

async fn load(ctx: &Ctx, saga_id: &str) -> Result<Option<(SagaState, u64)>, Fail> {
    let Some(entry) = ctx.kv.entry(saga_id).await.map_err(transient)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let state: SagaState = serde_json::from_slice(&entry.value)
        .map_err(|e| Fail::Bad(format!("saga {saga_id}'s stored state is unreadable: {e}")))?;
    Ok(Some((state, entry.revision)))
}

/// Most reload-and-retry rounds for one input before it is handed back to the server.
const MAX_CAS_ROUNDS: usize = 64;

fn is_conflict(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => true,
        // On replicated buckets a lost compare-and-set can arrive as error 10164.
        PublishErrorKind::Other => {
            let text = e.to_string();
            text.contains("10071") || text.contains("10164") || text.contains("wrong last sequence")
        }
        _ => false,
    }
}

/// A revision-checked write of a saga's state (KV `update`, done by hand so that a terminal
/// state can carry a TTL: terminal sagas expire after the configured retention, running ones
/// never do).
async fn write_state(ctx: &Ctx, state: &SagaState, revision: u64) -> Result<u64, PublishError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        revision.to_string().as_str(),
    );
    if let (true, Some(ttl)) = (state.status.is_terminal(), ctx.terminal_retention) {
        headers.insert("Nats-TTL", ttl.as_secs().max(1).to_string().as_str());
    }
    let subject = format!("$KV.{}.{}", topology::SAGAS_BUCKET, state.saga_id);
    let ack = ctx
        .js
        .publish_with_headers(subject, headers, to_bytes(state))
        .await?
        .await?;
    Ok(ack.sequence)
}

/// Steps 1–4 of the one rule for a saga that exists.
///
/// Step 1 first tries the state this process last wrote for the saga (the [`StateCache`]), which
/// saves a KV read per input. That is safe because the cache can only be *behind* KV, never
/// ahead: a transition computed from a stale state fails its revision check and is recomputed
/// from a fresh read, and an input the cached state would ignore is re-judged on a fresh read.
async fn apply_input(ctx: &Ctx, saga_id: &str, input: Input, input_id: &str) -> Result<(), Fail> {
    let mut cached = ctx.cache.get(saga_id);
    for _ in 0..MAX_CAS_ROUNDS {
        let from_cache = cached.is_some();
        let (state, revision) = match cached.take() {
            Some(hit) => hit,
            None => match load(ctx, saga_id).await? {
                Some((s, r)) => (Arc::new(s), r),
                None => {
                    warn!(
                        saga_id,
                        input = input_id,
                        "input for a saga that does not exist; dropped"
                    );
                    return Ok(());
                }
            },
        };
        let def = definition_of(ctx, &state)?;
        match engine::apply(def, &state, &input, input_id, now_ms()) {
            Transition::Applied(next) => {
                match write_state(ctx, &next, revision).await {
                    Ok(new_revision) => {
                        log_transition(&state, &next, input_id);
                        observe(&ctx.metrics, &state, &next, &input);
                        if otel::enabled() {
                            spans::closed(&state, &next, &input)
                                .into_iter()
                                .for_each(otel::export);
                        }
                        let fx = engine::effects(&next);
                        ctx.cache.put(saga_id, Arc::new(*next), new_revision);
                        return publish_effects(ctx, &fx).await;
                    }
                    Err(e) if is_conflict(&e) => {
                        debug!(saga_id, input = input_id, "revision conflict; reloading");
                        ctx.metrics.cas_conflicts.inc();
                        ctx.cache.remove(saga_id);
                        continue;
                    }
                    Err(e) => {
                        // A timeout may still have written: forget what we think we know.
                        ctx.cache.remove(saga_id);
                        return Err(transient(e));
                    }
                }
            }
            Transition::Ignored(_) if from_cache => continue,
            Transition::Ignored(reason) => {
                debug!(saga_id, input = input_id, %reason, "input ignored");
                if state.last_input == input_id {
                    // This input produced the current state; its first run may have stopped
                    // before publishing, so publish again (duplicates are dropped downstream).
                    publish_effects(ctx, &engine::effects(&state)).await?;
                }
                return Ok(());
            }
        }
    }
    Err(Fail::Transient(format!(
        "saga {saga_id}: {MAX_CAS_ROUNDS} revision conflicts in a row"
    )))
}

/// The last state this process wrote per saga, with its revision; only sagas still waiting for
/// something are kept, and at most `cap` of them, so memory stays bounded however many sagas run.
pub struct StateCache {
    map: std::sync::Mutex<HashMap<String, (Arc<SagaState>, u64)>>,
    cap: usize,
}

impl StateCache {
    pub fn new(cap: usize) -> Self {
        StateCache {
            map: std::sync::Mutex::new(HashMap::new()),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<SagaState>, u64)>> {
        // A panic while holding the lock cannot leave the map inconsistent (single operations).
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<(Arc<SagaState>, u64)> {
        self.lock().get(id).cloned()
    }

    pub fn put(&self, id: &str, state: Arc<SagaState>, revision: u64) {
        let mut map = self.lock();
        if state.awaiting().is_none() {
            map.remove(id);
        } else if map.len() < self.cap || map.contains_key(id) {
            map.insert(id.to_string(), (state, revision));
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Metrics of one applied transition: lifecycle events, retries, and the latency of the step
/// whose reply was applied.
fn observe(m: &Metrics, before: &SagaState, after: &SagaState, input: &Input) {
    for e in &after.events {
        match e.event.as_str() {
            "completed" | "compensated" | "stuck" => m.saga_event(&after.kind, &e.event),
            "step_retrying" => {
                if let Some((i, op)) = after.awaiting() {
                    let st = &after.steps[i];
                    let action = match op {
                        Op::Action => st.action.as_str(),
                        Op::Compensation => st.compensation.as_deref().unwrap_or("-"),
                    };
                    m.retry(&st.service, action, op.as_str());
                }
            }
            _ => {}
        }
    }
    if let Input::Reply(r) = input {
        let Some(st) = before.steps.get(r.step as usize) else {
            return;
        };
        if let Some(sent) = st.dispatched_at_ms {
            let action = match r.op {
                Op::Action => st.action.as_str(),
                Op::Compensation => st.compensation.as_deref().unwrap_or("-"),
            };
            let outcome = r.outcome.as_str();
            let secs = after.updated_ms.saturating_sub(sent) as f64 / 1000.0;
            m.step(&st.service, action, r.op.as_str(), outcome, secs);
        }
    }
}

/// Saga-level events, always published and logged at info: the saga started, failed over to
/// compensation, ended, was parked or resumed. Step-level events (`step_succeeded`,
/// `step_compensated`, `step_retrying`) are published only with `--step-events` and logged at
/// debug: they are the bulk of the traffic and the state already records every step.
fn is_lifecycle_event(event: &str) -> bool {
    !matches!(
        event,
        "step_succeeded" | "step_compensated" | "step_retrying"
    )
}

fn is_lifecycle(payload: &Value) -> bool {
    payload["event"].as_str().is_some_and(is_lifecycle_event)
}

fn log_transition(before: &SagaState, after: &SagaState, input: &str) {
    let current = after.current_step();
    for e in &after.events {
        let detail = e.detail.as_deref().unwrap_or("");
        // The event's own step if it names one, else the step the saga is at.
        let at = e
            .step
            .as_deref()
            .and_then(|name| after.steps.iter().find(|s| s.name == name))
            .or(current);
        let (step, service) = at
            .map(|s| (s.name.as_str(), s.service.as_str()))
            .unwrap_or(("-", "-"));
        if e.event == "stuck" {
            error!(saga_id = %after.saga_id, kind = %after.kind, step, service, event = %e.event, detail, trace_id = after.trace_id.as_deref().unwrap_or("-"), "saga parked");
        } else if !is_lifecycle_event(&e.event) {
            debug!(saga_id = %after.saga_id, kind = %after.kind, step, service, event = %e.event, detail, status = after.status.as_str(), trace_id = after.trace_id.as_deref().unwrap_or("-"), "saga event");
        } else {
            info!(saga_id = %after.saga_id, kind = %after.kind, step, service, event = %e.event, detail, status = after.status.as_str(), trace_id = after.trace_id.as_deref().unwrap_or("-"), "saga event");
        }
    }
    if before.status != after.status {
        debug!(saga_id = %after.saga_id, from = before.status.as_str(), to = after.status.as_str(), input, "status changed");
    }
}

fn to_bytes<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("state serialises"))
}

/// Message-schedule headers (ADR-51, nats-server 2.12+).
const NATS_SCHEDULE: &str = "Nats-Schedule";
const NATS_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// How a publish of [`publish_effects`] is marked for the timers stream.
enum Mark {
    None,
    /// A message schedule: `Nats-Schedule` and `Nats-Schedule-Target`.
    Schedule(String, String),
    /// Replaces the schedule on its subject (`Nats-Rollup: sub`) with an empty message that
    /// expires in a second, so the schedule never fires.
    Cancel,
}

/// Step 4: publish everything the state implies, all at once, and wait for every PubAck.
///
/// Timers are written to the connection first: a command leads to replies and later inputs,
/// which must not find the saga without the watchdog that the same state armed. The server
/// reads one connection in order, so once a command reached it, so did the timer before it.
async fn publish_effects(ctx: &Ctx, fx: &Effects) -> Result<(), Fail> {
    let mut pubs = Vec::with_capacity(
        fx.commands.len() + fx.timers.len() + fx.events.len() + fx.cancel_schedules.len(),
    );
    for t in &fx.timers {
        let schedule = Mark::Schedule(t.schedule(), t.subject());
        pubs.push((t.schedule_subject(), t.msg_id(), to_bytes(t), schedule));
    }
    for c in &fx.commands {
        pubs.push((c.subject(), c.msg_id(), to_bytes(c), Mark::None));
    }
    for subject in &fx.cancel_schedules {
        let id = format!("{subject}.cancel");
        pubs.push((subject.clone(), id, Bytes::new(), Mark::Cancel));
    }
    for e in fx
        .events
        .iter()
        .filter(|e| ctx.step_events || is_lifecycle(&e.payload))
    {
        pubs.push((
            e.subject.clone(),
            e.msg_id.clone(),
            to_bytes(&e.payload),
            Mark::None,
        ));
    }
    let trace_id = fx.trace_id.as_deref();
    try_join_all(
        pubs.into_iter()
            .map(|(subject, id, payload, mark)| async move {
                let mut headers = HeaderMap::new();
                let traced = !matches!(mark, Mark::Cancel);
                match mark {
                    Mark::None => {}
                    Mark::Schedule(at, target) => {
                        headers.insert(NATS_SCHEDULE, at.as_str());
                        headers.insert(NATS_SCHEDULE_TARGET, target.as_str());
                    }
                    Mark::Cancel => {
                        headers.insert("Nats-Rollup", "sub");
                        headers.insert("Nats-TTL", "1s");
                    }
                }
                if let (Some(t), true) = (trace_id, traced) {
                    headers.insert(
                        trace::TRACEPARENT,
                        trace::traceparent(t, &trace::span_id(&id)).as_str(),
                    );
                }
                jsnats::publish(&ctx.js, subject, &id, headers, payload).await
            }),
    )
    .await
    .map(|_| ())
    .map_err(transient)
}
