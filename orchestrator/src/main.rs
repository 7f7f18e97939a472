//! `jetsaga-orchestrator`: runs saga definitions over NATS JetStream until Ctrl-C or SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use jetsaga_common::{nats::ConnectConfig, topology::Settings};
use jetsaga_orchestrator::driver::{self, Config};

/// jetsaga's saga orchestrator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS user.
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Saga definition files (JSON). Without any, the built-in order saga runs.
    #[arg(
        long = "definition",
        env = "JETSAGA_DEFINITIONS",
        value_delimiter = ','
    )]
    definitions: Vec<PathBuf>,
    /// Inputs handled at once per consumer.
    #[arg(long, env = "JETSAGA_CONCURRENCY", default_value_t = 256)]
    concurrency: usize,
    /// Replicas for streams and the bucket (3 on a 3-node cluster).
    #[arg(long, env = "JETSAGA_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Seconds before an unacked input is redelivered (keep well below step timeouts).
    #[arg(long, env = "JETSAGA_ACK_WAIT_SECS", default_value_t = 5)]
    ack_wait_secs: u64,
    /// Most waiting sagas whose state is kept in memory to save KV reads.
    #[arg(long, env = "JETSAGA_CACHE_SIZE", default_value_t = 100_000)]
    cache_size: usize,
    /// Seconds a completed or compensated saga stays in the `sagas` bucket (0: forever).
    #[arg(long, env = "JETSAGA_TERMINAL_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    terminal_retention_secs: u64,
    /// Serve /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9090); off if unset.
    #[arg(long, env = "JETSAGA_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Also publish step-level events (step_succeeded, step_compensated, step_retrying).
    #[arg(long, env = "JETSAGA_STEP_EVENTS")]
    step_events: bool,
    /// Connection name shown by the server.
    #[arg(long, env = "JETSAGA_NAME", default_value = "jetsaga-orchestrator")]
    name: String,
}

/// mimalloc instead of glibc malloc: the profile under load showed about half of the CPU in
/// malloc/free (JSON states and messages are allocation-heavy).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetsaga_common::telemetry::init("orchestrator");
    // OTLP trace export, only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; flushed on exit.
    let _otel = jetsaga_common::otel::init("jetsaga-orchestrator");
    let a = Args::parse();
    let cfg = Config {
        nats: ConnectConfig {
            url: a.nats_url,
            user: a.nats_user,
            password: a.nats_password,
            tls: jetsaga_common::nats::Tls::from_env(),
        },
        definitions: a.definitions,
        settings: Settings {
            replicas: a.replicas,
            ack_wait: std::time::Duration::from_secs(a.ack_wait_secs),
            ..Settings::default()
        },
        concurrency: a.concurrency,
        name: a.name,
        cache_size: a.cache_size,
        metrics_addr: a.metrics_addr,
        step_events: a.step_events,
        terminal_retention: (a.terminal_retention_secs > 0)
            .then(|| std::time::Duration::from_secs(a.terminal_retention_secs)),
    };
    driver::run(cfg, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
