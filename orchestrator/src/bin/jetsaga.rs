//! `jetsaga`: the operator's command-line client.
//!
//! It only speaks NATS, like any other client: it starts sagas the way `nats pub` does, reads
//! saga state from the `sagas` bucket, follows lifecycle events, sends operator commands through
//! the orchestrator (never by writing KV), inspects and replays dead letters, and runs the
//! quick-start demo.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context as _};
use async_nats::{jetstream, HeaderMap};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::{json, Value};

use jetsaga_common::{
    nats::{ConnectConfig, Tls},
    protocol,
    time::now_ms,
    topology,
};
use jetsaga_orchestrator::state::{SagaState, SagaStatus};

#[derive(Debug, Parser)]
#[command(version, about = "jetsaga command-line client")]
struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// NATS user.
    #[arg(long, global = true, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List sagas, newest first, with age and current step.
    List {
        /// Only sagas with this status (running, compensating, completed, compensated, stuck).
        #[arg(long)]
        status: Option<String>,
        /// Only sagas of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one saga as a timeline of its steps and compensations.
    Show {
        saga_id: String,
        /// Print the stored JSON instead of a timeline.
        #[arg(long)]
        json: bool,
    },
    /// Follow saga lifecycle events as they happen.
    Watch {
        /// Only this saga's events.
        saga_id: Option<String>,
    },
    /// Counts by status and the oldest running saga.
    Stats,
    /// Start a saga: publish a request (JSON text, or @file) to its trigger subject.
    Submit {
        /// The request body, or @path to read it from a file.
        request: String,
        /// Trigger subject.
        #[arg(long, default_value = "orders.create")]
        subject: String,
        /// Field of the request that holds the saga id.
        #[arg(long, default_value = "order_id")]
        key: String,
        /// Nats-Msg-Id header (deduplicates repeats inside the stream's window).
        #[arg(long)]
        msg_id: Option<String>,
        /// Wait for the saga to end and print its outcome.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Compensate a running saga (an operator command, sent through the orchestrator).
    Abort {
        saga_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a stuck saga's compensation (an operator command, sent through the orchestrator).
    Retry { saga_id: String },
    /// Inspect and replay dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Ask a service a read-only question, e.g. `query payment balance '{"customer_id":"c-1"}'`.
    Query {
        service: String,
        what: String,
        #[arg(default_value = "{}")]
        request: String,
    },
    /// Run the quick-start demo: three orders, one completes and two compensate.
    Demo {
        /// Seconds to wait for each order.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// List dead letters: sequence, time, source subject, reason.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter with its headers and original payload.
    Show { seq: u64 },
    /// Publish a dead letter's original payload to its original subject again (after a fix).
    Replay { seq: u64 },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = ConnectConfig {
        url: cli.nats_url.clone(),
        user: cli.nats_user.clone(),
        password: cli.nats_password.clone(),
        tls: Tls::from_env(),
    };
    let opts = cfg.apply(async_nats::ConnectOptions::new().name("jetsaga-cli"));
    let client = opts
        .connect(cfg.servers()?)
        .await
        .with_context(|| format!("cannot connect to {}", cli.nats_url))?;
    let js = jetstream::new(client.clone());
    match cli.cmd {
        Cmd::List {
            status,
            kind,
            limit,
            json,
        } => list(&js, status, kind, limit, json).await?,
        Cmd::Show { saga_id, json } => {
            let kv = js.get_key_value(topology::SAGAS_BUCKET).await?;
            let Some(v) = kv.get(&saga_id).await? else {
                bail!("no saga {saga_id}");
            };
            if json {
                println!("{}", String::from_utf8_lossy(&v));
            } else {
                print_timeline(&serde_json::from_slice(&v)?);
            }
        }
        Cmd::Watch { saga_id } => watch(&client, saga_id).await?,
        Cmd::Stats => stats(&js).await?,
        Cmd::Submit {
            request,
            subject,
            key,
            msg_id,
            wait,
            timeout,
        } => {
            let body = match request.strip_prefix('@') {
                Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
                None => request.into_bytes(),
            };
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v[&key].as_str().map(str::to_string));
            submit(&client, &subject, body, msg_id).await?;
            if let Some(id) = &id {
                println!("saga {id}");
            }
            if wait {
                let id = id.with_context(|| format!("the request has no {key} to wait for"))?;
                let s = wait_terminal(&js, &id, Duration::from_secs(timeout)).await?;
                println!("{}", outcome_line(&s));
            }
        }
        Cmd::Query {
            service,
            what,
            request,
        } => {
            let v = query(&client, &service, &what, serde_json::from_str(&request)?).await?;
            println!("{v}");
        }
        Cmd::Abort { saga_id, reason } => {
            operator(
                &client,
                &saga_id,
                json!({"command": "abort", "reason": reason}),
            )
            .await?
        }
        Cmd::Retry { saga_id } => operator(&client, &saga_id, json!({"command": "retry"})).await?,
        Cmd::Dlq { cmd } => dlq(&js, cmd).await?,
        Cmd::Demo { timeout } => demo(&client, &js, Duration::from_secs(timeout)).await?,
    }
    Ok(())
}

/// Every saga's current state, read in one pass: a KV watch delivers the latest value of each
/// key (one message per saga, not its history) and then says it is caught up. The cost grows
/// with the number of sagas kept, which the terminal-saga retention bounds.
async fn all_sagas(js: &jetstream::Context) -> anyhow::Result<Vec<SagaState>> {
    let kv = js.get_key_value(topology::SAGAS_BUCKET).await?;
    let keys = kv.status().await?.values();
    let mut out = Vec::new();
    if keys == 0 {
        return Ok(out);
    }
    let mut watch = kv.watch_with_history(">").await?;
    while let Some(entry) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .context("the bucket stopped answering")?
    {
        let entry = entry?;
        if entry.operation == jetstream::kv::Operation::Put {
            if let Ok(s) = serde_json::from_slice::<SagaState>(&entry.value) {
                out.push(s);
            }
        }
        if entry.delta == 0 {
            break;
        }
    }
    Ok(out)
}

fn age(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

async fn list(
    js: &jetstream::Context,
    status: Option<String>,
    kind: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let mut sagas = all_sagas(js).await?;
    sagas.retain(|s| {
        status.as_deref().is_none_or(|st| s.status.as_str() == st)
            && kind.as_deref().is_none_or(|k| s.kind == k)
    });
    sagas.sort_by_key(|s| std::cmp::Reverse(s.created_ms));
    if !json {
        println!(
            "{:<28} {:<8} {:<13} {:>8}  {:<20} note",
            "SAGA", "KIND", "STATUS", "AGE", "STEP"
        );
    }
    for s in sagas.iter().take(limit) {
        let step = s.current_step().map(|st| st.name.as_str()).unwrap_or("-");
        if json {
            println!(
                "{}",
                json!({"saga_id": s.saga_id, "kind": s.kind, "status": s.status, "created_at": s.created_at,
                       "updated_at": s.updated_at, "step": step, "failure": s.failure})
            );
        } else {
            let note = match (&s.stuck, &s.failure) {
                (Some(st), _) => format!("stuck after {} attempts: {}", st.attempts, st.last_error),
                (None, Some(f)) => format!("{}: {}", f.step, f.reason),
                _ => String::new(),
            };
            println!(
                "{:<28} {:<8} {:<13} {:>8}  {:<20} {note}",
                s.saga_id,
                s.kind,
                s.status.as_str(),
                age(s.created_ms),
                step
            );
        }
    }
    if !json && sagas.len() > limit {
        println!("... {} more (use --limit)", sagas.len() - limit);
    }
    Ok(())
}

async fn stats(js: &jetstream::Context) -> anyhow::Result<()> {
    let sagas = all_sagas(js).await?;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &sagas {
        *by_status.entry(s.status.as_str()).or_default() += 1;
    }
    println!("sagas: {}", sagas.len());
    for (st, n) in &by_status {
        println!("  {st:<13} {n}");
    }
    let oldest = sagas
        .iter()
        .filter(|s| matches!(s.status, SagaStatus::Running | SagaStatus::Compensating))
        .min_by_key(|s| s.created_ms);
    match oldest {
        Some(s) => println!(
            "oldest in flight: {} ({}, {} old, at {})",
            s.saga_id,
            s.status.as_str(),
            age(s.created_ms),
            s.current_step().map(|st| st.name.as_str()).unwrap_or("-")
        ),
        None => println!("oldest in flight: none"),
    }
    Ok(())
}

async fn watch(client: &async_nats::Client, saga_id: Option<String>) -> anyhow::Result<()> {
    let subject = match &saga_id {
        Some(id) => format!("saga.events.{id}.>"),
        None => "saga.events.>".to_string(),
    };
    let mut sub = client.subscribe(subject.clone()).await?;
    eprintln!("watching {subject} (Ctrl-C to stop)");
    while let Some(msg) = sub.next().await {
        let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        println!(
            "{}  {:<24} {:<17} {:<20} {}",
            v["at"].as_str().unwrap_or("-"),
            v["saga_id"].as_str().unwrap_or("-"),
            v["event"].as_str().unwrap_or("-"),
            v["step"].as_str().unwrap_or(""),
            v["detail"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn dlq(js: &jetstream::Context, cmd: DlqCmd) -> anyhow::Result<()> {
    let stream = js
        .get_stream(topology::DLQ_STREAM)
        .await
        .context("no dead-letter stream (has the orchestrator run?)")?;
    let header = |m: &jetstream::message::StreamMessage, k: &str| {
        m.headers.get(k).map(|v| v.to_string()).unwrap_or_default()
    };
    match cmd {
        DlqCmd::List { limit } => {
            let state = stream.get_info().await?.state;
            println!("{} dead letters", state.messages);
            let mut shown = 0;
            let mut seq = state.first_sequence;
            while shown < limit && seq <= state.last_sequence && state.messages > 0 {
                if let Ok(m) = stream.get_raw_message(seq).await {
                    println!(
                        "{:>6}  {}  {:<22} {}",
                        m.sequence,
                        m.time,
                        header(&m, protocol::DLQ_SOURCE_SUBJECT),
                        header(&m, protocol::DLQ_REASON)
                    );
                    shown += 1;
                }
                seq += 1;
            }
        }
        DlqCmd::Show { seq } => {
            let m = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("no dead letter {seq}"))?;
            println!(
                "sequence: {}\ntime:     {}\nsubject:  {}",
                m.sequence, m.time, m.subject
            );
            for (k, v) in m.headers.iter() {
                let v: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                println!("{k}: {}", v.join(", "));
            }
            println!(
                "payload ({} bytes):\n{}",
                m.payload.len(),
                String::from_utf8_lossy(&m.payload)
            );
        }
        DlqCmd::Replay { seq } => {
            let m = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("no dead letter {seq}"))?;
            let subject = header(&m, protocol::DLQ_SOURCE_SUBJECT);
            if subject.is_empty() {
                bail!(
                    "dead letter {seq} has no {} header",
                    protocol::DLQ_SOURCE_SUBJECT
                );
            }
            let mut headers = HeaderMap::new();
            // A replay of the same dead letter inside the duplicate window is dropped.
            headers.insert(protocol::MSG_ID, format!("replay.{seq}").as_str());
            let ack = js
                .publish_with_headers(subject.clone(), headers, m.payload.clone())
                .await?
                .await
                .with_context(|| format!("cannot republish to {subject}"))?;
            println!(
                "replayed dead letter {seq} to {subject}: stream {} seq {}{}",
                ack.stream,
                ack.sequence,
                if ack.duplicate {
                    " (duplicate, dropped)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Publishes like `nats req <subject>`: a core request whose reply is the stream's PubAck.
async fn submit(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    msg_id: Option<String>,
) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    if let Some(id) = &msg_id {
        headers.insert(protocol::MSG_ID, id.as_str());
    }
    let reply = client
        .request_with_headers(subject.to_string(), headers, body.into())
        .await
        .with_context(|| {
            format!("no stream answered on {subject}: is the orchestrator running?")
        })?;
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(())
}

async fn wait_terminal(
    js: &jetstream::Context,
    saga_id: &str,
    timeout: Duration,
) -> anyhow::Result<SagaState> {
    let kv = js.get_key_value(topology::SAGAS_BUCKET).await?;
    // With history: the current value first, so a saga that already ended is seen at once.
    let mut watch = kv.watch_with_history(saga_id).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, watch.next())
            .await
            .with_context(|| format!("saga {saga_id} did not end within {timeout:?}"))?;
        let Some(entry) = next else {
            bail!("watch on {saga_id} ended");
        };
        let entry = entry?;
        if entry.value.is_empty() {
            continue;
        }
        let s: SagaState = serde_json::from_slice(&entry.value)?;
        if s.status.is_terminal() || s.status == SagaStatus::Stuck {
            return Ok(s);
        }
    }
}

fn outcome_line(s: &SagaState) -> String {
    match &s.failure {
        None => format!("{:<24} {}", s.saga_id, s.status.as_str()),
        Some(f) => format!(
            "{:<24} {:<12} {} failed: {}",
            s.saga_id,
            s.status.as_str(),
            f.step,
            f.reason
        ),
    }
}

fn ms_of(ts: Option<&str>) -> Option<u64> {
    let t = humantime::parse_rfc3339(ts?).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

fn span(start: Option<&str>, end: Option<&str>) -> String {
    let time = |t: Option<&str>| {
        t.map(|t| t.get(11..23).unwrap_or(t).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let dur = match (ms_of(start), ms_of(end)) {
        (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
        (Some(a), None) => format!("{} ms so far", now_ms().saturating_sub(a)),
        _ => "-".into(),
    };
    format!("{} -> {}  ({dur})", time(start), time(end))
}

fn print_timeline(s: &SagaState) {
    println!(
        "saga {} ({})  status: {}",
        s.saga_id,
        s.kind,
        s.status.as_str()
    );
    println!(
        "  created {}  updated {}  ({} transitions)",
        s.created_at, s.updated_at, s.version
    );
    if let Some(f) = &s.failure {
        println!("  failure: {} - {}", f.step, f.reason);
    }
    if let Some(st) = &s.stuck {
        println!(
            "  STUCK at {} after {} attempts: {}",
            st.step, st.attempts, st.last_error
        );
        println!("  fix the cause, then: jetsaga retry {}", s.saga_id);
    }
    for (i, st) in s.steps.iter().enumerate() {
        let status = format!("{:?}", st.status).to_lowercase();
        println!(
            "  {i}. {:<20} {:<13} attempts {:<2} {}",
            st.name,
            status,
            st.attempts,
            span(st.started_at.as_deref(), st.ended_at.as_deref())
        );
        if let Some(e) = &st.error {
            println!("     error: {e}");
        }
        if st.compensation_attempts > 0 {
            println!(
                "     undo {:<15} {:<13} attempts {:<2} {}",
                st.compensation.as_deref().unwrap_or("-"),
                if st.status == jetsaga_orchestrator::state::StepStatus::Compensated {
                    "done"
                } else {
                    "pending"
                },
                st.compensation_attempts,
                span(
                    st.compensation_started_at.as_deref(),
                    st.compensation_ended_at.as_deref()
                )
            );
            if let Some(e) = &st.compensation_error {
                println!("     undo error: {e}");
            }
        }
    }
}

async fn query(
    client: &async_nats::Client,
    service: &str,
    what: &str,
    req: Value,
) -> anyhow::Result<Value> {
    let subject = protocol::query_subject(service, what);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject.clone(), serde_json::to_vec(&req)?.into()),
    )
    .await
    .with_context(|| format!("{subject}: no answer in 5s"))?
    .with_context(|| format!("{subject}: is the {service} service running?"))?;
    Ok(serde_json::from_slice(&reply.payload)?)
}

async fn operator(client: &async_nats::Client, saga_id: &str, body: Value) -> anyhow::Result<()> {
    let reply = client
        .request(
            topology::ops_subject(saga_id),
            serde_json::to_vec(&body)?.into(),
        )
        .await
        .context("no stream answered: is the orchestrator running?")?;
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(())
}

/// Waits until the orchestrator has created the requests stream, so the first publish lands.
async fn wait_ready(js: &jetstream::Context, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ready = js.get_stream(topology::REQUESTS_STREAM).await.is_ok()
            && js.get_key_value(topology::SAGAS_BUCKET).await.is_ok();
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the orchestrator did not create its streams within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn demo(
    client: &async_nats::Client,
    js: &jetstream::Context,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_ready(js, Duration::from_secs(60)).await?;
    let run = now_ms() / 1000 % 1_000_000;
    let orders = [
        (
            "enough balance and stock",
            json!({"order_id": format!("demo-{run}-1"), "customer_id": "c-1",
                   "items": [{"sku": "sku-1", "quantity": 2, "unit_price_cents": 1250}]}),
        ),
        (
            "balance too low",
            json!({"order_id": format!("demo-{run}-2"), "customer_id": "c-2",
                   "items": [{"sku": "sku-2", "quantity": 1, "unit_price_cents": 5000}]}),
        ),
        (
            "stock short",
            json!({"order_id": format!("demo-{run}-3"), "customer_id": "c-3",
                   "items": [{"sku": "sku-3", "quantity": 2, "unit_price_cents": 700}]}),
        ),
    ];
    println!("== jetsaga demo: three orders ==");
    for (what, order) in &orders {
        let id = order["order_id"].as_str().unwrap_or_default().to_string();
        println!("-> {id}: {what}");
        submit(client, "orders.create", serde_json::to_vec(order)?, None).await?;
        let s = wait_terminal(js, &id, timeout).await?;
        let order_status = query(client, "order", "status", json!({"order_id": id}))
            .await
            .map(|v| v["status"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| format!("? ({e})"));
        println!("   {}  (order {order_status})", outcome_line(&s));
    }
    println!("== what the services hold now ==");
    for c in ["c-1", "c-2", "c-3"] {
        let v = query(client, "payment", "balance", json!({"customer_id": c})).await?;
        println!("   balance {c}: {}", v["balance_cents"]);
    }
    for sku in ["sku-1", "sku-2", "sku-3"] {
        let v = query(client, "inventory", "stock", json!({"sku": sku})).await?;
        println!("   stock {sku}: {}", v["quantity"]);
    }
    Ok(())
}
