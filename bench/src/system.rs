//! The system under test: a fresh nats-server (the pinned binary, the repo's `nats.conf`, file
//! storage), the release-built orchestrator and the three services as separate processes, seeded
//! for a scenario. Everything is killed when the [`System`] is dropped — at the end, on an error,
//! and when Ctrl-C drops the future that owns it.
//!
//! The binaries are taken from the directory of the benchmark's own executable (so
//! `cargo build --release --workspace --bins` must have run first); nothing is built here.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use jetsaga_common::{
    dev, protocol,
    testkit::{bin_dir, NatsServer, Proc},
    topology,
};
use serde_json::{json, Value};

use crate::procstat::{self, Pid};

pub const SERVICES: [&str; 3] = ["order", "payment", "inventory"];

/// Customers and SKUs the load rotates over; each is seeded far beyond what a run can spend.
pub const RICH_CUSTOMERS: usize = 8;
pub const SKUS: usize = 8;
/// The mixed scenario's customer with no money (payment fails: cancel the order).
pub const POOR_CUSTOMER: &str = "c-poor";
/// The mixed scenario's SKU with no stock (inventory fails: refund, then cancel).
pub const EMPTY_SKU: &str = "sku-empty";

/// Which seed and request mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Every order succeeds.
    Success,
    /// 10% fail at payment (order cancelled), 10% at inventory (refund, then cancel).
    Mixed,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Success => "success",
            Scenario::Mixed => "mixed",
        }
    }

    /// The request body of saga number `i` with id `id`.
    pub fn order(self, i: u64, id: &str) -> Vec<u8> {
        let (customer, sku) = match (self, i % 10) {
            (Scenario::Mixed, 3) => (
                POOR_CUSTOMER.to_string(),
                format!("sku-{}", i % SKUS as u64),
            ),
            (Scenario::Mixed, 7) => (
                format!("c-{}", i % RICH_CUSTOMERS as u64),
                EMPTY_SKU.to_string(),
            ),
            _ => (
                format!("c-{}", i % RICH_CUSTOMERS as u64),
                format!("sku-{}", i % SKUS as u64),
            ),
        };
        json!({"order_id": id, "customer_id": customer,
               "items": [{"sku": sku, "quantity": 1, "unit_price_cents": 1250}]})
        .to_string()
        .into_bytes()
    }

    /// Whether saga number `i` is expected to compensate.
    pub fn compensates(self, i: u64) -> bool {
        self == Scenario::Mixed && matches!(i % 10, 3 | 7)
    }
}

fn seed() -> Value {
    let mut customers = serde_json::Map::new();
    for c in 0..RICH_CUSTOMERS {
        customers.insert(format!("c-{c}"), json!(1_000_000_000_000_000i64));
    }
    customers.insert(POOR_CUSTOMER.into(), json!(0));
    let mut stock = serde_json::Map::new();
    for s in 0..SKUS {
        stock.insert(format!("sku-{s}"), json!(1_000_000_000_000i64));
    }
    stock.insert(EMPTY_SKU.into(), json!(0));
    json!({"customers": customers, "stock": stock})
}

/// How the processes are started.
#[derive(Debug, Clone)]
pub struct Options {
    /// `RUST_LOG` of the orchestrator and services.
    pub rust_log: String,
    /// Extra environment for every jetsaga process (e.g. `JETSAGA_SQLITE_SYNC=full`).
    pub env: Vec<(String, String)>,
    /// Where logs, databases and the seed go.
    pub dir: PathBuf,
}

/// A running process the benchmark accounts for.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: Pid,
}

/// Fields drop in order: the jetsaga processes are killed before the server, so their logs do
/// not end in a burst of connection errors.
pub struct System {
    pub orchestrator: Proc,
    pub services: Vec<Proc>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    nats_pid: u32,
    pub nats: NatsServer,
}

/// A nats-server for the raw bound: the shipped nats.conf without its accounts (the raw pattern
/// uses its own subjects, which no jetsaga user may touch), so the same JetStream settings. The
/// permission checks it skips make the bound, if anything, a little higher.
pub fn start_open_nats(dir: &std::path::Path) -> anyhow::Result<(NatsServer, u32)> {
    let conf =
        std::fs::read_to_string(jetsaga_common::testkit::workspace_root().join("nats.conf"))?;
    let open = match conf.find("\naccounts {") {
        Some(i) => &conf[..i],
        None => &conf[..],
    };
    std::fs::create_dir_all(dir)?;
    let path = dir.join("nats-open.conf");
    std::fs::write(&path, open)?;
    std::env::set_var("JETSAGA_NATS_CONF", &path);
    let started = start_nats();
    std::env::remove_var("JETSAGA_NATS_CONF");
    started
}

/// Starts a bare nats-server the way the tests do and finds its pid.
pub fn start_nats() -> anyhow::Result<(NatsServer, u32)> {
    let nats = NatsServer::start();
    let pid = procstat::find_nats_server(nats.port)
        .with_context(|| format!("cannot find the nats-server pid on port {}", nats.port))?;
    Ok((nats, pid))
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --release --workspace --bins` (with the same CARGO_TARGET_DIR) first",
            p.display()
        );
    }
    Ok(p)
}

impl System {
    pub async fn start(opts: &Options) -> anyhow::Result<Self> {
        let orch_bin = binary("jetsaga-orchestrator")?;
        let svc_bins: Vec<PathBuf> = SERVICES
            .iter()
            .map(|s| binary(&format!("jetsaga-{s}")))
            .collect::<Result<_, _>>()?;
        std::fs::create_dir_all(&opts.dir)?;
        let (nats, nats_pid) = start_nats()?;
        let seed_path = opts.dir.join("seed.json");
        std::fs::write(&seed_path, seed().to_string())?;
        let mut env = vec![
            ("NATS_URL".to_string(), nats.url()),
            ("RUST_LOG".to_string(), opts.rust_log.clone()),
        ];
        env.extend(opts.env.iter().cloned());
        // Each process connects as its own nats.conf user, as in production.
        let orchestrator = Proc::spawn(
            "orchestrator",
            orch_bin,
            vec![],
            [env.clone(), dev::credentials("orchestrator")].concat(),
            opts.dir.join("orchestrator.log"),
        );
        let mut services = Vec::new();
        for (svc, path) in SERVICES.iter().zip(svc_bins) {
            let mut env = env.clone();
            let db = opts.dir.join(format!("{svc}.sqlite"));
            env.push(("JETSAGA_DB".into(), db.display().to_string()));
            env.push(("JETSAGA_SEED".into(), seed_path.display().to_string()));
            env.extend(dev::credentials(svc));
            services.push(Proc::spawn(
                svc,
                path,
                vec![],
                env,
                opts.dir.join(format!("{svc}.log")),
            ));
        }
        let client = dev::connect_as(&nats.url(), "admin").await?;
        let js = jetstream::new(client.clone());
        let sys = System {
            orchestrator,
            services,
            client,
            js,
            nats_pid,
            nats,
        };
        sys.wait_ready().await?;
        Ok(sys)
    }

    /// Every process to account for, the benchmark itself last.
    pub fn watched(&self) -> Vec<Watched> {
        let mut w = vec![Watched {
            name: "nats-server".into(),
            pid: Pid::Child(self.nats_pid),
        }];
        if let Some(p) = self.orchestrator.pid() {
            w.push(Watched {
                name: "orchestrator".into(),
                pid: Pid::Child(p),
            });
        }
        for s in &self.services {
            if let Some(p) = s.pid() {
                w.push(Watched {
                    name: s.name.clone(),
                    pid: Pid::Child(p),
                });
            }
        }
        w.push(Watched {
            name: "bench (load generator)".into(),
            pid: Pid::This,
        });
        w
    }

    pub fn orchestrator_pid(&self) -> Option<Pid> {
        self.orchestrator.pid().map(Pid::Child)
    }

    /// Waits until every durable consumer exists and every service answers a query.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let mut wanted: Vec<(&str, String)> = vec![
            (
                topology::REQUESTS_STREAM,
                topology::ORCHESTRATOR_REQUESTS_CONSUMER.to_string(),
            ),
            (
                topology::REPLIES_STREAM,
                topology::ORCHESTRATOR_REPLIES_CONSUMER.to_string(),
            ),
        ];
        for s in SERVICES {
            wanted.push((topology::COMMANDS_STREAM, topology::service_consumer(s)));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for (stream, name) in wanted {
            while self
                .js
                .get_consumer_from_stream::<consumer::pull::Config, _, _>(&name, stream)
                .await
                .is_err()
            {
                if tokio::time::Instant::now() > deadline {
                    bail!("consumer {name} on {stream} never appeared (logs in the work dir)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for (svc, what, req) in [
            ("order", "status", json!({"order_id": "none"})),
            ("payment", "balance", json!({"customer_id": "c-0"})),
            ("inventory", "stock", json!({"sku": "sku-0"})),
        ] {
            loop {
                let got = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.client
                        .request(protocol::query_subject(svc, what), req.to_string().into()),
                )
                .await;
                if matches!(got, Ok(Ok(_))) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("{svc} never answered queries (logs in the work dir)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// `(messages, bytes, last_sequence)` of a stream.
    pub async fn stream_state(&self, name: &str) -> anyhow::Result<(u64, u64, u64)> {
        let info = self.js.get_stream(name).await?.get_info().await?;
        Ok((
            info.state.messages,
            info.state.bytes,
            info.state.last_sequence,
        ))
    }

    /// Whether every process is still running.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if !self.orchestrator.is_running() {
            bail!(
                "the orchestrator died; see {}",
                self.orchestrator.log.display()
            );
        }
        for s in &mut self.services {
            if !s.is_running() {
                bail!("service {} died; see {}", s.name, s.log.display());
            }
        }
        Ok(())
    }
}
