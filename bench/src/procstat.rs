//! CPU time and memory of a process, read from `/proc` (Linux only): `utime + stime` from
//! `/proc/<pid>/stat` in clock ticks, and `VmRSS`/`VmHWM` (peak RSS) from `/proc/<pid>/status`.
//!
//! The benchmark samples every process it started (and itself) before and after each phase, so
//! CPU is charged to the phase that spent it.

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every common Linux).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Which process: a child by pid, or the benchmark itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    Child(u32),
    This,
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Child(p) => format!("/proc/{p}"),
            Pid::This => "/proc/self".to_string(),
        }
    }
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub hwm_kib: u64,
}

/// Reads `pid`; `None` if it is gone.
pub fn sample(pid: Pid) -> Option<Sample> {
    let dir = pid.dir();
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields after its closing paren start at
    // field 3 (state), so utime (14) and stime (15) are at 11 and 12 from there.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Sample {
        cpu_secs: ticks as f64 / clk_tck(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Machine-wide CPU seconds so far: `(busy, steal)` summed over all cores, from `/proc/stat`.
/// Busy minus what the benchmark's own processes used is what *other* processes took — the
/// noise in a shared machine's numbers.
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy as f64 / clk_tck(), get(7) as f64 / clk_tck())
}

/// The pid of the `nats-server` listening on `port` (the test kit does not expose its child's
/// pid, so it is found by its command line).
pub fn find_nats_server(port: u16) -> Option<u32> {
    let want = port.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let is_server = args.first().is_some_and(|a| a.ends_with(b"nats-server"));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == want.as_bytes());
        if is_server && on_port {
            return Some(pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_itself() {
        let s = sample(Pid::This).expect("/proc/self");
        assert!(s.rss_kib > 0);
        assert!(s.hwm_kib >= s.rss_kib);
        assert!(clk_tck() > 0.0);
    }
}
