//! Carrying out the fault plan against the running system, one fault at a time (each is undone
//! before the next starts, so every fault's effect can be told apart), plus two helpers that
//! run beside it: the duplicator, which republishes commands under new message ids so that
//! participants really receive duplicates (the stream's dedup window cannot drop them), and the
//! supervisor, which restarts — and reports — any process that died without being killed.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_nats::{jetstream, HeaderMap};
use futures::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::{
    plan::{Fault, FaultKind},
    system::{orchestrator_name, wait_for_jetstream, Mode, System},
};

pub type Shared = Arc<Mutex<System>>;

/// Header that marks a republished duplicate, so the duplicator does not duplicate its own.
const DUP_HEADER: &str = "Jetsaga-Chaos";
/// Most duplicates one run publishes (bounded, whatever the plan says).
const MAX_DUPLICATES: u64 = 100_000;
/// Longest delay before a late duplicate is republished.
const MAX_DUP_DELAY_MS: u64 = 2_000;

/// What was injected, for the report.
#[derive(Debug, Default)]
pub struct Injected {
    pub counts: BTreeMap<&'static str, usize>,
    /// One line per fault: when (seconds into the run) and what.
    pub timeline: Vec<String>,
}

/// Runs every fault of the plan in order. `t0` is the start of the run (for the timeline).
pub async fn run(
    sys: Shared,
    faults: Vec<Fault>,
    dup: Arc<Duplicator>,
    js: jetstream::Context,
    step_timeout_ms: u64,
    t0: Instant,
) -> Injected {
    let mut injected = Injected::default();
    for f in faults {
        tokio::time::sleep(f.gap_before).await;
        let at = t0.elapsed().as_secs_f64();
        println!("[{at:7.1}s] fault: {}", f.kind.describe());
        injected
            .timeline
            .push(format!("{at:7.1}s {}", f.kind.describe()));
        *injected.counts.entry(f.kind.kind()).or_insert(0) += 1;
        match f.kind {
            FaultKind::KillOrchestrator { index, down } => {
                kill_and_restart(&sys, &orchestrator_name(index), down).await
            }
            FaultKind::KillService { service, down } => kill_and_restart(&sys, service, down).await,
            FaultKind::KillNats { node, down } => {
                sys.lock().await.broker.kill(node);
                tokio::time::sleep(down).await;
                {
                    let mut s = sys.lock().await;
                    // Blocks until the port accepts connections (at most 10 s).
                    tokio::task::block_in_place(|| s.broker.restart(node));
                }
                // The next fault starts only once JetStream (on a cluster: a meta leader with
                // the node back) answers again.
                if let Err(e) = wait_for_jetstream(&js, Duration::from_secs(60)).await {
                    println!("warning: {e}");
                }
            }
            FaultKind::Duplicates { window, percent } => {
                dup.percent.store(percent, Ordering::Relaxed);
                tokio::time::sleep(window).await;
                dup.percent.store(0, Ordering::Relaxed);
            }
            FaultKind::Slow { service, window } => {
                // Above the step timeout: every command this process takes in the window times
                // out at the orchestrator before its reply arrives.
                let delay_ms = step_timeout_ms * 3 / 2;
                sys.lock()
                    .await
                    .start_member(service, Mode::Slow { delay_ms });
                tokio::time::sleep(window).await;
                sys.lock().await.start_member(service, Mode::Healthy);
            }
            FaultKind::Flaky { service, window } => {
                let for_ms = window.as_millis() as u64;
                sys.lock().await.start_member(
                    service,
                    Mode::Flaky {
                        percent: 50,
                        for_ms,
                    },
                );
                // It heals by itself when the window ends; no restart needed.
                tokio::time::sleep(window).await;
            }
        }
    }
    injected
}

async fn kill_and_restart(sys: &Shared, name: &str, down: Duration) {
    sys.lock().await.member(name).kill();
    tokio::time::sleep(down).await;
    sys.lock().await.start_member(name, Mode::Healthy);
}

/// Republishes a share of the commands it sees on `saga.cmd.>` (a plain core subscription, so
/// it sees every command the orchestrators publish) to JetStream under new message ids: the
/// stream stores them, so the participant really gets the same command again — at once, or up
/// to two seconds later, when the saga may have moved on (a late duplicate of an action after
/// its compensation is a hanging action for the barrier).
pub struct Duplicator {
    /// 0 = off.
    pub percent: AtomicU32,
    pub published: AtomicU64,
    pub failed: AtomicU64,
    pub pending: AtomicU64,
}

impl Duplicator {
    pub fn new() -> Arc<Self> {
        Arc::new(Duplicator {
            percent: AtomicU32::new(0),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        })
    }

    /// Runs forever, tapping `saga.cmd.>` only while a window is open (a fresh subscription per
    /// window, dropped when it closes, so between windows it costs the server nothing). `client`
    /// needs subscribe permission on `saga.cmd.>` (the `admin` user), `js` publish permission
    /// on it (the `orchestrator` user).
    pub async fn run(
        self: Arc<Self>,
        client: async_nats::Client,
        js: jetstream::Context,
        seed: u64,
    ) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xD0B1_E5ED);
        let mut n: u64 = 0;
        loop {
            while self.percent.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut sub = match client.subscribe("saga.cmd.>").await {
                Ok(s) => s,
                Err(e) => {
                    println!("warning: duplicator cannot subscribe: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let percent = self.percent.load(Ordering::Relaxed);
                if percent == 0 {
                    break;
                }
                let msg = match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break, // subscription closed: subscribe again
                    Err(_) => continue,
                };
                if msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(DUP_HEADER))
                    .is_some()
                    || rng.gen_range(0..100) >= percent
                {
                    continue;
                }
                let done =
                    self.published.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed);
                if done >= MAX_DUPLICATES {
                    continue;
                }
                n += 1;
                let delay = if rng.gen_bool(0.5) {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rng.gen_range(0..=MAX_DUP_DELAY_MS))
                };
                let mut headers = HeaderMap::new();
                headers.insert(DUP_HEADER, "duplicate");
                let id = format!("chaos-dup-{seed}-{n}");
                let (me, js) = (self.clone(), js.clone());
                me.pending.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let r = jetsaga_common::nats::publish(
                        &js,
                        msg.subject.to_string(),
                        &id,
                        headers,
                        msg.payload.clone(),
                    )
                    .await;
                    match r {
                        Ok(_) => me.published.fetch_add(1, Ordering::Relaxed),
                        Err(_) => me.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    me.pending.fetch_sub(1, Ordering::Relaxed);
                });
            }
            let _ = sub.unsubscribe().await;
        }
    }
}

/// A process that died without being killed by the chaos suite.
#[derive(Debug, Clone)]
pub struct UnexpectedExit {
    pub name: String,
    pub at_secs: f64,
    pub log_tail: String,
}

/// Every `period`, restarts (healthy) any member whose process died on its own, and records it.
pub async fn supervise(
    sys: Shared,
    exits: Arc<Mutex<Vec<UnexpectedExit>>>,
    t0: Instant,
    period: Duration,
) {
    loop {
        tokio::time::sleep(period).await;
        let mut s = sys.lock().await;
        let names: Vec<String> = s.members.keys().cloned().collect();
        for name in names {
            if s.member(&name).died() {
                let at = t0.elapsed().as_secs_f64();
                let tail = s.member(&name).log_tail(30);
                println!("[{at:7.1}s] {name} exited on its own; restarting it");
                exits.lock().await.push(UnexpectedExit {
                    name: name.clone(),
                    at_secs: at,
                    log_tail: tail,
                });
                s.start_member(&name, Mode::Healthy);
            }
        }
    }
}
