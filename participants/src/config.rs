//! What a participant needs to run: where NATS is, where its SQLite file is, its seed, its batch
//! size, how hard SQLite syncs, and the (off by default) fault injection used by chaos tests.
//! Binaries build it from the command line ([`crate::cli`]); tests build it directly.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use jetsaga_common::{nats::ConnectConfig, topology};

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
///   `retryable_failure` before the database is touched (nothing recorded, so a retry runs);
/// - `JETSAGA_FAULT_DELAY_MS`: sleep that long before each batch.
#[derive(Default)]
pub struct Faults {
    pub retryable_percent: u8,
    pub delay: Duration,
    rng: AtomicU64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("retryable_percent", &self.retryable_percent)
            .field("delay", &self.delay)
            .finish()
    }
}

impl Clone for Faults {
    fn clone(&self) -> Self {
        Faults::new(self.retryable_percent, self.delay)
    }
}

impl Faults {
    pub fn new(retryable_percent: u8, delay: Duration) -> Self {
        let seed = jetsaga_common::time::now_ms() | 1;
        Faults {
            retryable_percent: retryable_percent.min(100),
            delay,
            rng: AtomicU64::new(seed),
        }
    }

    /// Reads the two variables; unset, empty or unparsable values mean "off".
    pub fn from_env() -> Self {
        let num = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let percent = num("JETSAGA_FAULT_RETRYABLE_PERCENT").min(100) as u8;
        Faults::new(
            percent,
            Duration::from_millis(num("JETSAGA_FAULT_DELAY_MS")),
        )
    }

    pub fn is_active(&self) -> bool {
        self.retryable_percent > 0 || !self.delay.is_zero()
    }

    /// Whether to fail this action (xorshift; no need for a real RNG here).
    pub fn hit(&self) -> bool {
        if self.retryable_percent == 0 {
            return false;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % 100 < u64::from(self.retryable_percent)
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_share_is_roughly_right() {
        assert!(!Faults::default().hit());
        let f = Faults::new(30, Duration::ZERO);
        let hits = (0..10_000).filter(|_| f.hit()).count();
        assert!((2_000..4_000).contains(&hits), "{hits}");
        let all = Faults::new(100, Duration::ZERO);
        assert!((0..100).all(|_| all.hit()));
    }
}
