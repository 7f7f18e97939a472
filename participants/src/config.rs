//! What a participant needs to run: where NATS is, where its SQLite file is, its seed, its batch
//! size, how hard SQLite syncs, and the (off by default) fault injection used by chaos tests.
//! Binaries build it from the command line ([`crate::cli`]); tests build it directly.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use jetsaga_common::{
    nats::ConnectConfig,
    protocol::{Command, Op},
    topology,
};

use crate::seed::Seed;

/// SQLite's `PRAGMA synchronous` for the participant's database (always in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Synchronous {
    /// fsync the WAL at every commit: an acked reply survives an OS crash or power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: survives a process crash, may lose the last commits on an OS
    /// crash (and then the participant would answer a redelivered command anew).
    Normal,
    /// Never fsync. Benchmarks only.
    Off,
}

impl Synchronous {
    pub fn as_sql(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }
}

/// Fault injection for chaos tests. Off unless the environment turns it on:
/// - `JETSAGA_FAULT_RETRYABLE_PERCENT` (0-100): that share of *actions* is answered
///   `retryable_failure`;
/// - `JETSAGA_FAULT_RETRYABLE_FOR_MS`: if set, the share above applies only during the first that
///   many milliseconds after start, so "a participant answering retryable errors for a while"
///   heals by itself, without a restart;
/// - `JETSAGA_FAULT_FLAKY_PREFIX`: the *first attempt* of every action of a saga whose id starts
///   with this prefix is answered `retryable_failure` (the retry then runs normally), so such
///   sagas must complete with every step on attempt 2 or later;
/// - `JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX`: *every* compensation of a saga whose id starts
///   with this prefix is answered `retryable_failure`, so the orchestrator retries it per policy
///   and then parks the saga as `stuck`;
/// - `JETSAGA_FAULT_DELAY_MS`: sleep that long before each batch.
///
/// Injected failures are decided before the database is touched: nothing is recorded in the
/// barrier and no business row changes, exactly like a technical error that rolled back, so a
/// later attempt (or the same command after the fault is gone) runs normally.
pub struct Faults {
    pub retryable_percent: u8,
    /// Window after [`Faults::new`] in which `retryable_percent` applies; `None` means always.
    pub retryable_for: Option<Duration>,
    /// Saga-id prefix whose actions fail on their first attempt.
    pub flaky_prefix: Option<String>,
    /// Saga-id prefix whose compensations always fail.
    pub fail_compensation_prefix: Option<String>,
    pub delay: Duration,
    /// When the faults were set up: the process start, for `retryable_for`.
    started: Instant,
    rng: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::new(0, Duration::ZERO)
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("retryable_percent", &self.retryable_percent)
            .field("retryable_for", &self.retryable_for)
            .field("flaky_prefix", &self.flaky_prefix)
            .field("fail_compensation_prefix", &self.fail_compensation_prefix)
            .field("delay", &self.delay)
            .finish()
    }
}

impl Clone for Faults {
    fn clone(&self) -> Self {
        Faults {
            retryable_percent: self.retryable_percent,
            retryable_for: self.retryable_for,
            flaky_prefix: self.flaky_prefix.clone(),
            fail_compensation_prefix: self.fail_compensation_prefix.clone(),
            delay: self.delay,
            // A clone belongs to the same process run: keep its start, or the window would reopen.
            started: self.started,
            rng: AtomicU64::new(self.rng.load(Ordering::Relaxed)),
        }
    }
}

impl Faults {
    pub fn new(retryable_percent: u8, delay: Duration) -> Self {
        let seed = jetsaga_common::time::now_ms() | 1;
        Faults {
            retryable_percent: retryable_percent.min(100),
            retryable_for: None,
            flaky_prefix: None,
            fail_compensation_prefix: None,
            delay,
            started: Instant::now(),
            rng: AtomicU64::new(seed),
        }
    }

    /// Reads the variables; unset, empty or unparsable values mean "off".
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |name: &str| get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let text = |name: &str| {
            get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let percent = num("JETSAGA_FAULT_RETRYABLE_PERCENT").unwrap_or(0).min(100) as u8;
        let mut faults = Faults::new(
            percent,
            Duration::from_millis(num("JETSAGA_FAULT_DELAY_MS").unwrap_or(0)),
        );
        faults.retryable_for = num("JETSAGA_FAULT_RETRYABLE_FOR_MS").map(Duration::from_millis);
        faults.flaky_prefix = text("JETSAGA_FAULT_FLAKY_PREFIX");
        faults.fail_compensation_prefix = text("JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX");
        faults
    }

    pub fn is_active(&self) -> bool {
        self.retryable_percent > 0
            || !self.delay.is_zero()
            || self.flaky_prefix.is_some()
            || self.fail_compensation_prefix.is_some()
    }

    /// Whether the random share hits this action (xorshift; no need for a real RNG here). Outside
    /// the `retryable_for` window it never does.
    pub fn hit(&self) -> bool {
        if self.retryable_percent == 0 {
            return false;
        }
        if self
            .retryable_for
            .is_some_and(|w| self.started.elapsed() >= w)
        {
            return false;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % 100 < u64::from(self.retryable_percent)
    }

    /// The injected failure for `cmd`, if any: the reason to answer `retryable_failure` with,
    /// decided before the database is touched.
    pub fn injected(&self, cmd: &Command) -> Option<&'static str> {
        let prefixed =
            |p: &Option<String>| p.as_deref().is_some_and(|p| cmd.saga_id.starts_with(p));
        match cmd.op {
            Op::Compensation if prefixed(&self.fail_compensation_prefix) => {
                Some("injected fault (JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX)")
            }
            Op::Compensation => None,
            Op::Action if cmd.attempt <= 1 && prefixed(&self.flaky_prefix) => {
                Some("injected fault (JETSAGA_FAULT_FLAKY_PREFIX)")
            }
            Op::Action if self.hit() => Some("injected fault (JETSAGA_FAULT_RETRYABLE_PERCENT)"),
            Op::Action => None,
        }
    }
}

/// Everything [`crate::runtime::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: ConnectConfig,
    /// The SQLite file (created if missing).
    pub db: PathBuf,
    /// Applied with `INSERT OR IGNORE` at start; `None` leaves the tables as they are.
    pub seed: Option<Seed>,
    /// Most commands handled in one transaction (and pulled per request).
    pub batch: usize,
    pub synchronous: Synchronous,
    /// Stream and consumer settings; must match what the orchestrator reconciles.
    pub topology: topology::Settings,
    pub faults: Faults,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Config {
    /// Defaults for everything but the server and the database file.
    pub fn new(nats: ConnectConfig, db: impl Into<PathBuf>) -> Self {
        Config {
            nats,
            db: db.into(),
            seed: None,
            batch: 256,
            synchronous: Synchronous::Full,
            topology: topology::Settings::default(),
            faults: Faults::default(),
            metrics_addr: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(saga_id: &str, op: Op, attempt: u32) -> Command {
        Command {
            saga_id: saga_id.into(),
            kind: "order".into(),
            step: 1,
            step_name: "payment.deduct".into(),
            service: "payment".into(),
            action: "deduct".into(),
            op,
            attempt,
            input: serde_json::json!({}),
        }
    }

    fn from(vars: &[(&str, &str)]) -> Faults {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Faults::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn fault_share_is_roughly_right() {
        assert!(!Faults::default().hit());
        let f = Faults::new(30, Duration::ZERO);
        let hits = (0..10_000).filter(|_| f.hit()).count();
        assert!((2_000..4_000).contains(&hits), "{hits}");
        let all = Faults::new(100, Duration::ZERO);
        assert!((0..100).all(|_| all.hit()));
    }

    #[test]
    fn nothing_is_injected_by_default() {
        let f = from(&[]);
        assert!(!f.is_active());
        assert_eq!(f.injected(&cmd("stuck-1", Op::Compensation, 1)), None);
        assert_eq!(f.injected(&cmd("flaky-1", Op::Action, 1)), None);
        // Garbage and empty values are "off", never a crash.
        let f = from(&[
            ("JETSAGA_FAULT_RETRYABLE_PERCENT", "lots"),
            ("JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX", "  "),
        ]);
        assert!(!f.is_active());
    }

    #[test]
    fn compensations_of_the_prefix_always_fail() {
        let f = from(&[("JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX", "stuck-")]);
        assert!(f.is_active());
        for attempt in 1..20 {
            assert!(f
                .injected(&cmd("stuck-7", Op::Compensation, attempt))
                .is_some());
        }
        // Only compensations, only that prefix.
        assert_eq!(f.injected(&cmd("stuck-7", Op::Action, 1)), None);
        assert_eq!(f.injected(&cmd("ok-7", Op::Compensation, 1)), None);
        assert_eq!(f.injected(&cmd("xstuck-7", Op::Compensation, 1)), None);
    }

    #[test]
    fn flaky_prefix_fails_only_the_first_attempt_of_actions() {
        let f = from(&[("JETSAGA_FAULT_FLAKY_PREFIX", "flaky-")]);
        assert!(f.injected(&cmd("flaky-1", Op::Action, 1)).is_some());
        assert_eq!(f.injected(&cmd("flaky-1", Op::Action, 2)), None);
        assert_eq!(f.injected(&cmd("flaky-1", Op::Compensation, 1)), None);
        assert_eq!(f.injected(&cmd("ok-1", Op::Action, 1)), None);
    }

    #[test]
    fn retryable_share_can_be_limited_to_a_window_after_start() {
        let f = from(&[
            ("JETSAGA_FAULT_RETRYABLE_PERCENT", "100"),
            ("JETSAGA_FAULT_RETRYABLE_FOR_MS", "150"),
        ]);
        assert_eq!(f.retryable_for, Some(Duration::from_millis(150)));
        assert!(f.injected(&cmd("ok-1", Op::Action, 1)).is_some());
        // Compensations are never hit by the random share.
        assert_eq!(f.injected(&cmd("ok-1", Op::Compensation, 1)), None);
        // A clone is the same process run: same window.
        let c = f.clone();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(f.injected(&cmd("ok-1", Op::Action, 1)), None);
        assert!(!c.hit());
        // Without a window the share applies forever.
        let always = from(&[("JETSAGA_FAULT_RETRYABLE_PERCENT", "100")]);
        assert!(always.hit());
    }
}
