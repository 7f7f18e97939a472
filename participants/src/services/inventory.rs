//! The inventory service: units in stock per SKU. `reserve` takes every line of an order from
//! stock, all or nothing (business failure if a SKU is unknown or short), and records a
//! reservation row per `(saga_id, step, sku)`; `release` puts back exactly what was reserved.
//!
//! Invariant for checks: `sum(stock) + sum(unreleased reservations)` per SKU equals the seeded
//! stock (`dump` returns both tables).

use std::collections::BTreeMap;

use jetsaga_common::protocol::Command;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::{required_str, storage, unknown_action, OrderInput};
use crate::{seed::Seed, Service, StepError};

pub struct Inventory;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (
    sku      TEXT PRIMARY KEY,
    quantity INTEGER NOT NULL CHECK (quantity >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    saga_id  TEXT    NOT NULL,
    step     INTEGER NOT NULL,
    sku      TEXT    NOT NULL,
    quantity INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (saga_id, step, sku)
);
";

fn stock(conn: &Connection, sku: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT quantity FROM stock WHERE sku = ?1")?
        .query_row([sku], |r| r.get(0))
        .optional()
}

impl Inventory {
    fn reserve(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let input = OrderInput::from_command(cmd)?;
        // The same SKU may appear on several lines: reserve the total once.
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for item in &input.items {
            let total = wanted.entry(item.sku.as_str()).or_insert(0);
            *total = total.checked_add(item.quantity).ok_or_else(|| {
                StepError::business(format!("quantity of {} overflows", item.sku))
            })?;
        }
        // Check everything before writing anything: all or nothing (the savepoint would roll
        // back partial writes anyway, but a clear first reason is worth it).
        for (sku, want) in &wanted {
            match stock(conn, sku)? {
                None => return Err(StepError::business(format!("unknown sku {sku}"))),
                Some(have) if have < *want => {
                    return Err(StepError::business(format!(
                        "stock short for {sku}: want {want}, have {have}"
                    )))
                }
                Some(_) => {}
            }
        }
        let mut reserved = Vec::with_capacity(wanted.len());
        for (sku, want) in &wanted {
            conn.prepare_cached("UPDATE stock SET quantity = quantity - ?2 WHERE sku = ?1")?
                .execute(params![sku, want])?;
            conn.prepare_cached(
                "INSERT INTO reservations (saga_id, step, sku, quantity) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![cmd.saga_id, cmd.step, sku, want])?;
            reserved.push(json!({ "sku": sku, "quantity": want }));
        }
        Ok(Some(json!({ "reserved": reserved })))
    }

    fn release(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let rows: Vec<(String, i64)> = conn
            .prepare_cached(
                "SELECT sku, quantity FROM reservations
                 WHERE saga_id = ?1 AND step = ?2 AND released = 0 ORDER BY sku",
            )?
            .query_map(params![cmd.saga_id, cmd.step], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut released = Vec::with_capacity(rows.len());
        for (sku, quantity) in rows {
            conn.prepare_cached(
                "INSERT INTO stock (sku, quantity) VALUES (?1, ?2)
                 ON CONFLICT (sku) DO UPDATE SET quantity = quantity + excluded.quantity",
            )?
            .execute(params![sku, quantity])?;
            released.push(json!({ "sku": sku, "quantity": quantity }));
        }
        conn.prepare_cached(
            "UPDATE reservations SET released = 1 WHERE saga_id = ?1 AND step = ?2",
        )?
        .execute(params![cmd.saga_id, cmd.step])?;
        Ok(Some(json!({ "released": released })))
    }

    fn dump(&self, conn: &Connection) -> rusqlite::Result<Value> {
        let stock = conn
            .prepare("SELECT sku, quantity FROM stock ORDER BY sku")?
            .query_map([], |r| {
                Ok(json!({ "sku": r.get::<_, String>(0)?, "quantity": r.get::<_, i64>(1)? }))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let reservations = conn
            .prepare(
                "SELECT saga_id, step, sku, quantity, released FROM reservations
                 ORDER BY saga_id, step, sku",
            )?
            .query_map([], |r| {
                Ok(json!({
                    "saga_id": r.get::<_, String>(0)?,
                    "step": r.get::<_, u32>(1)?,
                    "sku": r.get::<_, String>(2)?,
                    "quantity": r.get::<_, i64>(3)?,
                    "released": r.get::<_, bool>(4)?,
                }))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(json!({ "stock": stock, "reservations": reservations }))
    }
}

impl Service for Inventory {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn migrate(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)
    }

    fn seed(&self, conn: &Connection, seed: &Seed) -> rusqlite::Result<()> {
        let mut stmt =
            conn.prepare("INSERT OR IGNORE INTO stock (sku, quantity) VALUES (?1, ?2)")?;
        for (sku, quantity) in &seed.stock {
            stmt.execute(params![sku, quantity])?;
        }
        Ok(())
    }

    fn action(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "reserve" => self.reserve(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn compensate(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "release" => self.release(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn queries(&self) -> &'static [&'static str] {
        &["stock", "dump"]
    }

    fn query(&self, conn: &Connection, what: &str, req: &Value) -> Result<Value, String> {
        match what {
            "stock" => {
                let sku = required_str(req, "sku")?;
                match stock(conn, sku).map_err(storage)? {
                    Some(quantity) => Ok(json!({ "sku": sku, "quantity": quantity })),
                    None => Err(format!("unknown sku {sku}")),
                }
            }
            "dump" => self.dump(conn).map_err(storage),
            other => Err(format!("unknown query {other:?}")),
        }
    }
}
