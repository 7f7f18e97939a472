//! The payment service: customer balances in cents. `deduct` takes a saga's amount from its
//! customer (business failure if the customer is unknown or the balance is short) and records a
//! payment row per `(saga_id, step)`; `refund` gives back exactly what that row took.
//!
//! Invariant for checks: `sum(balance) + sum(amount of unrefunded payments)` equals the seeded
//! total (`dump` returns both tables).

use jetsaga_common::protocol::Command;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::{required_str, storage, unknown_action, OrderInput};
use crate::{seed::Seed, Service, StepError};

pub struct Payment;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    customer_id   TEXT PRIMARY KEY,
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0)
);
CREATE TABLE IF NOT EXISTS payments (
    saga_id      TEXT    NOT NULL,
    step         INTEGER NOT NULL,
    customer_id  TEXT    NOT NULL,
    amount_cents INTEGER NOT NULL,
    refunded     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (saga_id, step)
);
";

fn balance(conn: &Connection, customer: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT balance_cents FROM accounts WHERE customer_id = ?1")?
        .query_row([customer], |r| r.get(0))
        .optional()
}

impl Payment {
    fn deduct(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let input = OrderInput::from_command(cmd)?;
        let customer = &input.customer_id;
        let amount = input.amount_cents;
        let Some(have) = balance(conn, customer)? else {
            return Err(StepError::business(format!("unknown customer {customer}")));
        };
        if have < amount {
            return Err(StepError::business(format!(
                "insufficient balance: {have} < {amount}"
            )));
        }
        conn.prepare_cached(
            "UPDATE accounts SET balance_cents = balance_cents - ?2 WHERE customer_id = ?1",
        )?
        .execute(params![customer, amount])?;
        conn.prepare_cached(
            "INSERT INTO payments (saga_id, step, customer_id, amount_cents) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![cmd.saga_id, cmd.step, customer, amount])?;
        Ok(Some(json!({
            "customer_id": customer,
            "amount_cents": amount,
            "balance_cents": have - amount,
        })))
    }

    fn refund(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let row: Option<(String, i64, bool)> = conn
            .prepare_cached(
                "SELECT customer_id, amount_cents, refunded FROM payments
                 WHERE saga_id = ?1 AND step = ?2",
            )?
            .query_row(params![cmd.saga_id, cmd.step], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        // The barrier only calls us after a successful deduct, which wrote this row in the same
        // transaction; its absence is corruption, so refuse (the saga gets parked) rather than guess.
        let Some((customer, amount, refunded)) = row else {
            return Err(StepError::business(format!(
                "no payment recorded for saga {} step {}",
                cmd.saga_id, cmd.step
            )));
        };
        if refunded {
            return Ok(Some(
                json!({ "customer_id": customer, "refunded_cents": 0 }),
            ));
        }
        let have = balance(conn, &customer)?.unwrap_or(0);
        let new = have.checked_add(amount).ok_or_else(|| {
            StepError::business(format!("refund overflows the balance of {customer}"))
        })?;
        conn.prepare_cached(
            "INSERT INTO accounts (customer_id, balance_cents) VALUES (?1, ?2)
             ON CONFLICT (customer_id) DO UPDATE SET balance_cents = excluded.balance_cents",
        )?
        .execute(params![customer, new])?;
        conn.prepare_cached("UPDATE payments SET refunded = 1 WHERE saga_id = ?1 AND step = ?2")?
            .execute(params![cmd.saga_id, cmd.step])?;
        Ok(Some(json!({
            "customer_id": customer,
            "refunded_cents": amount,
            "balance_cents": new,
        })))
    }

    fn dump(&self, conn: &Connection) -> rusqlite::Result<Value> {
        let accounts = conn
            .prepare("SELECT customer_id, balance_cents FROM accounts ORDER BY customer_id")?
            .query_map([], |r| {
                Ok(json!({ "customer_id": r.get::<_, String>(0)?, "balance_cents": r.get::<_, i64>(1)? }))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let payments = conn
            .prepare(
                "SELECT saga_id, step, customer_id, amount_cents, refunded FROM payments
                 ORDER BY saga_id, step",
            )?
            .query_map([], |r| {
                Ok(json!({
                    "saga_id": r.get::<_, String>(0)?,
                    "step": r.get::<_, u32>(1)?,
                    "customer_id": r.get::<_, String>(2)?,
                    "amount_cents": r.get::<_, i64>(3)?,
                    "refunded": r.get::<_, bool>(4)?,
                }))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(json!({ "accounts": accounts, "payments": payments }))
    }
}

impl Service for Payment {
    fn name(&self) -> &'static str {
        "payment"
    }

    fn migrate(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)
    }

    fn seed(&self, conn: &Connection, seed: &Seed) -> rusqlite::Result<()> {
        let mut stmt = conn.prepare(
            "INSERT OR IGNORE INTO accounts (customer_id, balance_cents) VALUES (?1, ?2)",
        )?;
        for (customer, cents) in &seed.customers {
            stmt.execute(params![customer, cents])?;
        }
        Ok(())
    }

    fn action(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "deduct" => self.deduct(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn compensate(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        match cmd.action.as_str() {
            "refund" => self.refund(conn, cmd),
            _ => Err(unknown_action(self.name(), cmd)),
        }
    }

    fn queries(&self) -> &'static [&'static str] {
        &["balance", "dump"]
    }

    fn query(&self, conn: &Connection, what: &str, req: &Value) -> Result<Value, String> {
        match what {
            "balance" => {
                let customer = required_str(req, "customer_id")?;
                match balance(conn, customer).map_err(storage)? {
                    Some(cents) => Ok(json!({ "customer_id": customer, "balance_cents": cents })),
                    None => Err(format!("unknown customer {customer}")),
                }
            }
            "dump" => self.dump(conn).map_err(storage),
            other => Err(format!("unknown query {other:?}")),
        }
    }
}
