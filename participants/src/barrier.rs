//! The participant-side barrier (DESIGN §5): one row per `(saga_id, step, op)` in the service's own
//! SQLite database, written in the same transaction as the business change, so a command is
//! applied at most once however often it is delivered, and out-of-order deliveries stay safe.
//!
//! The key leaves out the attempt: a retry of the same step is the same work. What happens:
//!
//! | command      | barrier state                         | result                                   |
//! |--------------|---------------------------------------|------------------------------------------|
//! | any          | own row exists                        | duplicate: stored answer, nothing runs   |
//! | action       | compensation row exists               | hanging action: `aborted` recorded       |
//! | action       | nothing                               | business code runs; success or business failure recorded, a retryable error records nothing |
//! | compensation | no action row                         | null compensation: success recorded (and it blocks a late action) |
//! | compensation | action failed or was aborted          | nothing to undo: success recorded        |
//! | compensation | action succeeded                      | business compensation runs; success recorded, any error records nothing and answers `retryable_failure` |
//!
//! Every command gets its own SAVEPOINT so many commands can share one transaction (one fsync per
//! batch) and a failing command rolls back alone. A business failure of an action rolls back the
//! business writes (an inner savepoint) but keeps the barrier row, so a duplicate gets the same
//! failure.

use std::panic::{catch_unwind, AssertUnwindSafe};

use jetsaga_common::{
    protocol::{Command, Op, Outcome, Reply},
    time::now_ms,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value;

use crate::service::{Service, StepError};

/// The barrier table. `WITHOUT ROWID`: the primary key is the only way it is read.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jetsaga_barrier (
    saga_id        TEXT    NOT NULL,
    step           INTEGER NOT NULL,
    op             TEXT    NOT NULL CHECK (op IN ('action', 'compensation')),
    action         TEXT    NOT NULL,
    attempt        INTEGER NOT NULL,
    outcome        TEXT    NOT NULL,
    error          TEXT,
    output         TEXT,
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (saga_id, step, op)
) WITHOUT ROWID;
";

/// Creates the barrier table if it is missing.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// One stored barrier row.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub saga_id: String,
    pub step: u32,
    pub op: Op,
    /// The action or compensation name of the command that wrote the row.
    pub action: String,
    /// The attempt that wrote the row.
    pub attempt: u32,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub output: Option<Value>,
    pub recorded_at_ms: u64,
}

impl Record {
    /// The stored answer, addressed to `cmd` (whose attempt may differ from the stored one).
    pub fn reply_to(&self, cmd: &Command) -> Reply {
        Reply::to(cmd, self.outcome, self.error.clone(), self.output.clone())
    }

    /// The row as JSON, for the `barrier` query.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "saga_id": self.saga_id,
            "step": self.step,
            "op": self.op,
            "action": self.action,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "error": self.error,
            "output": self.output,
            "recorded_at_ms": self.recorded_at_ms,
        })
    }
}

/// What the barrier did with a command; for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The business action or compensation ran and its result was recorded.
    Ran,
    /// The row existed: the stored answer was returned, nothing ran.
    Duplicate,
    /// An action after its compensation: recorded as `aborted`, nothing ran.
    HangingAction,
    /// A compensation without an action: recorded as success, nothing ran.
    NullCompensation,
    /// A compensation of an action that failed or was aborted: recorded as success, nothing ran.
    NothingToUndo,
    /// A technical failure (or a business error of a compensation): everything rolled back,
    /// nothing recorded, answered `retryable_failure`.
    Failed,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Ran => "ran",
            Decision::Duplicate => "duplicate",
            Decision::HangingAction => "hanging_action",
            Decision::NullCompensation => "null_compensation",
            Decision::NothingToUndo => "nothing_to_undo",
            Decision::Failed => "failed",
        }
    }
}

/// A command's reply and how the barrier arrived at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub reply: Reply,
    pub decision: Decision,
}

fn op_from_str(s: &str) -> Option<Op> {
    match s {
        "action" => Some(Op::Action),
        "compensation" => Some(Op::Compensation),
        _ => None,
    }
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::BusinessFailure => "business_failure",
        Outcome::RetryableFailure => "retryable_failure",
        Outcome::Aborted => "aborted",
    }
}

fn outcome_from_str(s: &str) -> Option<Outcome> {
    match s {
        "success" => Some(Outcome::Success),
        "business_failure" => Some(Outcome::BusinessFailure),
        "retryable_failure" => Some(Outcome::RetryableFailure),
        "aborted" => Some(Outcome::Aborted),
        _ => None,
    }
}

fn bad_column(idx: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        format!("unknown {what} {value:?} in jetsaga_barrier").into(),
    )
}

const COLUMNS: &str = "saga_id, step, op, action, attempt, outcome, error, output, recorded_at_ms";

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let op: String = row.get(2)?;
    let outcome: String = row.get(5)?;
    let output: Option<String> = row.get(7)?;
    let output = match output {
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, e.into())
        })?),
        None => None,
    };
    Ok(Record {
        saga_id: row.get(0)?,
        step: row.get(1)?,
        op: op_from_str(&op).ok_or_else(|| bad_column(2, "op", &op))?,
        action: row.get(3)?,
        attempt: row.get(4)?,
        outcome: outcome_from_str(&outcome).ok_or_else(|| bad_column(5, "outcome", &outcome))?,
        error: row.get(6)?,
        output,
        recorded_at_ms: row.get::<_, i64>(8)?.max(0) as u64,
    })
}

/// The barrier row of `(saga_id, step, op)`, if any.
pub fn lookup(
    conn: &Connection,
    saga_id: &str,
    step: u32,
    op: Op,
) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM jetsaga_barrier WHERE saga_id = ?1 AND step = ?2 AND op = ?3"
    ))?
    .query_row(params![saga_id, step, op.as_str()], row_to_record)
    .optional()
}

/// All barrier rows, or those of one saga, in key order.
pub fn records(conn: &Connection, saga_id: Option<&str>) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM jetsaga_barrier WHERE ?1 IS NULL OR saga_id = ?1
         ORDER BY saga_id, step, op"
    ))?;
    let rows = stmt.query_map(params![saga_id], row_to_record)?;
    rows.collect()
}

fn record(conn: &Connection, cmd: &Command, reply: &Reply) -> rusqlite::Result<()> {
    let output = reply.output.as_ref().map(Value::to_string);
    conn.prepare_cached(&format!(
        "INSERT INTO jetsaga_barrier ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?
    .execute(params![
        cmd.saga_id,
        cmd.step,
        cmd.op.as_str(),
        cmd.action,
        cmd.attempt,
        outcome_str(reply.outcome),
        reply.error,
        output,
        i64::try_from(now_ms()).unwrap_or(i64::MAX),
    ])?;
    Ok(())
}

/// Runs business code, turning a panic into a retryable error so one bad command cannot take the
/// participant down (the savepoint around it is rolled back as usual).
fn guarded(
    f: impl FnOnce() -> Result<Option<Value>, StepError>,
) -> Result<Option<Value>, StepError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(StepError::Retryable(format!(
            "business code panicked: {what}"
        )))
    })
}

fn retryable(cmd: &Command, error: String) -> Handled {
    Handled {
        reply: Reply::to(cmd, Outcome::RetryableFailure, Some(error), None),
        decision: Decision::Failed,
    }
}

/// Applies one command inside `tx` (in its own savepoint) and returns its reply. Never fails: a
/// storage error rolls this command back and answers `retryable_failure`. The caller commits `tx`
/// and must publish the replies only after that commit succeeded.
pub fn apply<S: Service + ?Sized>(tx: &mut Transaction<'_>, svc: &S, cmd: &Command) -> Handled {
    try_apply(tx, svc, cmd)
        .unwrap_or_else(|e| retryable(cmd, format!("participant storage error: {e}")))
}

fn try_apply<S: Service + ?Sized>(
    tx: &mut Transaction<'_>,
    svc: &S,
    cmd: &Command,
) -> rusqlite::Result<Handled> {
    // Dropping `sp` without `commit` rolls back everything this command wrote.
    let mut sp = tx.savepoint()?;
    if let Some(stored) = lookup(&sp, &cmd.saga_id, cmd.step, cmd.op)? {
        return Ok(Handled {
            reply: stored.reply_to(cmd),
            decision: Decision::Duplicate,
        });
    }
    let (reply, decision) = match cmd.op {
        Op::Action => {
            if lookup(&sp, &cmd.saga_id, cmd.step, Op::Compensation)?.is_some() {
                let reply = Reply::to(
                    cmd,
                    Outcome::Aborted,
                    Some("hanging action: this step was already compensated".into()),
                    None,
                );
                (reply, Decision::HangingAction)
            } else {
                let result = {
                    let inner = sp.savepoint()?;
                    let result = guarded(|| svc.action(&inner, cmd));
                    if result.is_ok() {
                        inner.commit()?;
                    } // else: `inner` drops here and the business writes roll back
                    result
                };
                match result {
                    Ok(output) => (
                        Reply::to(cmd, Outcome::Success, None, output),
                        Decision::Ran,
                    ),
                    Err(StepError::Business(e)) => (
                        Reply::to(cmd, Outcome::BusinessFailure, Some(e), None),
                        Decision::Ran,
                    ),
                    Err(StepError::Retryable(e)) => return Ok(retryable(cmd, e)),
                }
            }
        }
        Op::Compensation => match lookup(&sp, &cmd.saga_id, cmd.step, Op::Action)? {
            None => (
                Reply::to(cmd, Outcome::Success, None, None),
                Decision::NullCompensation,
            ),
            Some(action) if action.outcome != Outcome::Success => (
                Reply::to(cmd, Outcome::Success, None, None),
                Decision::NothingToUndo,
            ),
            Some(_) => match guarded(|| svc.compensate(&sp, cmd)) {
                Ok(output) => (
                    Reply::to(cmd, Outcome::Success, None, output),
                    Decision::Ran,
                ),
                // A compensation must eventually succeed: whatever went wrong, roll back and let
                // the orchestrator retry it (and park the saga past its retry limit).
                Err(StepError::Business(e) | StepError::Retryable(e)) => {
                    return Ok(retryable(cmd, format!("compensation failed: {e}")))
                }
            },
        },
    };
    record(&sp, cmd, &reply)?;
    sp.commit()?;
    Ok(Handled { reply, decision })
}

/// Applies one command in its own (immediate) transaction and commits it. The runtime batches
/// many commands per transaction instead; this is the simple form for tests and tools.
pub fn handle<S: Service + ?Sized>(
    conn: &mut Connection,
    svc: &S,
    cmd: &Command,
) -> rusqlite::Result<Handled> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let handled = apply(&mut tx, svc, cmd);
    tx.commit()?;
    Ok(handled)
}
