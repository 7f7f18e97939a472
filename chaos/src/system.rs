//! The system under chaos: nats-server (one node, or a 3-node JetStream cluster), two
//! orchestrator processes and the three services, each a separate process of the real binaries
//! found next to `jetsaga-chaos`. It knows how to kill and restart each of them with a chosen
//! environment (healthy, slow, flaky), and every child dies when it is dropped or shut down.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use jetsaga_common::{
    dev, protocol,
    testkit::{NatsCluster, NatsServer, Proc},
    topology,
};
use serde_json::{json, Value};

use crate::plan::{FLAKY_PREFIX, ORCHESTRATORS, SERVICES, STUCK_PREFIX};

/// Which broker topology a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One nats-server, streams and bucket with 1 replica.
    Single,
    /// Three nats-servers in one JetStream cluster, streams and bucket with 3 replicas.
    Cluster,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Single => "single",
            Scenario::Cluster => "cluster",
        }
    }
}

pub enum Broker {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Broker {
    /// The URL process number `n` connects to. On a cluster the processes are spread over the
    /// nodes; each learns the others from the server (`connect_urls`) and fails over to them.
    /// (A comma-separated list would be better, but `jetsaga_common::nats::connect` hands
    /// `NATS_URL` to async-nats as one address.)
    pub fn url_for(&self, n: usize) -> String {
        match self {
            Broker::Single(s) => s.url(),
            Broker::Cluster(c) => c.url(n % c.size()),
        }
    }

    pub fn kill(&mut self, node: usize) {
        match self {
            Broker::Single(s) => s.kill(),
            Broker::Cluster(c) => c.kill(node),
        }
    }

    pub fn restart(&mut self, node: usize) {
        match self {
            Broker::Single(s) => s.restart(),
            Broker::Cluster(c) => c.restart(node),
        }
    }

    /// Server logs, for the run directory.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        match self {
            Broker::Single(s) => vec![("nats-server".into(), s.store.path().join("server.log"))],
            Broker::Cluster(c) => c
                .nodes
                .iter()
                .map(|n| (format!("nats-{}", n.name), n.log.clone()))
                .collect(),
        }
    }
}

/// How a process is started (healthy, or with a fault switched on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Healthy,
    Slow { delay_ms: u64 },
    Flaky { percent: u32, for_ms: u64 },
}

/// One of the five jetsaga processes.
pub struct Member {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    pub proc: Option<Proc>,
    pub mode: Mode,
}

impl Member {
    fn spawn(&mut self, mode: Mode) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let mut env = self.env.clone();
        match &mode {
            Mode::Healthy => {}
            Mode::Slow { delay_ms } => {
                env.push(("JETSAGA_FAULT_DELAY_MS".into(), delay_ms.to_string()))
            }
            Mode::Flaky { percent, for_ms } => {
                env.push((
                    "JETSAGA_FAULT_RETRYABLE_PERCENT".into(),
                    percent.to_string(),
                ));
                env.push(("JETSAGA_FAULT_RETRYABLE_FOR_MS".into(), for_ms.to_string()));
            }
        }
        self.proc = Some(Proc::spawn(
            &self.name,
            self.program.clone(),
            self.args.clone(),
            env,
            self.log.clone(),
        ));
        self.mode = mode;
    }

    /// SIGKILL; the process stays down until [`System::start_member`].
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Whether the process died without us killing it (and so must be reported and restarted).
    pub fn died(&mut self) -> bool {
        match &mut self.proc {
            Some(p) => !p.is_running(),
            None => false,
        }
    }

    /// The last `lines` log lines, backtrace frames left out (the error above them is what
    /// tells why a process died).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with("at ")
                    || t.split_once(": ")
                        .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit())))
            })
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// What the orchestrators and services are configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scenario: Scenario,
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub definition: PathBuf,
    pub seed_file: PathBuf,
    pub orchestrator_ack_wait_secs: u64,
    pub rust_log: String,
    /// On a cluster, give every process all node URLs, comma separated, in `NATS_URL` (needs a
    /// `connect` that splits the list; see RELIABILITY.md).
    pub nats_url_list: bool,
}

pub struct System {
    pub broker: Broker,
    /// orchestrator-0, orchestrator-1, order, payment, inventory.
    pub members: BTreeMap<String, Member>,
    /// Set by [`System::shutdown`]: nothing starts again after it (the supervisor may still run).
    stopped: bool,
}

pub fn orchestrator_name(i: usize) -> String {
    format!("orchestrator-{i}")
}

impl System {
    /// Starts the broker, waits until JetStream answers, then starts the orchestrators.
    pub async fn start(settings: Settings) -> anyhow::Result<(Self, async_nats::Client)> {
        let broker = match settings.scenario {
            Scenario::Single => Broker::Single(NatsServer::start()),
            Scenario::Cluster => {
                let dir = settings.dir.join("nats");
                Broker::Cluster(NatsCluster::start_in(3, &dir))
            }
        };
        let replicas = match settings.scenario {
            Scenario::Single => 1,
            Scenario::Cluster => 3,
        };
        let client = crate::connect(&broker.url_for(0)).await?;
        let js = jetstream::new(client.clone());
        wait_for_jetstream(&js, Duration::from_secs(60)).await?;

        let url = |n: usize| match (&broker, settings.nats_url_list) {
            (Broker::Cluster(c), true) => c.urls(),
            _ => broker.url_for(n),
        };
        let base = |n: usize| -> Vec<(String, String)> {
            vec![
                ("NATS_URL".into(), url(n)),
                ("RUST_LOG".into(), settings.rust_log.clone()),
                ("JETSAGA_REPLICAS".into(), replicas.to_string()),
            ]
        };
        let mut members = BTreeMap::new();
        for i in 0..ORCHESTRATORS {
            let name = orchestrator_name(i);
            let mut env = base(i);
            // Each process as its own NATS user (ignored by a server without authorization).
            env.extend(dev::credentials("orchestrator"));
            env.push((
                "JETSAGA_ACK_WAIT_SECS".into(),
                settings.orchestrator_ack_wait_secs.to_string(),
            ));
            env.push(("JETSAGA_NAME".into(), format!("jetsaga-{name}")));
            members.insert(
                name.clone(),
                Member {
                    program: binary(&settings.bin_dir, "jetsaga-orchestrator")?,
                    args: vec![
                        "--definition".into(),
                        settings.definition.display().to_string(),
                    ],
                    env,
                    log: settings.dir.join(format!("{name}.log")),
                    name,
                    proc: None,
                    mode: Mode::Healthy,
                },
            );
        }
        for (k, svc) in SERVICES.iter().enumerate() {
            let mut env = base(ORCHESTRATORS + k);
            env.extend(dev::credentials(svc));
            env.push((
                "JETSAGA_DB".into(),
                settings
                    .dir
                    .join(format!("{svc}.sqlite"))
                    .display()
                    .to_string(),
            ));
            env.push((
                "JETSAGA_SEED".into(),
                settings.seed_file.display().to_string(),
            ));
            // Saga categories, not timed faults: always on.
            env.push((
                "JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX".into(),
                STUCK_PREFIX.into(),
            ));
            env.push(("JETSAGA_FAULT_FLAKY_PREFIX".into(), FLAKY_PREFIX.into()));
            members.insert(
                svc.to_string(),
                Member {
                    program: binary(&settings.bin_dir, &format!("jetsaga-{svc}"))?,
                    args: vec![],
                    env,
                    log: settings.dir.join(format!("{svc}.log")),
                    name: svc.to_string(),
                    proc: None,
                    mode: Mode::Healthy,
                },
            );
        }
        let mut sys = System {
            broker,
            members,
            stopped: false,
        };
        // The first orchestrator alone: it creates the streams and the bucket. The others and
        // the services follow once its consumers exist ([`System::start_rest`]): on a cluster,
        // two clients creating the same new R3 stream at once both get no answer from the
        // server (a 10 s API timeout each, see RELIABILITY.md), and the orchestrator does not
        // survive that at startup.
        sys.member(&orchestrator_name(0)).spawn(Mode::Healthy);
        Ok((sys, client))
    }

    /// Starts the other orchestrators and the three services (after the first one is up), or
    /// everything not started yet.
    pub fn start_rest(&mut self) {
        let names: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.proc.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.start_member(&name, Mode::Healthy);
        }
    }

    /// Switches the injected compensation failures off: every service restarts without
    /// `JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX` (and stays so for any later restart).
    pub fn heal_compensations(&mut self) {
        for svc in SERVICES {
            let m = self.member(svc);
            m.env
                .retain(|(k, _)| k != "JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX");
            self.start_member(svc, Mode::Healthy);
        }
    }

    /// Starts every member at once (the orchestrators race to create the topology).
    pub fn start_all_now(&mut self) {
        self.start_rest();
    }

    pub fn member(&mut self, name: &str) -> &mut Member {
        self.members.get_mut(name).expect("known member")
    }

    /// (Re)starts a member in `mode`, SIGKILLing its current process first.
    pub fn start_member(&mut self, name: &str, mode: Mode) {
        if !self.stopped {
            self.member(name).spawn(mode);
        }
    }

    /// Kills every child: the jetsaga processes first (so they do not log a storm of
    /// reconnects), then the broker.
    pub fn shutdown(&mut self) {
        self.stopped = true;
        for m in self.members.values_mut() {
            m.kill();
        }
        match &mut self.broker {
            Broker::Single(s) => s.kill(),
            Broker::Cluster(c) => {
                for i in 0..c.size() {
                    c.kill(i);
                }
            }
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, \
             add --release for a full run)",
            p.display()
        );
    }
    Ok(p)
}

/// Waits until JetStream answers an account-info request (on a cluster: a meta leader exists).
pub async fn wait_for_jetstream(js: &jetstream::Context, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), js.query_account()).await {
            Ok(Ok(_)) => return Ok(()),
            other => {
                if tokio::time::Instant::now() > deadline {
                    bail!("JetStream not ready after {timeout:?}: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits until the orchestrators' durable consumers exist (the streams and bucket with them).
pub async fn wait_orchestrators(js: &jetstream::Context, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    for (stream, name) in [
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
    ] {
        while js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(name, stream)
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("consumer {name} on {stream} never appeared");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Waits until every durable consumer exists and every service answers a query.
pub async fn wait_ready(
    client: &async_nats::Client,
    js: &jetstream::Context,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wanted: Vec<(&str, String)> = vec![
        (
            topology::REQUESTS_STREAM,
            topology::ORCHESTRATOR_REQUESTS_CONSUMER.into(),
        ),
        (
            topology::REPLIES_STREAM,
            topology::ORCHESTRATOR_REPLIES_CONSUMER.into(),
        ),
        (
            topology::TIMERS_STREAM,
            topology::ORCHESTRATOR_TIMERS_CONSUMER.into(),
        ),
    ];
    for s in SERVICES {
        wanted.push((topology::COMMANDS_STREAM, topology::service_consumer(s)));
    }
    for (stream, name) in wanted {
        while js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(&name, stream)
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("consumer {name} on {stream} never appeared");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for svc in SERVICES {
        loop {
            let got = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(protocol::query_subject(svc, "queries"), "{}".into()),
            )
            .await;
            if matches!(got, Ok(Ok(_))) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{svc} never answered queries");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// A query to a service, its answer parsed; an `{"error": ...}` answer is an error.
pub async fn query(
    client: &async_nats::Client,
    svc: &str,
    what: &str,
    req: Value,
) -> anyhow::Result<Value> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(protocol::query_subject(svc, what), req.to_string().into()),
    )
    .await
    .with_context(|| format!("{svc} {what}: no answer in 10 s"))?
    .with_context(|| format!("{svc} {what}"))?;
    let v: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(e) = v.get("error") {
        bail!("{svc} {what}: {e}");
    }
    Ok(v)
}

/// The chaos copy of the order definition: short step timeouts, so a slow participant blows
/// them, and small back-offs, so retries and parking happen within a run. Compensations get a
/// budget that outlasts any single fault window (about 13 s of back-off plus the timeouts of
/// the attempts), so only the sagas whose compensation is made to fail forever end stuck.
pub fn chaos_definition(step_timeout_ms: u64) -> Value {
    let mut def: Value =
        serde_json::from_str(include_str!("../../orchestrator/definitions/order.json"))
            .expect("the built-in definition is JSON");
    for step in def["steps"].as_array_mut().expect("steps") {
        step["timeout_ms"] = json!(step_timeout_ms);
        step["retry"] = json!({
            "max_attempts": 4, "initial_backoff_ms": 100, "max_backoff_ms": 800,
            "multiplier": 2.0, "jitter": 0.2
        });
        step["compensation_retry"] = json!({
            "max_attempts": 12, "initial_backoff_ms": 200, "max_backoff_ms": 1500,
            "multiplier": 2.0, "jitter": 0.2
        });
    }
    def
}
