//! `jetsaga`: the command-line client. Starts sagas the way `nats pub` would, shows their state
//! from the `sagas` bucket, asks the services' query subjects, sends operator commands, and runs
//! the quick-start demo.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::{jetstream, HeaderMap};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::{json, Value};

use jetsaga_common::{nats::ConnectConfig, protocol, topology};
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
    /// Start a saga: publish a request (JSON text, or @file) to its trigger subject.
    Submit {
        /// The request body, or @path to read it from a file.
        request: String,
        /// Trigger subject.
        #[arg(long, default_value = "orders.create")]
        subject: String,
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
    /// Show one saga's state.
    Show {
        saga_id: String,
        /// Print the stored JSON instead of a timeline.
        #[arg(long)]
        json: bool,
    },
    /// Ask a service a read-only question, e.g. `query payment balance '{"customer_id":"c-1"}'`.
    Query {
        service: String,
        what: String,
        #[arg(default_value = "{}")]
        request: String,
    },
    /// Compensate a running saga (through the orchestrator).
    Abort {
        saga_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a stuck saga's compensation (through the orchestrator).
    Retry { saga_id: String },
    /// Run the quick-start demo: three orders, one completes and two compensate.
    Demo {
        /// Seconds to wait for each order.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = ConnectConfig {
        url: cli.nats_url.clone(),
        user: cli.nats_user.clone(),
        password: cli.nats_password.clone(),
    };
    let mut opts = async_nats::ConnectOptions::new().name("jetsaga-cli");
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    let client = opts
        .connect(&cfg.url)
        .await
        .with_context(|| format!("cannot connect to {}", cfg.url))?;
    let js = jetstream::new(client.clone());
    match cli.cmd {
        Cmd::Submit {
            request,
            subject,
            msg_id,
            wait,
            timeout,
        } => {
            let body = match request.strip_prefix('@') {
                Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
                None => request.into_bytes(),
            };
            let id = submit(&client, &subject, body.clone(), msg_id).await?;
            if wait {
                let id = id.context("the request has no order_id to wait for")?;
                let s = wait_terminal(&js, &id, Duration::from_secs(timeout)).await?;
                println!("{}", outcome_line(&s));
            }
        }
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
        Cmd::Demo { timeout } => demo(&client, &js, Duration::from_secs(timeout)).await?,
    }
    Ok(())
}

/// Publishes like `nats req <subject>`: a core request whose reply is the stream's PubAck.
/// Returns the request's order id if it has one.
async fn submit(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    msg_id: Option<String>,
) -> anyhow::Result<Option<String>> {
    let mut headers = HeaderMap::new();
    if let Some(id) = &msg_id {
        headers.insert(protocol::MSG_ID, id.as_str());
    }
    let reply = client
        .request_with_headers(subject.to_string(), headers, body.clone().into())
        .await
        .with_context(|| {
            format!("no stream answered on {subject}: is the orchestrator running?")
        })?;
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["order_id"].as_str().map(str::to_string)))
}

async fn wait_terminal(
    js: &jetstream::Context,
    saga_id: &str,
    timeout: Duration,
) -> anyhow::Result<SagaState> {
    let kv = js.get_key_value(topology::SAGAS_BUCKET).await?;
    let mut watch = kv.watch(saga_id).await?;
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

fn print_timeline(s: &SagaState) {
    println!(
        "saga {} ({}) status {}",
        s.saga_id,
        s.kind,
        s.status.as_str()
    );
    println!("  created {}  updated {}", s.created_at, s.updated_at);
    if let Some(f) = &s.failure {
        println!("  failure: {} - {}", f.step, f.reason);
    }
    if let Some(st) = &s.stuck {
        println!(
            "  STUCK at {} after {} attempts: {}",
            st.step, st.attempts, st.last_error
        );
    }
    for (i, st) in s.steps.iter().enumerate() {
        let status = format!("{:?}", st.status).to_lowercase();
        println!(
            "  {i}. {:<20} {:<13} attempts {}  {} -> {}{}",
            st.name,
            status,
            st.attempts,
            st.started_at.as_deref().unwrap_or("-"),
            st.ended_at.as_deref().unwrap_or("-"),
            st.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
        if st.compensation_attempts > 0 {
            println!(
                "     compensation {:<12} attempts {}  {} -> {}{}",
                st.compensation.as_deref().unwrap_or("-"),
                st.compensation_attempts,
                st.compensation_started_at.as_deref().unwrap_or("-"),
                st.compensation_ended_at.as_deref().unwrap_or("-"),
                st.compensation_error
                    .as_deref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default()
            );
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
    let run = jetsaga_common::time::now_ms() / 1000 % 1_000_000;
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
        // Wait for the services too: their consumers exist once they have started.
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
