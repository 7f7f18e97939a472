//! The saga state stored as JSON in the `sagas` KV bucket under the saga id.
//!
//! It is the only memory of a saga: the engine reads it, returns the next one, and the driver
//! derives from it which commands, timers and events are due (so a redelivered input can
//! republish them after a crash). It is also what an operator reads with `nats kv get sagas <id>`,
//! so names are plain and timestamps are RFC 3339.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use jetsaga_common::protocol::Op;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Running the steps forward.
    Running,
    /// A step failed; compensations are running in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every dispatched step was compensated.
    Compensated,
    /// A compensation kept failing past its retry policy; an operator must look.
    Stuck,
}

impl SagaStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not dispatched yet.
    Pending,
    /// Action dispatched (or waiting for its retry), reply awaited.
    Running,
    Succeeded,
    /// The action failed (business failure, retries exhausted, timed out, or aborted).
    Failed,
    /// Compensation dispatched (or waiting for its retry), reply awaited.
    Compensating,
    Compensated,
}

/// One step of one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub service: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<String>,
    pub status: StepStatus,
    /// Action attempts dispatched so far.
    pub attempts: u32,
    /// Compensation attempts dispatched so far.
    #[serde(default)]
    pub compensation_attempts: u32,
    /// Compensation attempts that an operator retry wrote off (the policy counts from here).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_attempts_forgiven: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_error: Option<String>,
    /// When the awaited attempt was dispatched (its timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at_ms: Option<u64>,
    /// Set while waiting for a back-off before the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why a saga compensated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    pub reason: String,
}

/// Where a saga is parked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stuck {
    pub step: String,
    pub last_error: String,
    pub attempts: u32,
}

/// A lifecycle event emitted by a transition, published as `saga.events.<id>.<event>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The whole state of one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub saga_id: String,
    pub kind: String,
    pub status: SagaStatus,
    pub input: Value,
    pub steps: Vec<StepState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck: Option<Stuck>,
    /// Stream sequence of the request that started the saga: a redelivery of that request is
    /// recognised (and republishes what is due); another request for the same id is not.
    pub request_seq: u64,
    /// Number of transitions applied; part of every event's message id.
    pub version: u64,
    /// Identity of the input that produced this state. If that input comes again (it was not acked
    /// before a crash), the driver republishes this state's effects; any other ignored input is
    /// simply acked.
    #[serde(default)]
    pub last_input: String,
    pub created_at: String,
    pub updated_at: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The version at which the saga's watchdog timer was (re)armed: that state's effects carry
    /// the watchdog, later states' do not (the watchdog re-arms itself while the saga waits).
    #[serde(default)]
    pub watchdog_armed_version: u64,
    /// Due time of the live watchdog; a watchdog message with another due time is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_due_ms: Option<u64>,
    /// W3C trace id of the saga: the request's `traceparent`, or a new one. Every command and
    /// event carries it, so one saga is one trace across processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The span id of the request's `traceparent`, if it came with one: the saga's root span
    /// is its child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// Events of the last transition, republished if its input is redelivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
}

impl SagaState {
    /// The step whose reply (or retry) the saga is waiting for, with the op.
    pub fn awaiting(&self) -> Option<(usize, Op)> {
        let (want, op) = match self.status {
            SagaStatus::Running => (StepStatus::Running, Op::Action),
            SagaStatus::Compensating => (StepStatus::Compensating, Op::Compensation),
            _ => return None,
        };
        self.steps
            .iter()
            .position(|s| s.status == want)
            .map(|i| (i, op))
    }

    /// The attempt number of `op` on step `i`.
    pub fn attempt(&self, i: usize, op: Op) -> u32 {
        match op {
            Op::Action => self.steps[i].attempts,
            Op::Compensation => self.steps[i].compensation_attempts,
        }
    }

    /// The step shown to operators as "current": the awaited one, else the last one touched.
    pub fn current_step(&self) -> Option<&StepState> {
        match self.awaiting() {
            Some((i, _)) => Some(&self.steps[i]),
            None => self
                .steps
                .iter()
                .rev()
                .find(|s| s.status != StepStatus::Pending),
        }
    }
}
