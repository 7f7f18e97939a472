//! `jetsaga-chaos`: the chaos suite. It starts a real topology — nats-server (one node, or a
//! 3-node JetStream cluster), two orchestrators and the three services, each a separate process
//! of the real binaries — drives a bounded, seeded load of sagas with mixed expected outcomes
//! while it injects faults at random moments (SIGKILL and restart of every process and of the
//! broker, duplicated commands, slow and flaky participants), then stops the faults, waits for
//! quiescence and checks the invariants against the `sagas` bucket and the services' own stores.
//! It prints a report and exits 1 on any violated invariant (2 if the run itself failed).
//!
//! Replay a run with the printed `--seed` (the plan — sagas, faults, their order and lengths — is
//! the same; the exact interleaving with the processes is not).

mod check;
mod collect;
mod faults;
mod load;
mod plan;
mod system;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use jetsaga_common::topology;
use tokio::sync::Mutex;

use crate::{
    faults::{Duplicator, Shared},
    load::Tracker,
    system::{Mode, Scenario, Settings, System},
};

/// jetsaga's chaos suite: real processes, injected faults, invariants checked at the end.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// Broker topology: one nats-server, or a 3-node JetStream cluster (R3 streams and bucket).
    #[arg(long, value_enum, default_value_t = Scenario::Single)]
    scenario: Scenario,
    /// Sagas to run.
    #[arg(long, default_value_t = 300)]
    sagas: usize,
    /// Faults to inject, cycling through every kind (6 kinds).
    #[arg(long, default_value_t = 18)]
    faults: usize,
    /// Seed of every random choice [default: from the clock; printed either way].
    #[arg(long)]
    seed: Option<u64>,
    /// Most sagas submitted and not yet finished at once.
    #[arg(long, default_value_t = 100)]
    in_flight: usize,
    /// Step timeout of the chaos definition (a slow participant sleeps 1.5x this per batch).
    #[arg(long, default_value_t = 3000)]
    step_timeout_ms: u64,
    /// Ack wait of the orchestrators' consumers: short, so inputs are redelivered often.
    #[arg(long, default_value_t = 2)]
    orchestrator_ack_wait_secs: u64,
    /// Longest wait for quiescence after the faults stop.
    #[arg(long, default_value_t = 180)]
    quiesce_secs: u64,
    /// Directory for the run's logs, databases and report [default: a new temp dir, removed
    /// after a clean run unless --keep].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the run directory even after a clean run.
    #[arg(long)]
    keep: bool,
    /// Where the jetsaga binaries are [default: next to this executable].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Start both orchestrators and the services at once instead of the first orchestrator
    /// alone (on a cluster this meets the concurrent stream-creation timeouts described in
    /// RELIABILITY.md).
    #[arg(long)]
    concurrent_start: bool,
    /// On a cluster, pass every process the whole comma-separated node list in NATS_URL
    /// instead of one node each (the processes then fail at start unless their NATS connect
    /// splits the list; see RELIABILITY.md).
    #[arg(long)]
    nats_url_list: bool,
    /// Skip the last phase (switch the compensation failures off, `retry` every stuck saga,
    /// check again that all are compensated).
    #[arg(long)]
    no_retry_stuck: bool,
    /// RUST_LOG of the processes.
    #[arg(long, default_value = "info")]
    rust_log: String,
}

/// Connects the suite's own client (reconnecting forever, like the processes) as the `admin`
/// development user of `nats.conf`: it submits orders, sends operator commands, reads the
/// bucket, taps `saga.cmd.>` and queries the services (a server without authorization, like
/// the test cluster's, ignores the credentials).
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    connect_as(url, "admin").await
}

/// Connects as one of `nats.conf`'s development users.
pub async fn connect_as(url: &str, user: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::with_user_and_password(
        user.into(),
        jetsaga_common::dev::password(user),
    )
    .name(format!("jetsaga-chaos-{user}"))
    .retry_on_initial_connect()
    .max_reconnects(None)
    .connect(url)
    .await
    .with_context(|| format!("connect to {url}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let holder: Arc<std::sync::Mutex<Option<Shared>>> = Arc::default();
    let result = tokio::select! {
        r = run(args, holder.clone()) => r,
        () = signal() => Err(anyhow!("interrupted")),
    };
    // On every path — Ctrl-C included, where `run` was dropped mid-way — kill every child.
    let sys = holder.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(sys) = sys {
        sys.lock().await.shutdown();
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("jetsaga-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// One whole run; `Ok(true)` if every invariant held.
async fn run(args: Args, holder: Arc<std::sync::Mutex<Option<Shared>>>) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1)
    });
    let nodes = match args.scenario {
        Scenario::Single => 1,
        Scenario::Cluster => 3,
    };
    let plan = plan::build(seed, args.sagas, args.faults, nodes);
    let (dir, temp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), false)
        }
        None => {
            let d = std::env::temp_dir().join(format!(
                "jetsaga-chaos-{}-{seed}-{}",
                args.scenario.name(),
                std::process::id()
            ));
            std::fs::create_dir_all(&d)?;
            (d, true)
        }
    };
    println!(
        "jetsaga-chaos: scenario {} seed {seed} sagas {} faults {} (replay: --scenario {} --seed {seed} --sagas {} --faults {})",
        args.scenario.name(),
        args.sagas,
        args.faults,
        args.scenario.name(),
        args.sagas,
        args.faults
    );
    println!("run directory: {}", dir.display());

    let definition = dir.join("chaos-order.json");
    std::fs::write(
        &definition,
        serde_json::to_string_pretty(&system::chaos_definition(args.step_timeout_ms))?,
    )?;
    let seed_file = dir.join("seed.json");
    std::fs::write(&seed_file, plan.seed_data.to_json().to_string())?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has a directory")?
            .to_path_buf(),
    };
    let settings = Settings {
        scenario: args.scenario,
        bin_dir,
        dir: dir.clone(),
        definition,
        seed_file,
        orchestrator_ack_wait_secs: args.orchestrator_ack_wait_secs,
        rust_log: args.rust_log.clone(),
        nats_url_list: args.nats_url_list,
    };

    let (sys, client) = System::start(settings).await?;
    let sys: Shared = Arc::new(Mutex::new(sys));
    *holder.lock().unwrap_or_else(|e| e.into_inner()) = Some(sys.clone());
    let js = jetstream::new(client.clone());
    // Supervised from the start: a process that dies while the system comes up is reported
    // (and restarted) like any other.
    let exits = Arc::new(Mutex::new(Vec::new()));
    let mut background = tokio::task::JoinSet::new();
    background.spawn(faults::supervise(
        sys.clone(),
        exits.clone(),
        t0,
        Duration::from_millis(500),
    ));
    if args.concurrent_start {
        sys.lock().await.start_all_now();
    }
    system::wait_orchestrators(&js, Duration::from_secs(90)).await?;
    sys.lock().await.start_rest();
    system::wait_ready(&client, &js, Duration::from_secs(90)).await?;
    let started = t0.elapsed();
    println!("[{:7.1}s] system ready", started.as_secs_f64());

    let ids: Arc<Vec<String>> = Arc::new(plan.sagas.iter().map(|s| s.id.clone()).collect());
    let tracker = Arc::new(Tracker::default());
    let dup = Duplicator::new();
    background.spawn(load::watch(js.clone(), tracker.clone()));
    background.spawn(load::poll(
        js.clone(),
        tracker.clone(),
        ids.clone(),
        Duration::from_secs(3),
    ));
    {
        // Only the orchestrator user may publish commands: the duplicates go out as a second,
        // confused orchestrator would send them. The tap itself is the admin's read-only one.
        let url = sys.lock().await.broker.url_for(1);
        let publisher = jetstream::new(connect_as(&url, "orchestrator").await?);
        let (dup, client, js) = (dup.clone(), client.clone(), publisher);
        background.spawn(async move {
            if let Err(e) = dup.run(client, js, seed).await {
                println!("warning: duplicator stopped: {e}");
            }
        });
    }

    // Load and faults together: the load is paced to last as long as the fault phase.
    let phase = plan.fault_phase();
    let interval = if plan.sagas.is_empty() {
        Duration::ZERO
    } else {
        phase / plan.sagas.len() as u32
    };
    println!(
        "[{:7.1}s] load: {} sagas, one every {:?}, at most {} in flight; faults: {} over ~{:.0} s",
        t0.elapsed().as_secs_f64(),
        plan.sagas.len(),
        interval,
        args.in_flight,
        plan.faults.len(),
        phase.as_secs_f64()
    );
    let sagas = Arc::new(plan.sagas.clone());
    let submit = tokio::spawn(load::submit(
        js.clone(),
        tracker.clone(),
        sagas,
        interval,
        args.in_flight,
    ));
    let fault_run = tokio::spawn(faults::run(
        sys.clone(),
        plan.faults.clone(),
        dup.clone(),
        js.clone(),
        args.step_timeout_ms,
        t0,
    ));
    let injected = fault_run.await.context("fault task")?;
    let faults_end = Instant::now();
    println!("[{:7.1}s] faults done", t0.elapsed().as_secs_f64());
    submit.await.context("submit task")??;
    println!(
        "[{:7.1}s] all {} sagas submitted",
        t0.elapsed().as_secs_f64(),
        plan.sagas.len()
    );

    // Restore: no more duplicates, every process healthy.
    dup.percent.store(0, Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(10);
    while dup.pending.load(Ordering::Relaxed) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let mut s = sys.lock().await;
        let slow: Vec<String> = s
            .members
            .iter()
            .filter(|(_, m)| matches!(m.mode, Mode::Slow { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        for name in slow {
            s.start_member(&name, Mode::Healthy);
        }
    }

    // Quiescence: every saga terminal or parked, and nothing left in the command and reply
    // streams (late duplicates and timed-out commands processed too).
    let deadline = Instant::now() + Duration::from_secs(args.quiesce_secs);
    let mut last_print = Instant::now();
    loop {
        let left = tracker.unfinished(ids.iter().map(String::as_str));
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            println!(
                "quiescence not reached in {} s: {} sagas unfinished (first: {:?})",
                args.quiesce_secs,
                left.len(),
                &left[..left.len().min(10)]
            );
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!(
                "[{:7.1}s] waiting for {} unfinished sagas",
                t0.elapsed().as_secs_f64(),
                left.len()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = wait_drained(&js, deadline.max(Instant::now() + Duration::from_secs(30))).await;
    let quiescence = faults_end.elapsed();
    println!(
        "[{:7.1}s] quiescent after {:.1} s{}",
        t0.elapsed().as_secs_f64(),
        quiescence.as_secs_f64(),
        if drained {
            ""
        } else {
            " (streams NOT drained)"
        }
    );

    let kv = load::bucket(&js).await;
    let snap = collect::snapshot(&client, &kv, &ids, &dir).await?;
    let (mut violations, stats) = check::check(&plan.seed_data, &plan.sagas, &snap, false);
    if !drained {
        violations.push(check::Violation {
            invariant: "quiescence",
            detail: "commands or replies still pending after the wait".into(),
            sagas: vec![],
        });
    }

    // Phase 2: the operator path. Switch the injected compensation failures off, `retry` every
    // stuck saga through `saga.ops.<id>`, and check everything again: now every saga must be
    // terminal, the formerly stuck ones compensated.
    let stuck: Vec<String> = snap
        .states
        .iter()
        .filter(|(_, v)| v["status"] == "stuck")
        .map(|(k, _)| k.clone())
        .collect();
    let mut retry_line = None;
    if !args.no_retry_stuck && !stuck.is_empty() {
        let t = Instant::now();
        println!(
            "[{:7.1}s] operator retry of {} stuck sagas (compensation failures switched off)",
            t0.elapsed().as_secs_f64(),
            stuck.len()
        );
        sys.lock().await.heal_compensations();
        system::wait_ready(&client, &js, Duration::from_secs(90)).await?;
        for id in &stuck {
            jetsaga_common::nats::publish(
                &js,
                topology::ops_subject(id),
                &format!("chaos-retry-{id}"),
                async_nats::HeaderMap::new(),
                br#"{"command":"retry"}"#.to_vec().into(),
            )
            .await
            .with_context(|| format!("retry {id}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(args.quiesce_secs);
        loop {
            let mut open = 0;
            for id in &stuck {
                let status = kv
                    .get(id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["status"].as_str().map(str::to_string));
                if !matches!(status.as_deref(), Some("completed" | "compensated")) {
                    open += 1;
                }
            }
            if open == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let drained = wait_drained(&js, Instant::now() + Duration::from_secs(30)).await;
        let snap2 = collect::snapshot(&client, &kv, &ids, &dir).await?;
        let (after, _) = check::check(&plan.seed_data, &plan.sagas, &snap2, true);
        let mut outcome: BTreeMap<String, usize> = BTreeMap::new();
        for id in &stuck {
            let st = snap2
                .states
                .get(id)
                .and_then(|v| v["status"].as_str())
                .unwrap_or("missing");
            *outcome.entry(st.to_string()).or_insert(0) += 1;
        }
        let seen: std::collections::HashSet<(&str, String)> = violations
            .iter()
            .map(|v| (v.invariant, v.detail.clone()))
            .collect();
        let fresh: Vec<check::Violation> = after
            .into_iter()
            .filter(|v| !seen.contains(&(v.invariant, v.detail.clone())))
            .map(|v| check::Violation {
                detail: format!("after the operator retry: {}", v.detail),
                ..v
            })
            .collect();
        violations.extend(fresh);
        if !drained {
            violations.push(check::Violation {
                invariant: "quiescence",
                detail: "after the operator retry: commands or replies still pending".into(),
                sagas: vec![],
            });
        }
        let outcome: Vec<String> = outcome.iter().map(|(k, n)| format!("{k} {n}")).collect();
        retry_line = Some(format!(
            "operator retry: {} stuck sagas retried after switching the compensation failures off -> {} in {:.1} s; every invariant re-checked",
            stuck.len(),
            outcome.join(", "),
            t.elapsed().as_secs_f64()
        ));
    }

    background.abort_all();
    for e in exits.lock().await.iter() {
        violations.push(check::Violation {
            invariant: "no_crash",
            detail: format!(
                "{} exited on its own at {:.1} s; last log lines:\n{}",
                e.name, e.at_secs, e.log_tail
            ),
            sagas: vec![],
        });
    }

    let report = render(
        &args,
        &plan,
        retry_line.as_deref(),
        &stats,
        &injected,
        &dup,
        &snap,
        &violations,
        started,
        quiescence,
        t0.elapsed(),
    );
    println!("{report}");
    std::fs::write(dir.join("report.txt"), &report)?;
    {
        let mut s = sys.lock().await;
        s.shutdown();
        for (name, log) in s.broker.logs() {
            let _ = std::fs::copy(&log, dir.join(format!("{name}.log")));
        }
    }
    let clean = violations.is_empty();
    if clean && temp && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs, databases and report kept in {}", dir.display());
    }
    Ok(clean)
}

/// Waits until the services' and the orchestrators' request/reply consumers have nothing pending
/// or unacknowledged.
async fn wait_drained(js: &jetstream::Context, deadline: Instant) -> bool {
    let mut wanted = vec![
        (
            topology::REQUESTS_STREAM,
            topology::ORCHESTRATOR_REQUESTS_CONSUMER.to_string(),
        ),
        (
            topology::REPLIES_STREAM,
            topology::ORCHESTRATOR_REPLIES_CONSUMER.to_string(),
        ),
    ];
    for s in plan::SERVICES {
        wanted.push((topology::COMMANDS_STREAM, topology::service_consumer(s)));
    }
    'outer: loop {
        for (stream, name) in &wanted {
            let busy = match js
                .get_consumer_from_stream::<consumer::pull::Config, _, _>(name, stream)
                .await
            {
                Ok(mut c) => match c.info().await {
                    Ok(i) => i.num_pending > 0 || i.num_ack_pending > 0,
                    Err(_) => true,
                },
                Err(_) => true,
            };
            if busy {
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'outer;
            }
        }
        return true;
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    plan: &plan::Plan,
    retry_line: Option<&str>,
    stats: &check::Stats,
    injected: &faults::Injected,
    dup: &Duplicator,
    snap: &collect::Snapshot,
    violations: &[check::Violation],
    startup: Duration,
    quiescence: Duration,
    wall: Duration,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "== jetsaga chaos report ==");
    let _ = writeln!(
        o,
        "scenario {}  seed {}  sagas {}  faults {}  in-flight <= {}  step timeout {} ms  orchestrator ack wait {} s",
        args.scenario.name(),
        plan.seed,
        plan.sagas.len(),
        plan.faults.len(),
        args.in_flight,
        args.step_timeout_ms,
        args.orchestrator_ack_wait_secs
    );
    let _ = writeln!(o, "sagas by outcome:");
    for (status, n) in &stats.by_status {
        let _ = writeln!(o, "  {status:<12} {n}");
    }
    let _ = writeln!(o, "sagas by category -> outcome:");
    let mut by_cat: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((cat, status), n) in &stats.by_category {
        by_cat.entry(cat).or_default().push(format!("{status} {n}"));
    }
    for c in plan::Category::ALL {
        if let Some(v) = by_cat.get(c.name()) {
            let _ = writeln!(o, "  {:<10} {}", c.name(), v.join(", "));
        }
    }
    let _ = writeln!(o, "faults injected:");
    for kind in plan::FaultKind::KINDS {
        let n = injected.counts.get(kind).copied().unwrap_or(0);
        let extra = if kind == "duplicate_commands" {
            format!(
                "  ({} duplicate commands published, {} failed)",
                dup.published.load(Ordering::Relaxed),
                dup.failed.load(Ordering::Relaxed)
            )
        } else {
            String::new()
        };
        let _ = writeln!(o, "  {kind:<20} {n}{extra}");
    }
    let _ = writeln!(
        o,
        "barrier: {} hanging actions refused, {} null compensations; {} action retries, {} compensation retries",
        stats.hanging_actions_blocked,
        stats.null_compensations,
        stats.action_retries,
        stats.compensation_retries
    );
    let sources: Vec<String> = snap
        .sources
        .iter()
        .map(|(s, src)| format!("{s} via {src}"))
        .collect();
    let _ = writeln!(o, "stores read: {}", sources.join(", "));
    let _ = writeln!(
        o,
        "startup {:.1} s, time to quiescence {:.1} s, wall time {:.1} s",
        startup.as_secs_f64(),
        quiescence.as_secs_f64(),
        wall.as_secs_f64()
    );
    if let Some(line) = retry_line {
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o, "fault timeline:");
    for line in &injected.timeline {
        let _ = writeln!(o, "  {line}");
    }
    if violations.is_empty() {
        let _ = writeln!(o, "invariants: ALL HOLD");
    } else {
        let _ = writeln!(o, "invariants: {} VIOLATED", violations.len());
        for v in violations {
            let shown: Vec<&str> = v.sagas.iter().take(20).map(String::as_str).collect();
            let more = v.sagas.len().saturating_sub(shown.len());
            let _ = writeln!(
                o,
                "  VIOLATION {}: {} [{}{}]",
                v.invariant,
                v.detail,
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    o
}
