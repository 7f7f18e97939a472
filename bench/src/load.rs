//! The load generator: starts sagas with a bounded number in flight and times each one from its
//! publish to its terminal state.
//!
//! A phase issues `sagas` requests (JetStream publishes with `Nats-Msg-Id: req-<id>`, PubAcks
//! awaited off the critical path) while at most `inflight` are unfinished: a permit is taken
//! before each publish and given back when the saga's terminal notice arrives. Notices come from
//! a channel fed by whoever observes terminal states — a core subscription to jetsaga's terminal
//! events, or the raw bound's emulated orchestrator — so both targets are measured the same way.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_nats::{jetstream, HeaderMap};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::procstat::{self, Pid};

/// How a saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Compensated,
    Stuck,
}

/// A terminal state seen by an observer.
#[derive(Debug)]
pub struct Notice {
    pub id: String,
    pub outcome: Outcome,
    pub at: Instant,
}

pub type Notices = mpsc::UnboundedReceiver<Notice>;

/// Forwards jetsaga's terminal events (`saga.events.<id>.completed|compensated|stuck`) as
/// notices. A core subscription: one small message per saga, no consumer state on the server,
/// no JSON to parse (the id and the outcome are subject tokens) — far cheaper than a KV watch,
/// which would deliver every one of a saga's five state writes with the whole state.
pub async fn watch_events(client: &async_nats::Client) -> anyhow::Result<Notices> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut subs = Vec::new();
    for ev in ["completed", "compensated", "stuck"] {
        subs.push(client.subscribe(format!("saga.events.*.{ev}")).await?);
    }
    client.flush().await?;
    tokio::spawn(async move {
        let mut all = futures::stream::select_all(subs);
        while let Some(msg) = all.next().await {
            let at = Instant::now();
            let mut parts = msg.subject.as_str().split('.');
            let (Some(id), Some(ev)) = (parts.nth(2), parts.next()) else {
                continue;
            };
            let outcome = match ev {
                "completed" => Outcome::Completed,
                "compensated" => Outcome::Compensated,
                _ => Outcome::Stuck,
            };
            if tx
                .send(Notice {
                    id: id.to_string(),
                    outcome,
                    at,
                })
                .is_err()
            {
                break;
            }
        }
    });
    Ok(rx)
}

/// Makes the request body of saga number `i` with id `id`.
pub type BodyFn = Box<dyn Fn(u64, &str) -> Vec<u8> + Send + Sync>;

/// Where and what to publish to start a saga.
pub struct Target {
    pub js: jetstream::Context,
    pub subject: String,
    pub body: BodyFn,
}

/// One phase: how many sagas, how many in flight, for how long at most.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// Ids are `<prefix>-<i>`; must be unique per system.
    pub prefix: String,
    pub sagas: u64,
    pub inflight: usize,
    /// Stop issuing after this long (then wait for what is in flight).
    pub max_secs: f64,
    /// With no notice for this long, give up on what is still in flight.
    pub stall_secs: f64,
    /// Every this many finished sagas, sample the orchestrator's memory and the bucket.
    pub milestone_every: Option<u64>,
}

/// Memory and bucket size after a number of sagas.
#[derive(Debug, Clone, Serialize)]
pub struct Milestone {
    pub sagas: u64,
    pub secs: f64,
    pub orchestrator_rss_kib: u64,
    pub orchestrator_hwm_kib: u64,
    pub kv_bytes: u64,
    pub kv_messages: u64,
}

/// What to sample at milestones.
pub struct Probe {
    pub orchestrator: Option<Pid>,
    pub js: jetstream::Context,
    pub kv_stream: String,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Self {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        // Nearest rank: the smallest value with at least q of the samples at or below it.
        let at = |q: f64| {
            let rank = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len());
            us[rank - 1] as f64 / 1000.0
        };
        Latency {
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: *us.last().unwrap() as f64 / 1000.0,
            mean_ms: us.iter().sum::<u64>() as f64 / us.len() as f64 / 1000.0,
        }
    }
}

/// The outcome of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub name: String,
    pub inflight: usize,
    pub issued: u64,
    pub completed: u64,
    pub compensated: u64,
    pub stuck: u64,
    /// Issued but never seen terminal (stall): the first few ids are in `lost_ids`.
    pub lost: u64,
    pub lost_ids: Vec<String>,
    pub publish_errors: u64,
    /// From the first publish to the last terminal notice.
    pub secs: f64,
    /// Finished sagas (completed + compensated) per second over `secs`.
    pub sagas_per_sec: f64,
    pub latency: Latency,
    /// Sagas finished in each second of the phase.
    pub per_second: Vec<u64>,
    pub milestones: Vec<Milestone>,
}

impl PhaseResult {
    pub fn finished(&self) -> u64 {
        self.completed + self.compensated
    }
}

/// Runs one phase against `target`, reading terminal notices from `notices`.
pub async fn run_phase(
    target: Arc<Target>,
    notices: &mut Notices,
    spec: &Spec,
    probe: Option<&Probe>,
) -> PhaseResult {
    // Notices left over from an earlier phase (duplicates) must not count here.
    while notices.try_recv().is_ok() {}
    let sem = Arc::new(Semaphore::new(spec.inflight.max(1)));
    let starts: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let issuing_done = Arc::new(AtomicBool::new(false));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();

    let issuer = {
        let (sem, starts, stop, issued, done, errors) = (
            sem.clone(),
            starts.clone(),
            stop.clone(),
            issued.clone(),
            issuing_done.clone(),
            publish_errors.clone(),
        );
        let (prefix, n) = (spec.prefix.clone(), spec.sagas);
        tokio::spawn(async move {
            for i in 0..n {
                let Ok(permit) = sem.acquire().await else {
                    break;
                };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                permit.forget();
                let id = format!("{prefix}-{i}");
                let body = (target.body)(i, &id);
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("req-{id}").as_str());
                starts.lock().unwrap().insert(i, Instant::now());
                issued.fetch_add(1, Ordering::Relaxed);
                match target
                    .js
                    .publish_with_headers(target.subject.clone(), headers, body.into())
                    .await
                {
                    Ok(ack) => {
                        let errors = errors.clone();
                        tokio::spawn(async move {
                            if ack.await.is_err() {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            done.store(true, Ordering::Release);
        })
    };

    let mut lat_us = Vec::with_capacity(spec.sagas as usize);
    let (mut completed, mut compensated, mut stuck) = (0u64, 0u64, 0u64);
    let mut per_second: Vec<u64> = Vec::new();
    let mut milestones = Vec::new();
    let mut last_notice = Instant::now();
    let mut last_done_at = t0;
    let want_prefix = format!("{}-", spec.prefix);
    let stall = Duration::from_secs_f64(spec.stall_secs);
    let cap = Duration::from_secs_f64(spec.max_secs);
    loop {
        let finished = completed + compensated + stuck;
        if issuing_done.load(Ordering::Acquire) && finished >= issued.load(Ordering::Relaxed) {
            break;
        }
        if t0.elapsed() > cap {
            stop.store(true, Ordering::Relaxed);
        }
        let got = tokio::time::timeout(Duration::from_millis(200), notices.recv()).await;
        let notice = match got {
            Ok(Some(n)) => n,
            Ok(None) => break,
            Err(_) => {
                if last_notice.elapsed() > stall {
                    break;
                }
                continue;
            }
        };
        let Some(i) = notice
            .id
            .strip_prefix(&want_prefix)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(started) = starts.lock().unwrap().remove(&i) else {
            continue; // a duplicate event
        };
        last_notice = Instant::now();
        last_done_at = notice.at;
        lat_us.push(notice.at.saturating_duration_since(started).as_micros() as u64);
        match notice.outcome {
            Outcome::Completed => completed += 1,
            Outcome::Compensated => compensated += 1,
            Outcome::Stuck => stuck += 1,
        }
        let sec = notice.at.saturating_duration_since(t0).as_secs() as usize;
        if per_second.len() <= sec {
            per_second.resize(sec + 1, 0);
        }
        per_second[sec] += 1;
        sem.add_permits(1);
        let finished = completed + compensated + stuck;
        if let (Some(every), Some(p)) = (spec.milestone_every, probe) {
            if finished % every == 0 {
                let m = milestone(p, finished, t0).await;
                eprintln!(
                    "   after {} sagas ({:.0} s): orchestrator RSS {:.1} MiB, KV {} entries",
                    m.sagas,
                    m.secs,
                    m.orchestrator_rss_kib as f64 / 1024.0,
                    m.kv_messages
                );
                milestones.push(m);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    sem.close();
    let _ = issuer.await;
    let (lost, mut lost_ids) = {
        let pending = starts.lock().unwrap();
        let ids: Vec<String> = pending
            .keys()
            .take(20)
            .map(|i| format!("{}-{i}", spec.prefix))
            .collect();
        (pending.len() as u64, ids)
    };
    lost_ids.sort();
    let secs = last_done_at.saturating_duration_since(t0).as_secs_f64();
    if let Some(p) = probe {
        if spec.milestone_every.is_some() {
            milestones.push(milestone(p, completed + compensated + stuck, t0).await);
        }
    }
    PhaseResult {
        name: spec.name.clone(),
        inflight: spec.inflight,
        issued: issued.load(Ordering::Relaxed),
        completed,
        compensated,
        stuck,
        lost,
        lost_ids,
        publish_errors: publish_errors.load(Ordering::Relaxed),
        secs,
        sagas_per_sec: if secs > 0.0 {
            (completed + compensated) as f64 / secs
        } else {
            0.0
        },
        latency: Latency::of(lat_us),
        per_second,
        milestones,
    }
}

async fn milestone(p: &Probe, sagas: u64, t0: Instant) -> Milestone {
    let mem = p
        .orchestrator
        .and_then(procstat::sample)
        .unwrap_or_default();
    let (kv_bytes, kv_messages) = match p.js.get_stream(&p.kv_stream).await {
        Ok(s) => match s.get_info().await {
            Ok(i) => (i.state.bytes, i.state.messages),
            Err(_) => (0, 0),
        },
        Err(_) => (0, 0),
    };
    Milestone {
        sagas,
        secs: t0.elapsed().as_secs_f64(),
        orchestrator_rss_kib: mem.rss_kib,
        orchestrator_hwm_kib: mem.hwm_kib,
        kv_bytes,
        kv_messages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p90_ms, 90.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::of(vec![]).max_ms, 0.0);
    }
}
