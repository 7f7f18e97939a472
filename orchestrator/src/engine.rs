//! The pure saga engine: `state + input + now -> new state`, and `state -> effects`.
//!
//! No tokio, no NATS, no clock: time is passed in and randomness (retry jitter) is a hash of the
//! saga id, step and attempt, so the same inputs always give the same outputs. The driver applies
//! one input at a time under a revision-checked KV write, then publishes [`effects`] of the state
//! it wrote (or found). Effects are derived from the state, never remembered separately, which is
//! what makes a redelivered input able to finish a crashed transition.
//!
//! Transitions, by saga status (A = awaited step, n = its current attempt):
//!
//! | status        | input                              | result                                        |
//! |---------------|------------------------------------|-----------------------------------------------|
//! | running       | action success for (A, n)          | A succeeded; dispatch A+1, or completed       |
//! | running/comp. | definitive reply of an older attempt | counts as the current attempt's reply       |
//! | running       | action business failure / aborted  | A failed; compensate from A down              |
//! | running       | action retryable failure, n < max  | wait back-off, then dispatch attempt n+1      |
//! | running       | action retryable failure, n = max  | A failed; compensate from A down              |
//! | running       | timeout timer for (A, n)           | A failed (timed out); compensate from A down  |
//! | running       | operator abort                     | A failed (aborted); compensate from A down    |
//! | compensating  | compensation success for (A, n)    | A compensated; next lower, or compensated     |
//! | compensating  | compensation failure/timeout, n<max| wait back-off, then dispatch attempt n+1      |
//! | compensating  | compensation failure/timeout, n=max| stuck (parked for an operator)                |
//! | stuck         | operator retry                     | compensating; the policy counts afresh        |
//! | any           | retry timer for (A, n) while waiting | dispatch attempt n+1                        |
//! | running       | deadline timer                     | A failed (deadline); compensate from A down   |
//! | waiting       | live watchdog, due                 | deadline or timeout of the awaited attempt if overdue; re-arm |
//! | any           | anything else (stale, duplicate)   | ignored                                       |

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    definition::{Definition, RetryPolicy},
    state::{EventRecord, Failure, SagaState, SagaStatus, StepState, StepStatus, Stuck},
};
use jetsaga_common::{
    protocol::{Command, Op, Outcome, Reply},
    time::rfc3339,
};

/// What a timer message asks for when it comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The awaited attempt got no reply in time.
    Timeout,
    /// A back-off ended: dispatch the next attempt.
    Retry,
    /// The saga's deadline passed: if it is still running, abort it.
    Deadline,
    /// The one timer a waiting saga keeps: when due, it times out the awaited attempt or aborts a
    /// saga past its deadline, or re-arms itself for the next due time. One timer per saga instead
    /// of one per attempt: a saga that finishes quickly costs a single timer message.
    Watchdog,
}

/// A durable timer: stored as a message schedule on [`Timer::schedule_subject`], which the server
/// publishes to `saga.timer.<saga_id>` at `due_ms`; acted on once `due_ms` has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timer {
    pub saga_id: String,
    pub kind: TimerKind,
    pub step: u32,
    pub op: Op,
    pub attempt: u32,
    pub due_ms: u64,
}

impl Timer {
    /// Where the due timer is delivered (the schedule's target).
    pub fn subject(&self) -> String {
        format!("saga.timer.{}", self.saga_id)
    }
    /// Where the timer waits until due: one schedule subject per timer (its message id). Not one
    /// per saga: the server keeps one schedule per subject, so a slow orchestrator publishing an
    /// older watchdog late would replace the live one, which would then never fire.
    pub fn schedule_subject(&self) -> String {
        format!("saga.sched.{}", self.msg_id())
    }
    /// The `Nats-Schedule` header value: fire once at the due time.
    pub fn schedule(&self) -> String {
        format!("@at {}", jetsaga_common::time::rfc3339(self.due_ms))
    }
    pub fn msg_id(&self) -> String {
        let kind = match self.kind {
            TimerKind::Timeout => "timeout",
            TimerKind::Retry => "retry",
            TimerKind::Deadline => return format!("{}.deadline", self.saga_id),
            TimerKind::Watchdog => return format!("{}.watchdog.{}", self.saga_id, self.due_ms),
        };
        format!(
            "{}.{}.{}.{}.{kind}",
            self.saga_id,
            self.step,
            self.op.as_str(),
            self.attempt
        )
    }
}

/// Operator commands, sent as messages so they follow the same rule as every other input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operator {
    /// Compensate a running saga.
    Abort {
        #[serde(default)]
        reason: Option<String>,
    },
    /// Resume the compensation of a stuck saga.
    Retry,
}

/// One input to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Reply(Reply),
    Timer(Timer),
    Operator(Operator),
}

/// The result of applying an input.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Write this state (then publish its effects).
    Applied(Box<SagaState>),
    /// Nothing changes; the reason says why (stale, duplicate, not due, ...).
    Ignored(String),
}

/// A lifecycle event ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMsg {
    pub subject: String,
    pub msg_id: String,
    pub payload: Value,
}

/// Everything the current state implies should be in the streams.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Effects {
    pub commands: Vec<Command>,
    pub timers: Vec<Timer>,
    pub events: Vec<EventMsg>,
    /// Schedule subjects ([`Timer::schedule_subject`]) to clear: the watchdog of a saga that
    /// ended before it came due. Only an optimisation — a watchdog left behind fires and is
    /// ignored — but it saves a delivery, a KV read and an ack per saga.
    pub cancel_schedules: Vec<String>,
    /// The saga's trace id, for the `traceparent` header of everything published.
    pub trace_id: Option<String>,
}

fn event(name: &str, step: Option<&str>, detail: Option<String>) -> EventRecord {
    EventRecord {
        event: name.to_string(),
        step: step.map(str::to_string),
        detail,
    }
}

/// The state of a new saga, its first step dispatched.
pub fn start(
    def: &Definition,
    saga_id: &str,
    input: Value,
    request_seq: u64,
    now: u64,
) -> SagaState {
    let at = rfc3339(now);
    let steps = def
        .steps
        .iter()
        .map(|s| StepState {
            name: s.name.clone(),
            service: s.service.clone(),
            action: s.action.clone(),
            compensation: s.compensation.clone(),
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            compensation_attempts_forgiven: 0,
            started_at: None,
            ended_at: None,
            error: None,
            output: None,
            compensation_started_at: None,
            compensation_ended_at: None,
            compensation_error: None,
            dispatched_at_ms: None,
            retry_at_ms: None,
        })
        .collect();
    let mut s = SagaState {
        saga_id: saga_id.to_string(),
        kind: def.kind.clone(),
        status: SagaStatus::Running,
        input,
        steps,
        failure: None,
        stuck: None,
        request_seq,
        version: 1,
        last_input: request_input_id(request_seq),
        watchdog_armed_version: 0,
        watchdog_due_ms: None,
        trace_id: None,
        parent_span_id: None,
        created_at: at.clone(),
        updated_at: at,
        created_ms: now,
        updated_ms: now,
        events: vec![event("started", None, None)],
    };
    dispatch(&mut s, 0, Op::Action, now);
    arm_watchdog(def, &mut s, now);
    s
}

/// Identity of the request with stream sequence `seq`, as recorded in `last_input`.
pub fn request_input_id(seq: u64) -> String {
    format!("request:{seq}")
}

impl Input {
    /// A stable identity of this input: the same message redelivered has the same id. Operator
    /// commands have no natural id, so the driver passes their stream sequence.
    pub fn id(&self, ops_seq: u64) -> String {
        match self {
            Input::Reply(r) => format!("reply:{}.{}.{}", r.step, r.op.as_str(), r.attempt),
            Input::Timer(t) => format!("timer:{}", t.msg_id()),
            Input::Operator(_) => format!("op:{ops_seq}"),
        }
    }
}

/// Applies one input. Pure: the same state, input and time give the same result. `input_id`
/// (see [`Input::id`]) is recorded in the new state's `last_input`.
pub fn apply(
    def: &Definition,
    state: &SagaState,
    input: &Input,
    input_id: &str,
    now: u64,
) -> Transition {
    let mut s = state.clone();
    s.events.clear();
    s.last_input = input_id.to_string();
    let result = match input {
        Input::Reply(r) => on_reply(def, &mut s, r, now),
        Input::Timer(t) if t.kind == TimerKind::Watchdog => on_watchdog(def, &mut s, t, now),
        Input::Timer(t) => on_timer(def, &mut s, t, now),
        Input::Operator(o) => on_operator(def, &mut s, o, now),
    };
    match result {
        Ok(()) => {
            s.version += 1;
            s.updated_ms = now;
            s.updated_at = rfc3339(now);
            arm_watchdog(def, &mut s, now);
            Transition::Applied(Box::new(s))
        }
        Err(reason) => Transition::Ignored(reason),
    }
}

/// Arms a new watchdog if the saga waits for something and the live one would look too late
/// (the newly awaited step has a shorter timeout) or has already come due (it fired, or the
/// saga was parked and is resumed). With uniform step timeouts a saga keeps the one watchdog it
/// got at the start, and a saga that ends before it is due costs one timer in all.
fn arm_watchdog(def: &Definition, s: &mut SagaState, now: u64) {
    let Some(due) = watchdog_due(def, s) else {
        return;
    };
    let arm = match s.watchdog_due_ms {
        None => true,
        Some(live) => due < live || live <= now,
    };
    if arm {
        s.watchdog_due_ms = Some(due);
        s.watchdog_armed_version = s.version;
    }
}

/// Checks that an input addresses the attempt the saga is waiting for.
fn check_awaited(s: &SagaState, step: u32, op: Op, attempt: u32) -> Result<usize, String> {
    let Some((i, want_op)) = s.awaiting() else {
        return Err(format!("saga is {}", s.status.as_str()));
    };
    if i != step as usize || want_op != op {
        return Err(format!(
            "stale: saga awaits step {i} {}, input is for step {step} {}",
            want_op.as_str(),
            op.as_str()
        ));
    }
    let current = s.attempt(i, op);
    if attempt != current {
        return Err(format!(
            "stale: attempt {attempt}, saga awaits attempt {current}"
        ));
    }
    Ok(i)
}

/// Checks that a reply addresses the awaited step and op. The current attempt's reply always
/// counts. An earlier attempt's reply (or one that comes while a back-off runs) counts only if it
/// is definitive: the participant's barrier records one result per (saga, step, op) whatever the
/// attempt, so a late "success" means the work is done — a compensation that succeeded after its
/// attempt timed out must not be retried into `stuck`. Late retryable failures are stale.
fn check_reply(s: &SagaState, r: &Reply) -> Result<usize, String> {
    let Some((i, want_op)) = s.awaiting() else {
        return Err(format!("saga is {}", s.status.as_str()));
    };
    if i != r.step as usize || want_op != r.op {
        return Err(format!(
            "stale: saga awaits step {i} {}, reply is for step {} {}",
            want_op.as_str(),
            r.step,
            r.op.as_str()
        ));
    }
    let current = s.attempt(i, r.op);
    if r.attempt > current {
        return Err(format!(
            "reply for attempt {}, only {current} dispatched",
            r.attempt
        ));
    }
    let late = r.attempt < current || s.steps[i].retry_at_ms.is_some();
    if late && r.outcome == Outcome::RetryableFailure {
        return Err(format!(
            "stale: retryable failure of attempt {}, saga is past it",
            r.attempt
        ));
    }
    Ok(i)
}

fn on_reply(def: &Definition, s: &mut SagaState, r: &Reply, now: u64) -> Result<(), String> {
    if r.saga_id != s.saga_id {
        return Err(format!("reply is for saga {}", r.saga_id));
    }
    let i = check_reply(s, r)?;
    if r.service != s.steps[i].service {
        return Err(format!(
            "reply from service {}, step {i} belongs to {}",
            r.service, s.steps[i].service
        ));
    }
    let error = r.error.clone().unwrap_or_else(|| "no reason given".into());
    match (r.op, r.outcome) {
        (Op::Action, Outcome::Success) => {
            let at = rfc3339(now);
            let st = &mut s.steps[i];
            st.status = StepStatus::Succeeded;
            st.ended_at = Some(at);
            st.output = r.output.clone();
            st.error = None;
            st.dispatched_at_ms = None;
            let name = st.name.clone();
            s.events.push(event("step_succeeded", Some(&name), None));
            if i + 1 == s.steps.len() {
                s.status = SagaStatus::Completed;
                s.events.push(event("completed", None, None));
            } else {
                dispatch(s, i + 1, Op::Action, now);
            }
        }
        (Op::Action, Outcome::BusinessFailure | Outcome::Aborted) => {
            fail_step(def, s, i, error, now)
        }
        (Op::Action, Outcome::RetryableFailure) => {
            let policy = &def.steps[i].retry;
            retry_or(
                def,
                s,
                i,
                Op::Action,
                policy,
                error,
                now,
                |def, s, i, err, now| {
                    let attempts = s.steps[i].attempts;
                    fail_step(
                        def,
                        s,
                        i,
                        format!("gave up after {attempts} attempts: {err}"),
                        now,
                    )
                },
            );
        }
        (Op::Compensation, Outcome::Success) => {
            let st = &mut s.steps[i];
            st.status = StepStatus::Compensated;
            st.compensation_ended_at = Some(rfc3339(now));
            st.compensation_error = None;
            st.dispatched_at_ms = None;
            let name = st.name.clone();
            s.events.push(event("step_compensated", Some(&name), None));
            next_compensation(s, i, now);
        }
        (Op::Compensation, _) => compensation_failed(def, s, i, error, now),
    }
    Ok(())
}

fn on_timer(def: &Definition, s: &mut SagaState, t: &Timer, now: u64) -> Result<(), String> {
    if t.saga_id != s.saga_id {
        return Err(format!("timer is for saga {}", t.saga_id));
    }
    if now < t.due_ms {
        return Err(format!("not due for {} ms", t.due_ms - now));
    }
    if t.kind == TimerKind::Deadline {
        let Some((i, Op::Action)) = s.awaiting() else {
            return Err(format!(
                "deadline passed, but the saga is {}",
                s.status.as_str()
            ));
        };
        let ms = def.deadline_ms.unwrap_or_default();
        fail_step(def, s, i, format!("saga deadline of {ms} ms exceeded"), now);
        return Ok(());
    }
    let i = check_awaited(s, t.step, t.op, t.attempt)?;
    let waiting = s.steps[i].retry_at_ms.is_some();
    match (t.kind, waiting) {
        (TimerKind::Retry, true) => {
            dispatch(s, i, t.op, now);
            Ok(())
        }
        (TimerKind::Timeout, false) => {
            let ms = def.steps[i].timeout_ms;
            let reason = format!("timed out after {ms} ms (attempt {})", t.attempt);
            match t.op {
                Op::Action => fail_step(def, s, i, reason, now),
                Op::Compensation => compensation_failed(def, s, i, reason, now),
            }
            Ok(())
        }
        (TimerKind::Retry, false) => {
            Err("stale retry timer: the attempt is already dispatched".into())
        }
        (TimerKind::Timeout, true) => Err("stale timeout: the attempt already failed".into()),
        (TimerKind::Deadline | TimerKind::Watchdog, _) => {
            unreachable!("deadline and watchdog timers are handled before")
        }
    }
}

/// When the saga's watchdog should next look: the awaited attempt's timeout (counted from its
/// dispatch, or from the end of its back-off), or the saga's deadline if that comes first.
/// `None` once nothing is awaited (terminal or stuck): the watchdog chain ends.
pub fn watchdog_due(def: &Definition, s: &SagaState) -> Option<u64> {
    let (i, _) = s.awaiting()?;
    let st = &s.steps[i];
    let timeout = def.steps.get(i).map(|d| d.timeout_ms).unwrap_or(30_000);
    let from = st
        .retry_at_ms
        .or(st.dispatched_at_ms)
        .unwrap_or(s.updated_ms);
    let step_due = from + timeout;
    let deadline = match (s.status, def.deadline_ms) {
        (SagaStatus::Running, Some(ms)) => Some(s.created_ms + ms),
        _ => None,
    };
    Some(deadline.map_or(step_due, |d| d.min(step_due)))
}

/// The live watchdog is due: abort a saga past its deadline, time out an awaited attempt that
/// is overdue, or else change nothing (the saga moved on; `arm_watchdog` sets the next one).
fn on_watchdog(def: &Definition, s: &mut SagaState, t: &Timer, now: u64) -> Result<(), String> {
    if t.saga_id != s.saga_id {
        return Err(format!("timer is for saga {}", t.saga_id));
    }
    if now < t.due_ms {
        return Err(format!("not due for {} ms", t.due_ms - now));
    }
    if s.watchdog_due_ms != Some(t.due_ms) {
        return Err("stale watchdog: another one is live".into());
    }
    let Some((i, op)) = s.awaiting() else {
        return Err(format!("watchdog: saga is {}", s.status.as_str()));
    };
    if let (SagaStatus::Running, Some(ms)) = (s.status, def.deadline_ms) {
        if now >= s.created_ms + ms {
            fail_step(def, s, i, format!("saga deadline of {ms} ms exceeded"), now);
            return Ok(());
        }
    }
    let st = &s.steps[i];
    let overdue = st.retry_at_ms.is_none()
        && st.dispatched_at_ms.unwrap_or(s.updated_ms) + def.steps[i].timeout_ms <= now;
    if overdue {
        let timeout = Timer {
            saga_id: s.saga_id.clone(),
            kind: TimerKind::Timeout,
            step: i as u32,
            op,
            attempt: s.attempt(i, op),
            due_ms: now,
        };
        return on_timer(def, s, &timeout, now);
    }
    Ok(())
}

fn on_operator(def: &Definition, s: &mut SagaState, o: &Operator, now: u64) -> Result<(), String> {
    match o {
        Operator::Abort { reason } => {
            let Some((i, Op::Action)) = s.awaiting() else {
                return Err(format!(
                    "only a running saga can be aborted; it is {}",
                    s.status.as_str()
                ));
            };
            let why = reason.clone().unwrap_or_else(|| "no reason given".into());
            fail_step(def, s, i, format!("aborted by operator: {why}"), now);
            Ok(())
        }
        Operator::Retry => {
            if s.status != SagaStatus::Stuck {
                return Err(format!(
                    "only a stuck saga can be retried; it is {}",
                    s.status.as_str()
                ));
            }
            let i = s
                .steps
                .iter()
                .position(|st| st.status == StepStatus::Compensating)
                .ok_or("stuck saga has no compensating step")?;
            let st = &mut s.steps[i];
            st.compensation_attempts_forgiven = st.compensation_attempts;
            s.status = SagaStatus::Compensating;
            s.stuck = None;
            let name = s.steps[i].name.clone();
            s.events.push(event("retried", Some(&name), None));
            dispatch(s, i, Op::Compensation, now);
            Ok(())
        }
    }
}

/// Sends attempt n+1 of `op` on step `i`.
fn dispatch(s: &mut SagaState, i: usize, op: Op, now: u64) {
    let at = rfc3339(now);
    let st = &mut s.steps[i];
    st.retry_at_ms = None;
    st.dispatched_at_ms = Some(now);
    match op {
        Op::Action => {
            st.status = StepStatus::Running;
            st.attempts += 1;
            st.started_at.get_or_insert(at);
        }
        Op::Compensation => {
            st.status = StepStatus::Compensating;
            st.compensation_attempts += 1;
            st.compensation_started_at.get_or_insert(at);
        }
    }
}

/// Either waits for a back-off before the next attempt, or gives up through `give_up`.
#[allow(clippy::too_many_arguments)]
fn retry_or(
    def: &Definition,
    s: &mut SagaState,
    i: usize,
    op: Op,
    policy: &RetryPolicy,
    error: String,
    now: u64,
    give_up: impl FnOnce(&Definition, &mut SagaState, usize, String, u64),
) {
    let st = &s.steps[i];
    let (done, forgiven) = match op {
        Op::Action => (st.attempts, 0),
        Op::Compensation => (st.compensation_attempts, st.compensation_attempts_forgiven),
    };
    if done - forgiven >= policy.max_attempts {
        return give_up(def, s, i, error, now);
    }
    let wait = backoff_ms(
        policy,
        done - forgiven,
        jitter_seed(&s.saga_id, i, op, done),
    );
    let name = st.name.clone();
    let st = &mut s.steps[i];
    match op {
        Op::Action => st.error = Some(error.clone()),
        Op::Compensation => st.compensation_error = Some(error.clone()),
    }
    st.dispatched_at_ms = None;
    st.retry_at_ms = Some(now + wait);
    s.events.push(event(
        "step_retrying",
        Some(&name),
        Some(format!(
            "{} attempt {done} failed: {error}; next in {wait} ms",
            op.as_str()
        )),
    ));
    if wait == 0 {
        dispatch(s, i, op, now);
    }
}

fn compensation_failed(def: &Definition, s: &mut SagaState, i: usize, error: String, now: u64) {
    let policy = def.steps[i].compensation_retry.clone();
    retry_or(
        def,
        s,
        i,
        Op::Compensation,
        &policy,
        error,
        now,
        |_, s, i, err, now| {
            let st = &mut s.steps[i];
            st.compensation_error = Some(err.clone());
            st.dispatched_at_ms = None;
            let attempts = st.compensation_attempts;
            let name = st.name.clone();
            s.status = SagaStatus::Stuck;
            s.stuck = Some(Stuck {
                step: name.clone(),
                last_error: err.clone(),
                attempts,
            });
            s.events.push(event(
                "stuck",
                Some(&name),
                Some(format!("compensation failed {attempts} times: {err}")),
            ));
            let _ = now;
        },
    );
}

/// Marks step `i` failed and starts compensating from it downwards.
fn fail_step(_def: &Definition, s: &mut SagaState, i: usize, reason: String, now: u64) {
    let st = &mut s.steps[i];
    st.status = StepStatus::Failed;
    st.ended_at = Some(rfc3339(now));
    st.error = Some(reason.clone());
    st.dispatched_at_ms = None;
    st.retry_at_ms = None;
    let name = st.name.clone();
    s.failure = Some(Failure {
        step: name.clone(),
        reason: reason.clone(),
    });
    s.status = SagaStatus::Compensating;
    s.events
        .push(event("step_failed", Some(&name), Some(reason)));
    s.events.push(event("compensating", None, None));
    // The failed step itself is compensated too: its action may have run (a timeout, a late
    // delivery) and the participant's barrier turns an unnecessary compensation into a no-op.
    next_compensation(s, i + 1, now);
}

/// Dispatches the compensation of the highest dispatched step below `below`, or ends the saga.
fn next_compensation(s: &mut SagaState, below: usize, now: u64) {
    let next = (0..below).rev().find(|&j| {
        let st = &s.steps[j];
        st.compensation.is_some() && matches!(st.status, StepStatus::Succeeded | StepStatus::Failed)
    });
    match next {
        Some(j) => dispatch(s, j, Op::Compensation, now),
        None => {
            s.status = SagaStatus::Compensated;
            s.events.push(event(
                "compensated",
                None,
                s.failure.as_ref().map(|f| f.reason.clone()),
            ));
        }
    }
}

/// Back-off before attempt `failed + 1`: `initial * multiplier^(failed-1)`, capped, with jitter
/// `seed` (0..1) spreading it by +/- `policy.jitter`, and never above the cap.
pub fn backoff_ms(policy: &RetryPolicy, failed: u32, seed: f64) -> u64 {
    let exp = failed.saturating_sub(1).min(63) as i32;
    let base = (policy.initial_backoff_ms as f64 * policy.multiplier.powi(exp))
        .min(policy.max_backoff_ms as f64);
    let spread = base * policy.jitter * (2.0 * seed - 1.0);
    (base + spread).clamp(0.0, policy.max_backoff_ms as f64) as u64
}

/// A deterministic number in [0, 1) for the jitter of one retry (FNV-1a over its identity).
fn jitter_seed(saga_id: &str, step: usize, op: Op, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in saga_id
        .bytes()
        .chain((step as u64).to_le_bytes())
        .chain(op.as_str().bytes())
        .chain(attempt.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The commands, timers and events the state implies. Publishing them again is harmless: message
/// ids dedup them in the streams and the participants' barrier absorbs late repeats.
pub fn effects(s: &SagaState) -> Effects {
    let mut fx = Effects {
        trace_id: s.trace_id.clone(),
        ..Effects::default()
    };
    for e in &s.events {
        fx.events.push(event_msg(s, e));
    }
    let watchdog = |due_ms| Timer {
        saga_id: s.saga_id.clone(),
        kind: TimerKind::Watchdog,
        step: 0,
        op: Op::Action,
        attempt: 0,
        due_ms,
    };
    // The watchdog goes out with the state that armed it, not again with every transition.
    if let (Some(due), true) = (s.watchdog_due_ms, s.watchdog_armed_version == s.version) {
        if s.awaiting().is_some() {
            fx.timers.push(watchdog(due));
        }
    }
    // A saga that ended has no use for a watchdog that has not fired yet. (Only on a terminal
    // state: a parked saga keeps its watchdog, which an operator retry relies on.)
    if let (true, Some(due)) = (s.status.is_terminal(), s.watchdog_due_ms) {
        if due > s.updated_ms {
            fx.cancel_schedules.push(watchdog(due).schedule_subject());
        }
    }
    let Some((i, op)) = s.awaiting() else {
        return fx;
    };
    let st = &s.steps[i];
    let attempt = s.attempt(i, op);
    if let Some(due) = st.retry_at_ms {
        fx.timers.push(Timer {
            saga_id: s.saga_id.clone(),
            kind: TimerKind::Retry,
            step: i as u32,
            op,
            attempt,
            due_ms: due,
        });
        return fx;
    }
    let action = match op {
        Op::Action => st.action.clone(),
        Op::Compensation => st.compensation.clone().unwrap_or_default(),
    };
    fx.commands.push(Command {
        saga_id: s.saga_id.clone(),
        kind: s.kind.clone(),
        step: i as u32,
        step_name: st.name.clone(),
        service: st.service.clone(),
        action,
        op,
        attempt,
        input: s.input.clone(),
    });
    fx
}

fn event_msg(s: &SagaState, e: &EventRecord) -> EventMsg {
    let mut payload = serde_json::json!({
        "saga_id": s.saga_id,
        "kind": s.kind,
        "event": e.event,
        "status": s.status,
        "version": s.version,
        "at": s.updated_at,
    });
    if let Some(step) = &e.step {
        payload["step"] = step.clone().into();
    }
    if let Some(d) = &e.detail {
        payload["detail"] = d.clone().into();
    }
    EventMsg {
        subject: jetsaga_common::protocol::event_subject(&s.saga_id, &e.event),
        msg_id: format!(
            "{}.{}.{}.{}",
            s.saga_id,
            s.version,
            e.event,
            e.step.as_deref().unwrap_or("-")
        ),
        payload,
    }
}
