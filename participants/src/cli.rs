//! The command line shared by the three service binaries (flags with environment fallbacks) and
//! the shutdown signal (Ctrl-C or SIGTERM), so each `main` stays a few lines.

use std::path::PathBuf;

use clap::Parser;
use jetsaga_common::{nats::ConnectConfig, topology};

use crate::{
    config::{Config, Faults, Synchronous},
    seed::{self, Seed},
};

/// A jetsaga saga participant.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// SQLite database file [default: <service>.sqlite in the working directory].
    #[arg(long, env = "JETSAGA_DB")]
    pub db: Option<PathBuf>,
    /// Seed JSON file, applied with INSERT OR IGNORE at every start.
    #[arg(long, env = "JETSAGA_SEED")]
    pub seed: Option<PathBuf>,
    /// Most commands handled per transaction.
    #[arg(long, env = "JETSAGA_BATCH", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch: u16,
    /// SQLite `synchronous` setting (full: an acked reply survives an OS crash).
    #[arg(long, env = "JETSAGA_SQLITE_SYNC", value_enum, default_value_t = Synchronous::Full)]
    pub sqlite_sync: Synchronous,
    /// Replicas of the shared streams and consumers (1 on one server, 3 on a cluster); must
    /// match the orchestrator's.
    #[arg(long, env = "JETSAGA_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Serve /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9091); off if unset.
    #[arg(long, env = "JETSAGA_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Args {
    /// The runtime configuration for `service` (reads the seed file and the fault variables).
    pub fn into_config(self, service: &str) -> Result<Config, seed::Error> {
        let seed = self.seed.as_deref().map(Seed::load).transpose()?;
        let nats = ConnectConfig {
            url: self.nats_url,
            user: self.nats_user.filter(|s| !s.is_empty()),
            password: self.nats_password.filter(|s| !s.is_empty()),
            tls: jetsaga_common::nats::Tls::from_env(),
        };
        let db = self
            .db
            .unwrap_or_else(|| PathBuf::from(format!("{service}.sqlite")));
        let mut config = Config::new(nats, db);
        config.seed = seed;
        config.batch = usize::from(self.batch);
        config.synchronous = self.sqlite_sync;
        config.topology = topology::Settings {
            replicas: self.replicas,
            ..Default::default()
        };
        config.faults = Faults::from_env();
        config.metrics_addr = self.metrics_addr;
        Ok(config)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Why a service binary could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Seed(#[from] seed::Error),
    #[error(transparent)]
    Run(#[from] crate::runtime::Error),
}

/// The whole `main` of a service binary: parse the command line, set up logging, run until a
/// signal. Errors are returned for `main` to print.
pub async fn main<S: crate::Service>(service: S) -> Result<(), Error> {
    let args = Args::parse();
    let process = format!("jetsaga-{}", service.name());
    jetsaga_common::telemetry::init(&process);
    // OTLP trace export, only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; flushed on exit.
    let _otel = jetsaga_common::otel::init(&process);
    let config = args.into_config(service.name())?;
    crate::runtime::run(service, config, shutdown_signal()).await?;
    Ok(())
}
