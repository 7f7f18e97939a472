//! The barrier's cases (DESIGN §5) against a real SQLite file: duplicates, null compensation,
//! hanging action, business failure stored with its writes rolled back, technical failure leaving
//! nothing so a retry runs, compensation of a failed action running nothing — plus batching many
//! commands in one transaction and surviving a reopen of the file.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use jetsaga_common::protocol::{Command, Op, Outcome};
use jetsaga_participants::{
    barrier::{self, Decision},
    db, Seed, Service, StepError, Synchronous,
};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::{json, Value};

/// A test service that counts how often its business code runs and writes a row each time.
#[derive(Default)]
struct Ledger {
    actions: AtomicUsize,
    compensations: AtomicUsize,
    /// Makes the next call (action or compensation) fail with a retryable error.
    fail_next: AtomicBool,
}

impl Ledger {
    fn write(conn: &Connection, cmd: &Command, kind: &str) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO entries (saga_id, step, kind) VALUES (?1, ?2, ?3)",
            rusqlite::params![cmd.saga_id, cmd.step, kind],
        )?;
        Ok(())
    }
}

impl Service for Ledger {
    fn name(&self) -> &'static str {
        "ledger"
    }
    fn migrate(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS entries (saga_id TEXT, step INTEGER, kind TEXT)",
        )
    }
    fn seed(&self, _: &Connection, _: &Seed) -> rusqlite::Result<()> {
        Ok(())
    }
    fn action(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        self.actions.fetch_add(1, Ordering::SeqCst);
        // Written before deciding, so a failure must roll it back.
        Self::write(conn, cmd, "action")?;
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StepError::Retryable("database busy".into()));
        }
        match cmd.action.as_str() {
            "ok" => Ok(Some(json!({ "n": self.actions.load(Ordering::SeqCst) }))),
            "refuse" => Err(StepError::business("insufficient balance: 500 < 2500")),
            "boom" => panic!("bug in business code"),
            other => Err(StepError::business(format!("unknown action {other}"))),
        }
    }
    fn compensate(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError> {
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Self::write(conn, cmd, "compensation")?;
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StepError::Retryable("database busy".into()));
        }
        Ok(Some(json!({ "undone": true })))
    }
    fn queries(&self) -> &'static [&'static str] {
        &[]
    }
    fn query(&self, _: &Connection, _: &str, _: &Value) -> Result<Value, String> {
        Err("none".into())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    conn: Connection,
    svc: Ledger,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let conn = db::open_writer(&path, Synchronous::Full).unwrap();
    let svc = Ledger::default();
    barrier::migrate(&conn).unwrap();
    svc.migrate(&conn).unwrap();
    Fixture {
        _dir: dir,
        path,
        conn,
        svc,
    }
}

fn cmd(saga: &str, step: u32, op: Op, action: &str, attempt: u32) -> Command {
    Command {
        saga_id: saga.into(),
        kind: "test".into(),
        step,
        step_name: format!("ledger.{action}"),
        service: "ledger".into(),
        action: action.into(),
        op,
        attempt,
        input: json!({}),
    }
}

fn entries(conn: &Connection, kind: &str) -> i64 {
    conn.query_row(
        "SELECT count(*) FROM entries WHERE kind = ?1",
        [kind],
        |r| r.get(0),
    )
    .unwrap()
}

impl Fixture {
    fn handle(&mut self, c: &Command) -> barrier::Handled {
        barrier::handle(&mut self.conn, &self.svc, c).unwrap()
    }
    fn actions(&self) -> usize {
        self.svc.actions.load(Ordering::SeqCst)
    }
    fn compensations(&self) -> usize {
        self.svc.compensations.load(Ordering::SeqCst)
    }
}

#[test]
fn duplicate_action_runs_once_and_gets_the_same_answer() {
    let mut f = fixture();
    let first = f.handle(&cmd("s1", 1, Op::Action, "ok", 1));
    assert_eq!(first.decision, Decision::Ran);
    assert_eq!(first.reply.outcome, Outcome::Success);
    assert_eq!(first.reply.output, Some(json!({ "n": 1 })));

    // Redelivered, and retried under a new attempt: same answer, addressed to that attempt.
    for attempt in [1, 2] {
        let again = f.handle(&cmd("s1", 1, Op::Action, "ok", attempt));
        assert_eq!(again.decision, Decision::Duplicate);
        assert_eq!(again.reply.outcome, Outcome::Success);
        assert_eq!(again.reply.output, first.reply.output);
        assert_eq!(again.reply.attempt, attempt);
    }
    assert_eq!(f.actions(), 1);
    assert_eq!(entries(&f.conn, "action"), 1);
}

#[test]
fn duplicate_compensation_runs_once() {
    let mut f = fixture();
    f.handle(&cmd("s1", 1, Op::Action, "ok", 1));
    let first = f.handle(&cmd("s1", 1, Op::Compensation, "undo", 1));
    assert_eq!(first.decision, Decision::Ran);
    assert_eq!(first.reply.outcome, Outcome::Success);
    let again = f.handle(&cmd("s1", 1, Op::Compensation, "undo", 2));
    assert_eq!(again.decision, Decision::Duplicate);
    assert_eq!(again.reply.outcome, Outcome::Success);
    assert_eq!(again.reply.output, Some(json!({ "undone": true })));
    assert_eq!(f.compensations(), 1);
    assert_eq!(entries(&f.conn, "compensation"), 1);
}

#[test]
fn null_compensation_then_the_late_action_hangs() {
    let mut f = fixture();
    let comp = f.handle(&cmd("s1", 2, Op::Compensation, "undo", 1));
    assert_eq!(comp.decision, Decision::NullCompensation);
    assert_eq!(comp.reply.outcome, Outcome::Success);
    assert_eq!(f.compensations(), 0);

    let late = f.handle(&cmd("s1", 2, Op::Action, "ok", 1));
    assert_eq!(late.decision, Decision::HangingAction);
    assert_eq!(late.reply.outcome, Outcome::Aborted);
    assert!(late.reply.error.is_some());
    assert_eq!(
        f.actions(),
        0,
        "a hanging action must not run business code"
    );

    // Its redelivery is a plain duplicate of the aborted answer.
    let again = f.handle(&cmd("s1", 2, Op::Action, "ok", 2));
    assert_eq!(again.decision, Decision::Duplicate);
    assert_eq!(again.reply.outcome, Outcome::Aborted);
    // And compensating again changes nothing.
    let comp2 = f.handle(&cmd("s1", 2, Op::Compensation, "undo", 2));
    assert_eq!(comp2.decision, Decision::Duplicate);
    assert_eq!(f.actions() + f.compensations(), 0);
    assert_eq!(
        entries(&f.conn, "action") + entries(&f.conn, "compensation"),
        0
    );
}

#[test]
fn business_failure_is_stored_without_its_writes() {
    let mut f = fixture();
    let first = f.handle(&cmd("s1", 1, Op::Action, "refuse", 1));
    assert_eq!(first.decision, Decision::Ran);
    assert_eq!(first.reply.outcome, Outcome::BusinessFailure);
    assert_eq!(
        first.reply.error.as_deref(),
        Some("insufficient balance: 500 < 2500")
    );
    assert_eq!(entries(&f.conn, "action"), 0, "business writes rolled back");
    let stored = barrier::lookup(&f.conn, "s1", 1, Op::Action)
        .unwrap()
        .unwrap();
    assert_eq!(stored.outcome, Outcome::BusinessFailure);

    let again = f.handle(&cmd("s1", 1, Op::Action, "refuse", 2));
    assert_eq!(again.decision, Decision::Duplicate);
    assert_eq!(again.reply.outcome, Outcome::BusinessFailure);
    assert_eq!(again.reply.error, first.reply.error);
    assert_eq!(f.actions(), 1);
}

#[test]
fn retryable_failure_leaves_nothing_so_a_retry_runs() {
    let mut f = fixture();
    f.svc.fail_next.store(true, Ordering::SeqCst);
    let first = f.handle(&cmd("s1", 1, Op::Action, "ok", 1));
    assert_eq!(first.decision, Decision::Failed);
    assert_eq!(first.reply.outcome, Outcome::RetryableFailure);
    assert_eq!(first.reply.error.as_deref(), Some("database busy"));
    assert!(barrier::lookup(&f.conn, "s1", 1, Op::Action)
        .unwrap()
        .is_none());
    assert_eq!(entries(&f.conn, "action"), 0);

    let retry = f.handle(&cmd("s1", 1, Op::Action, "ok", 2));
    assert_eq!(retry.decision, Decision::Ran);
    assert_eq!(retry.reply.outcome, Outcome::Success);
    assert_eq!(f.actions(), 2);
    assert_eq!(entries(&f.conn, "action"), 1);
}

#[test]
fn compensation_of_a_failed_or_aborted_action_runs_nothing() {
    let mut f = fixture();
    f.handle(&cmd("s1", 1, Op::Action, "refuse", 1));
    let comp = f.handle(&cmd("s1", 1, Op::Compensation, "undo", 1));
    assert_eq!(comp.decision, Decision::NothingToUndo);
    assert_eq!(comp.reply.outcome, Outcome::Success);
    assert_eq!(f.compensations(), 0);
    assert_eq!(entries(&f.conn, "compensation"), 0);
}

#[test]
fn failing_compensation_is_retryable_and_records_nothing() {
    let mut f = fixture();
    f.handle(&cmd("s1", 1, Op::Action, "ok", 1));
    f.svc.fail_next.store(true, Ordering::SeqCst);
    let first = f.handle(&cmd("s1", 1, Op::Compensation, "undo", 1));
    assert_eq!(first.decision, Decision::Failed);
    assert_eq!(first.reply.outcome, Outcome::RetryableFailure);
    assert!(barrier::lookup(&f.conn, "s1", 1, Op::Compensation)
        .unwrap()
        .is_none());
    assert_eq!(entries(&f.conn, "compensation"), 0);
    let retry = f.handle(&cmd("s1", 1, Op::Compensation, "undo", 2));
    assert_eq!(retry.decision, Decision::Ran);
    assert_eq!(entries(&f.conn, "compensation"), 1);
}

#[test]
fn a_panic_in_business_code_is_a_retryable_failure() {
    let mut f = fixture();
    let h = f.handle(&cmd("s1", 1, Op::Action, "boom", 1));
    assert_eq!(h.decision, Decision::Failed);
    assert_eq!(h.reply.outcome, Outcome::RetryableFailure);
    assert!(h.reply.error.unwrap().contains("bug in business code"));
    assert!(barrier::lookup(&f.conn, "s1", 1, Op::Action)
        .unwrap()
        .is_none());
    assert_eq!(entries(&f.conn, "action"), 0);
}

#[test]
fn many_commands_share_one_transaction_and_fail_alone() {
    let mut f = fixture();
    let cmds = [
        cmd("a", 0, Op::Action, "ok", 1),
        cmd("b", 0, Op::Action, "flaky-next", 1), // fails retryably (fail_next set below)
        cmd("c", 0, Op::Action, "refuse", 1),
        cmd("a", 0, Op::Action, "ok", 1), // duplicate inside the same batch
        cmd("d", 1, Op::Compensation, "undo", 1),
    ];
    let mut tx = f
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let mut decisions = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        f.svc.fail_next.store(i == 1, Ordering::SeqCst);
        decisions.push(barrier::apply(&mut tx, &f.svc, c).decision);
    }
    tx.commit().unwrap();
    assert_eq!(
        decisions,
        [
            Decision::Ran,
            Decision::Failed,
            Decision::Ran,
            Decision::Duplicate,
            Decision::NullCompensation
        ]
    );
    let rows = barrier::records(&f.conn, None).unwrap();
    let keys: Vec<_> = rows
        .iter()
        .map(|r| (r.saga_id.as_str(), r.outcome))
        .collect();
    assert_eq!(
        keys,
        [
            ("a", Outcome::Success),
            ("c", Outcome::BusinessFailure),
            ("d", Outcome::Success)
        ]
    );
    assert_eq!(entries(&f.conn, "action"), 1, "only a's write survives");
}

#[test]
fn the_barrier_survives_reopening_the_file() {
    let mut f = fixture();
    f.handle(&cmd("s1", 1, Op::Action, "ok", 1));
    let path = f.path.clone();
    let Fixture {
        conn, svc, _dir, ..
    } = f;
    drop(conn);
    let mut conn = db::open_writer(&path, Synchronous::Full).unwrap();
    let again = barrier::handle(&mut conn, &svc, &cmd("s1", 1, Op::Action, "ok", 3)).unwrap();
    assert_eq!(again.decision, Decision::Duplicate);
    assert_eq!(svc.actions.load(Ordering::SeqCst), 1);
    // A read-only connection (what queries use) sees the committed rows.
    let reader = db::open_reader(&path).unwrap();
    assert_eq!(barrier::records(&reader, Some("s1")).unwrap().len(), 1);
}
