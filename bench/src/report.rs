//! What a run measured, as JSON (`--out`) for comparison between commits, and as the table the
//! benchmark prints.

use serde::Serialize;

use crate::load::PhaseResult;

/// CPU and memory of one process over one phase.
#[derive(Debug, Clone, Serialize)]
pub struct ProcUsage {
    pub process: String,
    /// CPU seconds (user + system) spent during the phase.
    pub cpu_secs: f64,
    /// CPU time per finished saga, in microseconds.
    pub cpu_us_per_saga: f64,
    /// Share of one core over the phase (1.0 = one core busy).
    pub cores: f64,
    /// RSS at the end of the phase and peak RSS (VmHWM) so far, in MiB.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// JetStream messages written per saga, per stream, and the bucket's size.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamCounts {
    pub sagas: u64,
    /// Stream name -> messages ever written (last sequence) per saga.
    pub per_saga: Vec<(String, f64)>,
    pub kv_bytes: u64,
    pub kv_messages: u64,
    pub kv_bytes_per_saga: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// `success`, `mixed` or `raw`.
    pub scenario: String,
    pub phases: Vec<PhaseResult>,
    /// Per-process usage during the saturating phase.
    pub saturation_usage: Vec<ProcUsage>,
    pub streams: StreamCounts,
    /// Work dir with this scenario's logs (kept only with `--work-dir`).
    pub dir: String,
}

impl ScenarioResult {
    pub fn saturation(&self) -> Option<&PhaseResult> {
        self.phases.iter().find(|p| p.name == "saturation")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    pub nats_server: String,
    pub rustc: String,
    pub async_nats: String,
    pub git: String,
    /// When the orchestrator binary under test was built (the tree may have moved on since).
    pub binaries_built: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub scenario: String,
    pub jetsaga_sagas_per_sec: f64,
    pub raw_sagas_per_sec: f64,
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub started_at: String,
    pub machine: Machine,
    pub versions: Versions,
    pub settings: serde_json::Value,
    pub scenarios: Vec<ScenarioResult>,
    pub ratios: Vec<Ratio>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_check: Option<ScenarioResult>,
}

fn cmd(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model,
        mem_total_mib,
        kernel: cmd("uname", &["-r"]),
    }
}

pub fn versions() -> Versions {
    let root = jetsaga_common::testkit::workspace_root();
    let root = root.to_string_lossy();
    let mut git = cmd("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let status = cmd(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    );
    if !status.is_empty() && status != "unknown" {
        git.push_str("-dirty");
    }
    let binaries_built =
        std::fs::metadata(jetsaga_common::testkit::bin_dir().join("jetsaga-orchestrator"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| jetsaga_common::time::rfc3339(d.as_millis() as u64))
            .unwrap_or_else(|| "unknown".into());
    let server = jetsaga_common::testkit::nats_server_bin();
    Versions {
        nats_server: cmd(&server.to_string_lossy(), &["--version"]),
        rustc: cmd("rustc", &["--version"]),
        async_nats: "0.51".into(),
        git,
        binaries_built,
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The human-readable table.
pub fn print(r: &Results) {
    println!();
    println!(
        "== jetsaga benchmark — {} — {} × {} — {} — git {} (binaries built {}) ==",
        r.started_at,
        r.machine.nproc,
        r.machine.cpu_model,
        r.versions.nats_server,
        r.versions.git,
        r.versions.binaries_built
    );
    println!(
        "{:<9} {:<11} {:>8} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "scenario",
        "phase",
        "inflight",
        "sagas",
        "secs",
        "sagas/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "comp."
    );
    for s in r.scenarios.iter().chain(r.rss_check.iter()) {
        for p in &s.phases {
            println!(
                "{:<9} {:<11} {:>8} {:>8} {:>7.2} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>6}{}",
                s.scenario,
                p.name,
                p.inflight,
                p.finished(),
                p.secs,
                p.sagas_per_sec,
                ms(p.latency.p50_ms),
                ms(p.latency.p90_ms),
                ms(p.latency.p99_ms),
                ms(p.latency.max_ms),
                p.compensated,
                if p.lost + p.stuck + p.publish_errors > 0 {
                    format!(
                        "  LOST {} STUCK {} PUBERR {}",
                        p.lost, p.stuck, p.publish_errors
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    for x in &r.ratios {
        println!(
            "ratio {}: jetsaga {:.0} / raw {:.0} sagas/s = {:.1}%",
            x.scenario,
            x.jetsaga_sagas_per_sec,
            x.raw_sagas_per_sec,
            100.0 * x.ratio
        );
    }
    for s in r.scenarios.iter().chain(r.rss_check.iter()) {
        println!();
        println!(
            "-- {}: processes during saturation (CPU over the phase; RSS at its end / peak) --",
            s.scenario
        );
        println!(
            "{:<24} {:>9} {:>7} {:>11} {:>9} {:>9}",
            "process", "cpu s", "cores", "cpu us/saga", "rss MiB", "peak MiB"
        );
        for u in &s.saturation_usage {
            println!(
                "{:<24} {:>9.2} {:>7.2} {:>11.0} {:>9.1} {:>9.1}",
                u.process, u.cpu_secs, u.cores, u.cpu_us_per_saga, u.rss_mib, u.peak_rss_mib
            );
        }
        let st = &s.streams;
        let counts: Vec<String> = st
            .per_saga
            .iter()
            .map(|(n, v)| format!("{n} {v:.2}"))
            .collect();
        println!(
            "messages per saga: {} | KV {} entries, {:.0} bytes/saga",
            counts.join(", "),
            st.kv_messages,
            st.kv_bytes_per_saga
        );
        for m in s.phases.iter().flat_map(|p| &p.milestones) {
            println!(
                "after {:>8} sagas ({:>6.1} s): orchestrator RSS {:>7.1} MiB (peak {:>7.1}), KV {} entries {:.1} MiB",
                m.sagas,
                m.secs,
                m.orchestrator_rss_kib as f64 / 1024.0,
                m.orchestrator_hwm_kib as f64 / 1024.0,
                m.kv_messages,
                m.kv_bytes as f64 / 1048576.0
            );
        }
    }
}

/// Prints this run against an earlier `--out` file: new/old for throughput, latency and CPU per
/// saga, per scenario and phase — the ratios an optimisation is judged by.
pub fn compare(new: &Results, old_path: &std::path::Path) -> anyhow::Result<()> {
    let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(old_path)?)?;
    let new = serde_json::to_value(new)?;
    println!();
    println!(
        "-- against {} (git {}, {}): new / old --",
        old_path.display(),
        old["versions"]["git"].as_str().unwrap_or("?"),
        old["started_at"].as_str().unwrap_or("?")
    );
    println!(
        "{:<10} {:<11} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "scenario", "phase", "sagas/s", "p50", "p99", "cpu/saga all", "cpu/saga orch"
    );
    let empty = Vec::new();
    let scenarios = |v: &serde_json::Value| v["scenarios"].as_array().cloned().unwrap_or_default();
    for ns in scenarios(&new) {
        let name = ns["scenario"].as_str().unwrap_or("?");
        let Some(os) = scenarios(&old)
            .into_iter()
            .find(|o| o["scenario"] == ns["scenario"])
        else {
            continue;
        };
        let ratio = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".to_string(),
        };
        let cpu = |s: &serde_json::Value, process: &str| {
            s["saturation_usage"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|u| u["process"] == process)
                .map(|u| u["cpu_us_per_saga"].clone())
                .unwrap_or_default()
        };
        for np in ns["phases"].as_array().unwrap_or(&empty) {
            let Some(op) = os["phases"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|p| p["name"] == np["name"])
            else {
                continue;
            };
            let saturation = np["name"] == "saturation";
            println!(
                "{:<10} {:<11} {:>9} {:>9} {:>9} {:>14} {:>14}",
                name,
                np["name"].as_str().unwrap_or("?"),
                ratio(&np["sagas_per_sec"], &op["sagas_per_sec"]),
                ratio(&np["latency"]["p50_ms"], &op["latency"]["p50_ms"]),
                ratio(&np["latency"]["p99_ms"], &op["latency"]["p99_ms"]),
                if saturation {
                    ratio(
                        &cpu(&ns, "= all of the above"),
                        &cpu(&os, "= all of the above"),
                    )
                } else {
                    String::new()
                },
                if saturation {
                    ratio(&cpu(&ns, "orchestrator"), &cpu(&os, "orchestrator"))
                } else {
                    String::new()
                },
            );
        }
    }
    Ok(())
}
