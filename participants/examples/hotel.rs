//! A minimal participant written with the SDK: a hotel service for a hypothetical `trip` saga.
//! The README's "Writing a new participant" section shows this file; `cargo test` compiles it, so
//! the example cannot drift from the SDK. Run: `cargo run -p jetsaga-participants --example hotel`.

use jetsaga_common::protocol::Command;
use jetsaga_participants::{Seed, Service, StepError};
use rusqlite::Connection;
use serde_json::{json, Value};

struct Hotel;

impl Service for Hotel {
    fn name(&self) -> &'static str {
        "hotel"
    }
    fn migrate(&self, c: &Connection) -> rusqlite::Result<()> {
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS bookings(saga_id TEXT PRIMARY KEY, nights INTEGER NOT NULL)",
        )
    }
    fn seed(&self, _: &Connection, _: &Seed) -> rusqlite::Result<()> {
        Ok(())
    }
    // Runs inside the SDK's transaction, after the barrier said this action is new.
    fn action(&self, c: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        let nights = cmd.input["nights"]
            .as_i64()
            .ok_or_else(|| StepError::business("nights missing"))?;
        if nights > 30 {
            return Err(StepError::business("at most 30 nights"));
        }
        c.execute(
            "INSERT INTO bookings VALUES (?1, ?2)",
            (&cmd.saga_id, nights),
        )?;
        Ok(Some(json!({ "nights": nights })))
    }
    // Runs only if this saga's action succeeded here; never twice.
    fn compensate(&self, c: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        c.execute("DELETE FROM bookings WHERE saga_id = ?1", [&cmd.saga_id])?;
        Ok(None)
    }
    fn queries(&self) -> &'static [&'static str] {
        &["nights"]
    }
    fn query(&self, c: &Connection, what: &str, req: &Value) -> Result<Value, String> {
        let id = req["saga_id"].as_str().ok_or("saga_id missing")?;
        match what {
            "nights" => c
                .query_row(
                    "SELECT nights FROM bookings WHERE saga_id = ?1",
                    [id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| json!({ "saga_id": id, "nights": n }))
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown query {other:?}")),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetsaga_participants::cli::main(Hotel).await?;
    Ok(())
}
