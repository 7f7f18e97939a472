//! `jetsaga-bench`: jetsaga's throughput and latency, measured end to end on the real release
//! binaries, next to the raw JetStream bound of the same saga pattern, in one run.
//!
//! For each scenario (`success`: every order succeeds; `mixed`: ~20% compensate) it starts a fresh
//! nats-server, the orchestrator and the three services as separate processes, runs a warm-up,
//! then sagas at concurrency 1, 16 and the saturating level, timing each saga from its request
//! publish to its terminal event, and charging CPU to each process per phase. Then the raw bound
//! (see `raw.rs`) on a fresh server. Prints a table; `--out` writes JSON. Children are killed on
//! exit, on error and on Ctrl-C/SIGTERM. Build first: `cargo build --release --workspace --bins`.

mod load;
mod procstat;
mod raw;
mod report;
mod system;

use std::{path::PathBuf, sync::Arc};

use clap::{Parser, ValueEnum};
use jetsaga_common::{testkit::workspace_root, time, topology};
use serde_json::json;

use crate::{
    load::{run_phase, Probe, Spec, Target},
    procstat::Sample,
    report::{ProcUsage, Ratio, Results, ScenarioResult, StreamCounts},
    system::{Options, Scenario, System, Watched},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    Success,
    Mixed,
}

/// Benchmarks jetsaga against the raw JetStream bound of its saga pattern.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// Sagas in the saturating phase.
    #[arg(long, default_value_t = 30_000)]
    sagas: u64,
    /// Sagas in flight in the saturating phase.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Sagas at concurrency 1.
    #[arg(long, default_value_t = 300)]
    sagas_c1: u64,
    /// Sagas at concurrency 16.
    #[arg(long, default_value_t = 3_000)]
    sagas_c16: u64,
    /// Warm-up sagas (at 64 in flight) before the measured phases; not reported in the ratio.
    #[arg(long, default_value_t = 1_000)]
    warmup: u64,
    /// Which jetsaga scenarios to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    scenario: Which,
    /// Do not measure the raw bound.
    #[arg(long)]
    skip_raw: bool,
    /// Only the raw bound (no jetsaga processes).
    #[arg(long, conflicts_with = "skip_raw")]
    raw_only: bool,
    /// Stop issuing new sagas in a phase after this many seconds (then drain).
    #[arg(long, default_value_t = 120.0)]
    max_secs: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print ratios (new / old) against the JSON of an earlier run.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// RUST_LOG of the orchestrator and the services (the shipped default is `info`).
    #[arg(long, default_value = "info")]
    rust_log: String,
    /// Extra environment for the jetsaga processes, e.g. `--env JETSAGA_SQLITE_SYNC=normal`.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Keep logs and databases here (default: a temporary dir, removed at exit).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Bytes of each raw KV state write (jetsaga's state is about this size).
    #[arg(long, default_value_t = 1_600)]
    raw_state_bytes: usize,
    /// Bytes of each raw command and reply (jetsaga's commands are about this size).
    #[arg(long, default_value_t = 400)]
    raw_message_bytes: usize,
    /// Orchestrator memory check instead of the benchmark: `--rss-sagas` sagas of the success
    /// scenario at `--inflight`, sampling the orchestrator's RSS and the bucket every `--rss-every`.
    #[arg(long)]
    rss_check: bool,
    #[arg(long, default_value_t = 1_000_000)]
    rss_sagas: u64,
    #[arg(long, default_value_t = 100_000)]
    rss_every: u64,
    /// Time cap of the memory check, in seconds.
    #[arg(long, default_value_t = 900.0)]
    rss_max_secs: f64,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Ctrl-C or SIGTERM drops `run`, and with it every process it started (their Drop kills them).
    tokio::select! {
        r = run(args) => r,
        () = shutdown_signal() => {
            eprintln!("interrupted: stopping every process the benchmark started");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn sync_interval() -> String {
    std::fs::read_to_string(workspace_root().join("nats.conf"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("sync_interval"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| "default (2m)".into())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started_at = time::rfc3339(time::now_ms());
    let tmp = tempfile::tempdir()?;
    let base = args
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let sqlite_sync = args
        .env
        .iter()
        .find(|(k, _)| k == "JETSAGA_SQLITE_SYNC")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "full".into());
    let settings = json!({
        "storage": "file", "replicas": 1, "sync_interval": sync_interval(),
        "sqlite_synchronous": sqlite_sync, "barrier": "on", "rust_log": args.rust_log,
        "extra_env": args.env, "inflight": args.inflight, "sagas": args.sagas,
        "sagas_c1": args.sagas_c1, "sagas_c16": args.sagas_c16, "warmup": args.warmup,
        "request_publish": "JetStream publish with Nats-Msg-Id, PubAck awaited off the critical path",
        "terminal_seen_by": "core subscription to saga.events.*.{completed,compensated,stuck}",
        "raw_state_bytes": args.raw_state_bytes, "raw_message_bytes": args.raw_message_bytes,
    });
    let mut results = Results {
        started_at,
        machine: report::machine(),
        versions: report::versions(),
        settings,
        scenarios: Vec::new(),
        ratios: Vec::new(),
        rss_check: None,
    };
    if args.rss_check {
        results.rss_check = Some(rss_check(&args, base.join("rss-check")).await?);
    } else {
        let scenarios: &[Scenario] = match (args.raw_only, args.scenario) {
            (true, _) => &[],
            (_, Which::All) => &[Scenario::Success, Scenario::Mixed],
            (_, Which::Success) => &[Scenario::Success],
            (_, Which::Mixed) => &[Scenario::Mixed],
        };
        for &sc in scenarios {
            eprintln!("== scenario {} ==", sc.name());
            results
                .scenarios
                .push(run_jetsaga(&args, sc, base.join(sc.name())).await?);
        }
        if !args.skip_raw {
            eprintln!("== raw bound ==");
            let raw = run_raw(&args).await?;
            let raw_rate = raw.saturation().map(|p| p.sagas_per_sec).unwrap_or(0.0);
            for s in &results.scenarios {
                if let Some(p) = s.saturation() {
                    results.ratios.push(Ratio {
                        scenario: s.scenario.clone(),
                        jetsaga_sagas_per_sec: p.sagas_per_sec,
                        raw_sagas_per_sec: raw_rate,
                        ratio: if raw_rate > 0.0 {
                            p.sagas_per_sec / raw_rate
                        } else {
                            0.0
                        },
                    });
                }
            }
            results.scenarios.push(raw);
        }
    }
    report::print(&results);
    if let Some(old) = &args.compare {
        if let Err(e) = report::compare(&results, old) {
            eprintln!("cannot compare with {}: {e}", old.display());
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
        eprintln!("results written to {}", out.display());
    }
    Ok(())
}

/// Warm-up, concurrency 1, 16 and the saturating level, with ids `<tag>-<phase>-<i>`.
fn phases(args: &Args, tag: &str) -> Vec<Spec> {
    let spec = |name: &str, short: &str, sagas: u64, inflight: usize| Spec {
        name: name.into(),
        prefix: format!("{tag}-{short}"),
        sagas,
        inflight,
        max_secs: args.max_secs,
        stall_secs: 45.0,
        milestone_every: None,
    };
    vec![
        spec("warmup", "w", args.warmup, 64),
        spec("c1", "c1", args.sagas_c1, 1),
        spec("c16", "c16", args.sagas_c16, 16),
        spec("saturation", "sat", args.sagas, args.inflight),
    ]
}

/// One sample per watched process, then the machine's `(busy, steal)` as a last pseudo-process.
fn samples(watched: &[Watched]) -> (Vec<Sample>, (f64, f64)) {
    let s = watched
        .iter()
        .map(|w| procstat::sample(w.pid).unwrap_or_default())
        .collect();
    (s, procstat::machine_cpu())
}

fn usage(
    watched: &[Watched],
    before: &(Vec<Sample>, (f64, f64)),
    after: &(Vec<Sample>, (f64, f64)),
    secs: f64,
    sagas: u64,
) -> Vec<ProcUsage> {
    let (before, (busy0, steal0)) = (&before.0, before.1);
    let (after, (busy1, steal1)) = (&after.0, after.1);
    let ours: f64 = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.cpu_secs - b.cpu_secs)
        .sum();
    let pseudo = |name: &str, cpu: f64| ProcUsage {
        process: name.into(),
        cpu_secs: cpu,
        cpu_us_per_saga: if sagas > 0 {
            cpu * 1e6 / sagas as f64
        } else {
            0.0
        },
        cores: if secs > 0.0 { cpu / secs } else { 0.0 },
        rss_mib: 0.0,
        peak_rss_mib: 0.0,
    };
    let mut out: Vec<ProcUsage> = watched
        .iter()
        .zip(before.iter().zip(after))
        .map(|(w, (b, a))| {
            let cpu = a.cpu_secs - b.cpu_secs;
            ProcUsage {
                process: w.name.clone(),
                cpu_secs: cpu,
                cpu_us_per_saga: if sagas > 0 {
                    cpu * 1e6 / sagas as f64
                } else {
                    0.0
                },
                cores: if secs > 0.0 { cpu / secs } else { 0.0 },
                rss_mib: a.rss_kib as f64 / 1024.0,
                peak_rss_mib: a.hwm_kib as f64 / 1024.0,
            }
        })
        .collect();
    out.push(pseudo("= all of the above", ours));
    out.push(pseudo("(other processes)", (busy1 - busy0 - ours).max(0.0)));
    out.push(pseudo("(steal)", steal1 - steal0));
    out
}

/// Runs `specs` in order; usage is charged for the last one.
async fn run_phases(
    target: Arc<Target>,
    notices: &mut load::Notices,
    specs: &[Spec],
    watched: &[Watched],
    probe: Option<&Probe>,
) -> (Vec<load::PhaseResult>, Vec<ProcUsage>) {
    let mut out = Vec::new();
    let mut used = Vec::new();
    for spec in specs {
        let before = samples(watched);
        let r = run_phase(target.clone(), notices, spec, probe).await;
        let after = samples(watched);
        used = usage(watched, &before, &after, r.secs, r.finished());
        eprintln!(
            "   {:<10} {:>7} sagas in {:>6.2} s = {:>6.0}/s  p50 {:.2} ms  p99 {:.2} ms  compensated {}  lost {}",
            r.name, r.finished(), r.secs, r.sagas_per_sec, r.latency.p50_ms, r.latency.p99_ms, r.compensated, r.lost
        );
        out.push(r);
    }
    (out, used)
}

async fn stream_counts(sys: &System, sagas: u64) -> anyhow::Result<StreamCounts> {
    let mut per_saga = Vec::new();
    for name in [
        topology::REQUESTS_STREAM,
        topology::COMMANDS_STREAM,
        topology::REPLIES_STREAM,
        topology::TIMERS_STREAM,
        topology::EVENTS_STREAM,
        topology::DLQ_STREAM,
    ] {
        let (_, _, last) = sys.stream_state(name).await?;
        per_saga.push((name.to_string(), last as f64 / sagas.max(1) as f64));
    }
    let (kv_messages, kv_bytes, _) = sys
        .stream_state(&format!("KV_{}", topology::SAGAS_BUCKET))
        .await?;
    Ok(StreamCounts {
        sagas,
        per_saga,
        kv_bytes,
        kv_messages,
        kv_bytes_per_saga: kv_bytes as f64 / kv_messages.max(1) as f64,
    })
}

fn options(args: &Args, dir: PathBuf) -> Options {
    Options {
        rust_log: args.rust_log.clone(),
        env: args.env.clone(),
        dir,
    }
}

async fn run_jetsaga(args: &Args, sc: Scenario, dir: PathBuf) -> anyhow::Result<ScenarioResult> {
    let mut sys = System::start(&options(args, dir.clone())).await?;
    let watcher = jetsaga_common::dev::connect_as(&sys.nats.url(), "admin").await?;
    let mut notices = load::watch_events(&watcher).await?;
    let target = Arc::new(Target {
        js: sys.js.clone(),
        subject: "orders.create".into(),
        body: Box::new(move |i, id| sc.order(i, id)),
    });
    let tag = &sc.name()[..1];
    let watched = sys.watched();
    let (phases, used) = run_phases(target, &mut notices, &phases(args, tag), &watched, None).await;
    sys.check_alive()?;
    for p in &phases {
        let expected = (0..p.issued).filter(|&i| sc.compensates(i)).count() as u64;
        if p.compensated != expected || p.stuck > 0 || p.lost > 0 {
            eprintln!(
                "   WARNING {}: {} compensated (expected {expected}), {} stuck, {} lost {:?}",
                p.name, p.compensated, p.stuck, p.lost, p.lost_ids
            );
        }
    }
    let total: u64 = phases.iter().map(|p| p.issued).sum();
    let streams = stream_counts(&sys, total).await?;
    Ok(ScenarioResult {
        scenario: sc.name().into(),
        phases,
        saturation_usage: used,
        streams,
        dir: dir.display().to_string(),
    })
}

async fn run_raw(args: &Args) -> anyhow::Result<ScenarioResult> {
    let (nats, nats_pid) =
        system::start_open_nats(&std::env::temp_dir().join("jetsaga-bench-raw"))?;
    let (_raw, mut notices) = raw::start(
        &nats.url(),
        args.inflight.max(256),
        raw::Sizes {
            state: args.raw_state_bytes,
            message: args.raw_message_bytes,
        },
    )
    .await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let target = Arc::new(Target {
        js: js.clone(),
        subject: raw::REQUEST_SUBJECT.into(),
        body: Box::new(|i, id| Scenario::Success.order(i, id)),
    });
    let watched = vec![
        Watched {
            name: "nats-server".into(),
            pid: procstat::Pid::Child(nats_pid),
        },
        Watched {
            name: "bench (raw client: all roles)".into(),
            pid: procstat::Pid::This,
        },
    ];
    let (phases, used) = run_phases(target, &mut notices, &phases(args, "r"), &watched, None).await;
    let total: u64 = phases.iter().map(|p| p.issued).sum();
    let mut per_saga = Vec::new();
    for name in ["RAW_REQUESTS", "RAW_COMMANDS", "RAW_REPLIES"] {
        let info = js.get_stream(name).await?.get_info().await?;
        per_saga.push((
            name.to_string(),
            info.state.last_sequence as f64 / total.max(1) as f64,
        ));
    }
    let kv = js
        .get_stream(format!("KV_{}", raw::KV_BUCKET))
        .await?
        .get_info()
        .await?;
    Ok(ScenarioResult {
        scenario: "raw".into(),
        phases,
        saturation_usage: used,
        streams: StreamCounts {
            sagas: total,
            per_saga,
            kv_bytes: kv.state.bytes,
            kv_messages: kv.state.messages,
            kv_bytes_per_saga: kv.state.bytes as f64 / kv.state.messages.max(1) as f64,
        },
        dir: String::new(),
    })
}

async fn rss_check(args: &Args, dir: PathBuf) -> anyhow::Result<ScenarioResult> {
    eprintln!(
        "== orchestrator memory check: up to {} sagas ==",
        args.rss_sagas
    );
    let mut sys = System::start(&options(args, dir.clone())).await?;
    let watcher = jetsaga_common::dev::connect_as(&sys.nats.url(), "admin").await?;
    let mut notices = load::watch_events(&watcher).await?;
    let target = Arc::new(Target {
        js: sys.js.clone(),
        subject: "orders.create".into(),
        body: Box::new(|i, id| Scenario::Success.order(i, id)),
    });
    let probe = Probe {
        orchestrator: sys.orchestrator_pid(),
        js: sys.js.clone(),
        kv_stream: format!("KV_{}", topology::SAGAS_BUCKET),
    };
    let specs = vec![Spec {
        name: "saturation".into(),
        prefix: "rss".into(),
        sagas: args.rss_sagas,
        inflight: args.inflight,
        max_secs: args.rss_max_secs,
        stall_secs: 45.0,
        milestone_every: Some(args.rss_every),
    }];
    let watched = sys.watched();
    let (phases, used) = run_phases(target, &mut notices, &specs, &watched, Some(&probe)).await;
    sys.check_alive()?;
    let total: u64 = phases.iter().map(|p| p.issued).sum();
    let streams = stream_counts(&sys, total).await?;
    Ok(ScenarioResult {
        scenario: "rss-check".into(),
        phases,
        saturation_usage: used,
        streams,
        dir: dir.display().to_string(),
    })
}
