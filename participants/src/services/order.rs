//! The order service: `create` records the order as PENDING (the saga's *semantic lock*: anyone
//! reading it sees it is not final), `approve` moves it PENDING -> APPROVED, and the compensation
//! `cancel` (of `create`) marks it CANCELLED.

use jetsaga_common::{protocol::Command, time::now_ms};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::{required_str, storage, unknown_action, OrderInput};
use crate::{seed::Seed, Service, StepError};

pub struct Order;

pub const PENDING: &str = "PENDING";
pub const APPROVED: &str = "APPROVED";
pub const CANCELLED: &str = "CANCELLED";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id      TEXT    PRIMARY KEY,
    saga_id       TEXT    NOT NULL,
    customer_id   TEXT    NOT NULL,
    amount_cents  INTEGER NOT NULL,
    items         TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'CANCELLED')),
    updated_at_ms INTEGER NOT NULL
);
";

fn now_ms_i64() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// `(saga_id, status)` of an order.
fn status(conn: &Connection, order_id: &str) -> rusqlite::Result<Option<(String, String)>> {
    conn.prepare_cached("SELECT saga_id, status FROM orders WHERE order_id = ?1")?
        .query_row([order_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

fn set_status(conn: &Connection, order_id: &str, to: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE orders SET status = ?2, updated_at_ms = ?3 WHERE order_id = ?1")?
        .execute(params![order_id, to, now_ms_i64()])?;
    Ok(())
}

fn order_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    let items: String = r.get(4)?;
    Ok(json!({
        "order_id": r.get::<_, String>(0)?,
        "saga_id": r.get::<_, String>(1)?,
        "customer_id": r.get::<_, String>(2)?,
        "amount_cents": r.get::<_, i64>(3)?,
        "items": serde_json::from_str::<Value>(&items).unwrap_or(Value::Null),
        "status": r.get::<_, String>(5)?,
        "updated_at_ms": r.get::<_, i64>(6)?,
    }))
}

const ORDER_COLUMNS: &str =
    "order_id, saga_id, customer_id, amount_cents, items, status, updated_at_ms";

impl Order {
    fn create(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let input = OrderInput::from_command(cmd)?;
        if let Some((saga, st)) = status(conn, &input.order_id)? {
            return Err(StepError::business(format!(
                "order {} already exists ({st}, saga {saga})",
                input.order_id
            )));
        }
        let items = serde_json::to_string(&input.items)
            .map_err(|e| StepError::Retryable(format!("cannot encode items: {e}")))?;
        conn.prepare_cached(&format!(
            "INSERT INTO orders ({ORDER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))?
        .execute(params![
            input.order_id,
            cmd.saga_id,
            input.customer_id,
            input.amount_cents,
            items,
            PENDING,
            now_ms_i64()
        ])?;
        Ok(Some(
            json!({ "order_id": input.order_id, "status": PENDING }),
        ))
    }

    fn approve(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let input = OrderInput::from_command(cmd)?;
        let id = &input.order_id;
        match status(conn, id)? {
            None => Err(StepError::business(format!("order {id} not found"))),
            Some((saga, _)) if saga != cmd.saga_id => Err(StepError::business(format!(
                "order {id} belongs to saga {saga}"
            ))),
            Some((_, st)) if st != PENDING => Err(StepError::business(format!(
                "order {id} is {st}, not {PENDING}"
            ))),
            Some(_) => {
                set_status(conn, id, APPROVED)?;
                Ok(Some(json!({ "order_id": id, "status": APPROVED })))
            }
        }
    }

    fn cancel(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        // The order this saga created; found by saga id so the input is not even needed.
        let id: Option<String> = conn
            .prepare_cached("SELECT order_id FROM orders WHERE saga_id = ?1")?
            .query_row([&cmd.saga_id], |r| r.get(0))
            .optional()?;
        let Some(id) = id else {
            // The barrier only calls us after a successful create: this is corruption.
            return Err(StepError::business(format!(
                "no order recorded for saga {}",
                cmd.saga_id
            )));
        };
        set_status(conn, &id, CANCELLED)?;
        Ok(Some(json!({ "order_id": id, "status": CANCELLED })))
    }
}

impl Service for Order {
    fn name(&self) -> &'static str {
        "order"
    }

    fn migrate(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch("CREATE INDEX IF NOT EXISTS orders_by_saga ON orders (saga_id)")
    }

    fn seed(&self, _conn: &Connection, _seed: &Seed) -> rusqlite::Result<()> {
        Ok(()) // orders only come from sagas
    }

    fn action(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "create" => self.create(conn, cmd),
            "approve" => self.approve(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn compensate(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "cancel" => self.cancel(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn queries(&self) -> &'static [&'static str] {
        &["status", "dump"]
    }

    fn query(&self, conn: &Connection, what: &str, req: &Value) -> Result<Value, String> {
        match what {
            "status" => {
                let id = required_str(req, "order_id")?;
                let row: Option<(String, String, i64)> = conn
                    .prepare_cached(
                        "SELECT status, customer_id, amount_cents FROM orders WHERE order_id = ?1",
                    )
                    .and_then(|mut s| {
                        s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                            .optional()
                    })
                    .map_err(storage)?;
                match row {
                    Some((status, customer, amount)) => Ok(json!({
                        "order_id": id,
                        "status": status,
                        "customer_id": customer,
                        "amount_cents": amount,
                    })),
                    None => Err("not found".into()),
                }
            }
            "dump" => {
                let orders = conn
                    .prepare(&format!(
                        "SELECT {ORDER_COLUMNS} FROM orders ORDER BY order_id"
                    ))
                    .and_then(|mut s| {
                        s.query_map([], order_json)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(storage)?;
                Ok(json!({ "orders": orders }))
            }
            other => Err(format!("unknown query {other:?}")),
        }
    }
}
