//! Reading the final state once the system is quiet: every saga from the `sagas` bucket, and
//! each service's own store — business rows and barrier rows — through its `dump` and `barrier`
//! queries. A core NATS reply is capped by the server's `max_payload` (1 MB in `nats.conf`),
//! which a large run's dumps exceed; then the same rows are read from the service's SQLite file
//! (read-only, WAL mode lets it be read while the service runs), and the report says so.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use futures::StreamExt;
use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::system::query;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct OrderRow {
    pub order_id: String,
    pub saga_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub status: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PaymentRow {
    pub saga_id: String,
    pub step: u32,
    pub customer_id: String,
    pub amount_cents: i64,
    pub refunded: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ReservationRow {
    pub saga_id: String,
    pub step: u32,
    pub sku: String,
    pub quantity: i64,
    pub released: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BarrierRow {
    #[serde(default)]
    pub service: String,
    pub saga_id: String,
    pub step: u32,
    pub op: String,
    pub action: String,
    pub attempt: u32,
    pub outcome: String,
    pub recorded_at_ms: u64,
}

/// Everything the invariants are checked against.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Saga id -> its stored state (absent: never started).
    pub states: BTreeMap<String, Value>,
    pub orders: Vec<OrderRow>,
    pub accounts: BTreeMap<String, i64>,
    pub payments: Vec<PaymentRow>,
    pub stock: BTreeMap<String, i64>,
    pub reservations: Vec<ReservationRow>,
    pub barrier: Vec<BarrierRow>,
    /// Where each service's rows came from ("query" or "sqlite"), for the report.
    pub sources: BTreeMap<String, &'static str>,
}

#[derive(Deserialize)]
struct Account {
    customer_id: String,
    balance_cents: i64,
}

#[derive(Deserialize)]
struct StockRow {
    sku: String,
    quantity: i64,
}

/// Reads every saga in `ids` and every service's rows.
pub async fn snapshot(
    client: &async_nats::Client,
    kv: &kv::Store,
    ids: &[String],
    dir: &Path,
) -> anyhow::Result<Snapshot> {
    let mut snap = Snapshot::default();
    let got: Vec<(String, anyhow::Result<Option<Value>>)> =
        futures::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let r = async {
                    let v = kv.get(&id).await.with_context(|| format!("kv get {id}"))?;
                    Ok(match v {
                        Some(b) => Some(serde_json::from_slice(&b)?),
                        None => None,
                    })
                }
                .await;
                (id, r)
            })
            .buffer_unordered(32)
            .collect()
            .await;
    for (id, r) in got {
        if let Some(v) = r? {
            snap.states.insert(id, v);
        }
    }

    for svc in crate::plan::SERVICES {
        let db = dir.join(format!("{svc}.sqlite"));
        let (dump, barrier, source) = match (
            query(client, svc, "dump", json!({})).await,
            query(client, svc, "barrier", json!({})).await,
        ) {
            (Ok(d), Ok(b)) => (d, b, "query"),
            _ => (
                dump_from_sqlite(svc, &db)?,
                barrier_from_sqlite(&db)?,
                "sqlite",
            ),
        };
        snap.sources.insert(svc.to_string(), source);
        let rows: Vec<BarrierRow> = serde_json::from_value(barrier["rows"].clone())
            .with_context(|| format!("{svc} barrier rows"))?;
        snap.barrier.extend(rows.into_iter().map(|mut r| {
            r.service = svc.to_string();
            r
        }));
        match svc {
            "order" => snap.orders = serde_json::from_value(dump["orders"].clone())?,
            "payment" => {
                let accounts: Vec<Account> = serde_json::from_value(dump["accounts"].clone())?;
                snap.accounts = accounts
                    .into_iter()
                    .map(|a| (a.customer_id, a.balance_cents))
                    .collect();
                snap.payments = serde_json::from_value(dump["payments"].clone())?;
            }
            _ => {
                let stock: Vec<StockRow> = serde_json::from_value(dump["stock"].clone())?;
                snap.stock = stock.into_iter().map(|s| (s.sku, s.quantity)).collect();
                snap.reservations = serde_json::from_value(dump["reservations"].clone())?;
            }
        }
    }
    Ok(snap)
}

fn open(db: &Path) -> anyhow::Result<Connection> {
    Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", db.display()))
}

/// The rows of a service's `dump` query, read from its file, in the same JSON shape.
fn dump_from_sqlite(svc: &str, db: &Path) -> anyhow::Result<Value> {
    let c = open(db)?;
    Ok(match svc {
        "order" => {
            let mut st = c.prepare(
                "SELECT order_id, saga_id, customer_id, amount_cents, status FROM orders",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(json!({
                        "order_id": r.get::<_, String>(0)?, "saga_id": r.get::<_, String>(1)?,
                        "customer_id": r.get::<_, String>(2)?, "amount_cents": r.get::<_, i64>(3)?,
                        "status": r.get::<_, String>(4)?,
                    }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            json!({ "orders": rows })
        }
        "payment" => {
            let accounts = c
                .prepare("SELECT customer_id, balance_cents FROM accounts")?
                .query_map([], |r| {
                    Ok(json!({ "customer_id": r.get::<_, String>(0)?, "balance_cents": r.get::<_, i64>(1)? }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let payments = c
                .prepare("SELECT saga_id, step, customer_id, amount_cents, refunded FROM payments")?
                .query_map([], |r| {
                    Ok(json!({
                        "saga_id": r.get::<_, String>(0)?, "step": r.get::<_, u32>(1)?,
                        "customer_id": r.get::<_, String>(2)?, "amount_cents": r.get::<_, i64>(3)?,
                        "refunded": r.get::<_, bool>(4)?,
                    }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            json!({ "accounts": accounts, "payments": payments })
        }
        _ => {
            let stock = c
                .prepare("SELECT sku, quantity FROM stock")?
                .query_map([], |r| {
                    Ok(json!({ "sku": r.get::<_, String>(0)?, "quantity": r.get::<_, i64>(1)? }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let reservations = c
                .prepare("SELECT saga_id, step, sku, quantity, released FROM reservations")?
                .query_map([], |r| {
                    Ok(json!({
                        "saga_id": r.get::<_, String>(0)?, "step": r.get::<_, u32>(1)?,
                        "sku": r.get::<_, String>(2)?, "quantity": r.get::<_, i64>(3)?,
                        "released": r.get::<_, bool>(4)?,
                    }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            json!({ "stock": stock, "reservations": reservations })
        }
    })
}

/// The rows of a service's `barrier` query, read from its file, in the same JSON shape.
fn barrier_from_sqlite(db: &Path) -> anyhow::Result<Value> {
    let c = open(db)?;
    let rows = c
        .prepare(
            "SELECT saga_id, step, op, action, attempt, outcome, recorded_at_ms FROM jetsaga_barrier",
        )?
        .query_map([], |r| {
            Ok(json!({
                "saga_id": r.get::<_, String>(0)?, "step": r.get::<_, u32>(1)?,
                "op": r.get::<_, String>(2)?, "action": r.get::<_, String>(3)?,
                "attempt": r.get::<_, u32>(4)?, "outcome": r.get::<_, String>(5)?,
                "recorded_at_ms": r.get::<_, i64>(6)?,
            }))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(json!({ "rows": rows }))
}
