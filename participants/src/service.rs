//! The trait a participant service implements: its schema, its seed data, its business action and
//! compensation, and its read-only queries. Idempotency, transactions and messaging are the SDK's
//! job ([`crate::barrier`], [`crate::runtime`]); a service only writes business logic.

use jetsaga_common::protocol::Command;
use rusqlite::Connection;
use serde_json::Value;

use crate::seed::Seed;

/// Why a business action or compensation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The business said no (balance too low, stock short, unknown action, bad input). Its writes
    /// are rolled back, the failure is recorded in the barrier and answered as
    /// `business_failure`; the orchestrator compensates and never retries it.
    #[error("{0}")]
    Business(String),
    /// A technical problem (database busy, I/O). Everything for this command is rolled back and
    /// nothing is recorded, so a retry runs the business code again.
    #[error("{0}")]
    Retryable(String),
}

impl StepError {
    pub fn business(reason: impl Into<String>) -> Self {
        StepError::Business(reason.into())
    }
}

/// A storage error is technical: retrying may well succeed.
impl From<rusqlite::Error> for StepError {
    fn from(e: rusqlite::Error) -> Self {
        StepError::Retryable(format!("storage: {e}"))
    }
}

/// A saga participant's business logic.
///
/// `action` and `compensate` receive a connection that is already inside a savepoint of the
/// batch's transaction: they must only read and write their own tables, never begin, commit or
/// roll back themselves. The SDK calls `action` at most once per `(saga_id, step)` and
/// `compensate` only if that action succeeded, at most once.
pub trait Service: Send + Sync + 'static {
    /// The service name: the `<service>` token of `saga.cmd.<service>.<action>`, lower-case.
    fn name(&self) -> &'static str;

    /// Creates the service's tables (idempotently: `CREATE TABLE IF NOT EXISTS`).
    fn migrate(&self, conn: &Connection) -> rusqlite::Result<()>;

    /// Loads seed data without ever overwriting existing rows (`INSERT OR IGNORE`); runs at
    /// every start inside one transaction.
    fn seed(&self, conn: &Connection, seed: &Seed) -> rusqlite::Result<()>;

    /// Runs the action named `cmd.action`. `Ok(output)` is sent back as the reply's `output`.
    /// An unknown action name is a [`StepError::Business`] failure.
    fn action(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError>;

    /// Undoes what this saga step's successful action did, exactly. Any error is retried by
    /// the orchestrator (compensations must eventually succeed).
    fn compensate(&self, conn: &Connection, cmd: &Command) -> Result<Option<Value>, StepError>;

    /// Names of the queries [`query`](Self::query) answers (`jetsaga.query.<service>.<what>`).
    fn queries(&self) -> &'static [&'static str];

    /// Answers a read-only query on a read-only connection; `Err` becomes `{"error": ...}`.
    fn query(&self, conn: &Connection, what: &str, req: &Value) -> Result<Value, String>;
}
