//! The load: submits the planned sagas to `orders.create` at a steady pace spread over the fault
//! phase, never more than `in_flight` unfinished at once, and tracks every saga's status from the
//! `sagas` bucket (a KV watch, re-opened after any error — its initial replay of the latest
//! value per key means nothing is missed — with a slow poll of the unfinished ones as backstop).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use async_nats::{
    jetstream::{self, kv},
    HeaderMap,
};
use futures::StreamExt;
use jetsaga_common::topology::SAGAS_BUCKET;
use serde_json::Value;

use crate::plan::Saga;

/// A status that ends a saga for the load: terminal, or parked.
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "compensated" | "stuck")
}

/// The last status seen per saga.
#[derive(Default)]
pub struct Tracker {
    status: Mutex<HashMap<String, String>>,
    finals: AtomicUsize,
    pub submitted: AtomicUsize,
}

impl Tracker {
    pub fn set(&self, id: &str, status: &str) {
        let mut m = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let was_final = m.get(id).is_some_and(|s| is_final(s));
        let now_final = is_final(status);
        m.insert(id.to_string(), status.to_string());
        match (was_final, now_final) {
            (false, true) => {
                self.finals.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.finals.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub fn finals(&self) -> usize {
        self.finals.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.submitted
            .load(Ordering::Relaxed)
            .saturating_sub(self.finals())
    }

    /// Ids among `ids` not final yet.
    pub fn unfinished<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<String> {
        let m = self.status.lock().unwrap_or_else(|e| e.into_inner());
        ids.filter(|id| !m.get(*id).is_some_and(|s| is_final(s)))
            .map(str::to_string)
            .collect()
    }
}

fn status_of(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    v.get("status")?.as_str().map(str::to_string)
}

/// Opens the bucket, retrying while the orchestrators have not created it or NATS is away.
pub async fn bucket(js: &jetstream::Context) -> kv::Store {
    loop {
        match js.get_key_value(SAGAS_BUCKET).await {
            Ok(kv) => return kv,
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Follows every change of the bucket into `tracker`, forever.
pub async fn watch(js: jetstream::Context, tracker: Arc<Tracker>) {
    loop {
        let kv = bucket(&js).await;
        if let Ok(mut w) = kv.watch_all().await {
            while let Some(e) = w.next().await {
                match e {
                    Ok(entry) if entry.operation == kv::Operation::Put => {
                        if let Some(s) = status_of(&entry.value) {
                            tracker.set(&entry.key, &s);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads the current status of every unfinished submitted saga, every `period` (the backstop
/// for a watch that stalled across a server restart).
pub async fn poll(
    js: jetstream::Context,
    tracker: Arc<Tracker>,
    ids: Arc<Vec<String>>,
    period: Duration,
) {
    let kv = bucket(&js).await;
    loop {
        tokio::time::sleep(period).await;
        let submitted = tracker.submitted.load(Ordering::Relaxed);
        let todo = tracker.unfinished(ids[..submitted].iter().map(String::as_str));
        for id in todo.into_iter().take(500) {
            if let Ok(Ok(Some(v))) = tokio::time::timeout(Duration::from_secs(2), kv.get(&id)).await
            {
                if let Some(s) = status_of(&v) {
                    tracker.set(&id, &s);
                }
            }
        }
    }
}

/// Submits every saga: one every `interval`, waiting while `in_flight` are unfinished. Each
/// request carries `Nats-Msg-Id: req-<id>`, so a retry after a lost PubAck starts nothing twice.
pub async fn submit(
    js: jetstream::Context,
    tracker: Arc<Tracker>,
    sagas: Arc<Vec<Saga>>,
    interval: Duration,
    in_flight: usize,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    for (i, saga) in sagas.iter().enumerate() {
        tokio::time::sleep_until(start + interval * i as u32).await;
        while tracker.in_flight() >= in_flight {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = serde_json::to_vec(&saga.request())?;
        let id = format!("req-{}", saga.id);
        let started = Instant::now();
        loop {
            match jetsaga_common::nats::publish(
                &js,
                "orders.create".into(),
                &id,
                HeaderMap::new(),
                body.clone().into(),
            )
            .await
            {
                Ok(_) => break,
                Err(e) if started.elapsed() < Duration::from_secs(180) => {
                    println!("warning: submitting {} failed ({e}); retrying", saga.id);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => bail!("cannot submit {}: {e}", saga.id),
            }
        }
        tracker.submitted.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
