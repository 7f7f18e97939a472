//! Table-driven scenarios for the pure engine: inputs in, state and effects out, no server.
//!
//! Each row feeds one input and states what must follow: the saga status, every step's status as
//! one letter (P pending, R running, S succeeded, F failed, C compensating, X compensated), and what
//! is due next (`1a2` = command for step 1's action, attempt 2; `0c1` = step 0's compensation,
//! attempt 1; `w1a3` = waiting for the back-off before step 1's action attempt 3; `-` = nothing).
//! A status written `=running` means the input must be ignored and the state left as it was.

use serde_json::json;

use crate::{
    definition::{Definition, RetryPolicy},
    engine::{self, apply, effects, start, Input, Operator, Timer, TimerKind, Transition},
    state::{SagaState, SagaStatus, StepStatus},
};
use jetsaga_common::protocol::{Op, Outcome, Reply};

/// Inputs, named by what they are.
#[derive(Debug, Clone, Copy)]
enum I {
    /// Action reply for (step, attempt).
    Ok(u32, u32),
    Biz(u32, u32),
    Tech(u32, u32),
    Aborted(u32, u32),
    /// Compensation reply for (step, attempt).
    COk(u32, u32),
    CFail(u32, u32),
    /// Timer for (step, op, attempt), due now.
    Timeout(u32, Op, u32),
    RetryDue(u32, Op, u32),
    /// A timeout that is not due yet.
    EarlyTimeout(u32, Op, u32),
    OpAbort,
    OpRetry,
    /// A reply from the wrong service for (step, attempt).
    WrongService(u32, u32),
    /// The saga's deadline timer, due now.
    Deadline,
}

const A: Op = Op::Action;
const C: Op = Op::Compensation;

fn def() -> Definition {
    let mut d = Definition::builtin_order();
    for s in &mut d.steps {
        s.retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            multiplier: 2.0,
            jitter: 0.0,
        };
        s.compensation_retry = RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 0,
            max_backoff_ms: 0,
            multiplier: 1.0,
            jitter: 0.0,
        };
    }
    d
}

fn reply(step: u32, op: Op, attempt: u32, outcome: Outcome, service: &str) -> Input {
    Input::Reply(Reply {
        saga_id: "o-1".into(),
        step,
        op,
        attempt,
        service: service.into(),
        outcome,
        error: (outcome != Outcome::Success).then(|| "nope".into()),
        output: None,
    })
}

fn to_input(d: &Definition, i: I, now: u64) -> Input {
    let svc = |s: u32| d.steps[s as usize].service.clone();
    let timer = |kind, step, op, attempt, due_ms| {
        Input::Timer(Timer {
            saga_id: "o-1".into(),
            kind,
            step,
            op,
            attempt,
            due_ms,
        })
    };
    match i {
        I::Ok(s, a) => reply(s, A, a, Outcome::Success, &svc(s)),
        I::Biz(s, a) => reply(s, A, a, Outcome::BusinessFailure, &svc(s)),
        I::Tech(s, a) => reply(s, A, a, Outcome::RetryableFailure, &svc(s)),
        I::Aborted(s, a) => reply(s, A, a, Outcome::Aborted, &svc(s)),
        I::COk(s, a) => reply(s, C, a, Outcome::Success, &svc(s)),
        I::CFail(s, a) => reply(s, C, a, Outcome::RetryableFailure, &svc(s)),
        I::Timeout(s, op, a) => timer(TimerKind::Timeout, s, op, a, now),
        I::RetryDue(s, op, a) => timer(TimerKind::Retry, s, op, a, now),
        I::EarlyTimeout(s, op, a) => timer(TimerKind::Timeout, s, op, a, now + 1),
        I::OpAbort => Input::Operator(Operator::Abort {
            reason: Some("test".into()),
        }),
        I::OpRetry => Input::Operator(Operator::Retry),
        I::WrongService(s, a) => reply(s, A, a, Outcome::Success, "someone-else"),
        I::Deadline => timer(TimerKind::Deadline, 0, A, 0, now),
    }
}

fn steps_code(s: &SagaState) -> String {
    s.steps
        .iter()
        .map(|st| match st.status {
            StepStatus::Pending => 'P',
            StepStatus::Running => 'R',
            StepStatus::Succeeded => 'S',
            StepStatus::Failed => 'F',
            StepStatus::Compensating => 'C',
            StepStatus::Compensated => 'X',
        })
        .collect()
}

fn due_code(s: &SagaState) -> String {
    let fx = effects(s);
    if let Some(c) = fx.commands.first() {
        assert_eq!(fx.commands.len(), 1, "one command at a time");
        let o = if c.op == A { 'a' } else { 'c' };
        return format!("{}{o}{}", c.step, c.attempt);
    }
    if let Some(t) = fx.timers.iter().find(|t| t.kind == TimerKind::Retry) {
        let o = if t.op == A { 'a' } else { 'c' };
        return format!("w{}{o}{}", t.step, t.attempt + 1);
    }
    "-".into()
}

type Row = (I, &'static str, &'static str, &'static str);

fn run(name: &str, rows: &[Row]) -> SagaState {
    let d = def();
    let input = json!({"order_id":"o-1","customer_id":"c-1","items":[],"amount_cents":5});
    let mut now = 1_000_000;
    let mut s = start(&d, "o-1", input, 7, now);
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(steps_code(&s), "RPPP", "{name}: start");
    assert_eq!(due_code(&s), "0a1", "{name}: start");
    for (n, (i, status, steps, due)) in rows.iter().enumerate() {
        now += 1000;
        let input = to_input(&d, *i, now);
        let id = input.id(n as u64);
        let ctx = format!("{name}, row {n} ({i:?})");
        match apply(&d, &s, &input, &id, now) {
            Transition::Applied(next) => {
                assert!(
                    !status.starts_with('='),
                    "{ctx}: should be ignored, got {:?}",
                    next.status
                );
                assert_eq!(next.version, s.version + 1, "{ctx}");
                assert_eq!(next.last_input, id, "{ctx}");
                s = *next;
                assert_eq!(s.status.as_str(), *status, "{ctx}");
            }
            Transition::Ignored(reason) => {
                assert!(
                    status.starts_with('='),
                    "{ctx}: ignored ({reason}), expected {status}"
                );
                assert_eq!(s.status.as_str(), &status[1..], "{ctx}");
            }
        }
        assert_eq!(steps_code(&s), *steps, "{ctx}");
        assert_eq!(due_code(&s), *due, "{ctx}");
    }
    s
}

#[test]
fn happy_path_completes() {
    let s = run(
        "happy",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Ok(1, 1), "running", "SSRP", "2a1"),
            (I::Ok(2, 1), "running", "SSSR", "3a1"),
            (I::Ok(3, 1), "completed", "SSSS", "-"),
            // Everything after the end is ignored.
            (I::Ok(3, 1), "=completed", "SSSS", "-"),
            (I::Timeout(3, A, 1), "=completed", "SSSS", "-"),
            (I::OpAbort, "=completed", "SSSS", "-"),
            (I::OpRetry, "=completed", "SSSS", "-"),
        ],
    );
    assert!(s.failure.is_none());
    let events: Vec<_> = s.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["step_succeeded", "completed"]);
}

#[test]
fn payment_refused_cancels_the_order() {
    let s = run(
        "balance",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Biz(1, 1), "compensating", "SCPP", "1c1"),
            // The failed step is compensated too (a no-op at the barrier), then the order.
            (I::COk(1, 1), "compensating", "CXPP", "0c1"),
            (I::COk(0, 1), "compensated", "XXPP", "-"),
        ],
    );
    let f = s.failure.unwrap();
    assert_eq!(f.step, "payment.deduct");
    assert_eq!(f.reason, "nope");
}

#[test]
fn stock_short_refunds_then_cancels() {
    run(
        "stock",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Ok(1, 1), "running", "SSRP", "2a1"),
            (I::Biz(2, 1), "compensating", "SSCP", "2c1"),
            (I::COk(2, 1), "compensating", "SCXP", "1c1"),
            (I::COk(1, 1), "compensating", "CXXP", "0c1"),
            (I::COk(0, 1), "compensated", "XXXP", "-"),
        ],
    );
}

#[test]
fn last_step_without_compensation_fails_into_the_others() {
    run(
        "approve fails",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Ok(1, 1), "running", "SSRP", "2a1"),
            (I::Ok(2, 1), "running", "SSSR", "3a1"),
            // order.approve has no compensation: the compensations start below it.
            (I::Aborted(3, 1), "compensating", "SSCF", "2c1"),
            (I::COk(2, 1), "compensating", "SCXF", "1c1"),
            (I::COk(1, 1), "compensating", "CXXF", "0c1"),
            (I::COk(0, 1), "compensated", "XXXF", "-"),
        ],
    );
}

#[test]
fn duplicates_and_stale_inputs_are_ignored() {
    run(
        "stale",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Ok(0, 1), "=running", "SRPP", "1a1"),
            (I::Biz(0, 1), "=running", "SRPP", "1a1"),
            // A reply for an attempt that was never dispatched.
            (I::Ok(1, 2), "=running", "SRPP", "1a1"),
            (I::COk(1, 1), "=running", "SRPP", "1a1"),
            (I::Timeout(0, A, 1), "=running", "SRPP", "1a1"),
            (I::RetryDue(1, A, 1), "=running", "SRPP", "1a1"),
            (I::EarlyTimeout(1, A, 1), "=running", "SRPP", "1a1"),
            (I::WrongService(1, 1), "=running", "SRPP", "1a1"),
            (I::Ok(1, 1), "running", "SSRP", "2a1"),
        ],
    );
}

#[test]
fn retryable_failures_back_off_then_succeed() {
    let s = run(
        "retry",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Tech(1, 1), "running", "SRPP", "w1a2"),
            // While waiting, a duplicate of the failed reply or its timeout change nothing.
            (I::Tech(1, 1), "=running", "SRPP", "w1a2"),
            (I::Timeout(1, A, 1), "=running", "SRPP", "w1a2"),
            (I::RetryDue(1, A, 1), "running", "SRPP", "1a2"),
            (I::RetryDue(1, A, 1), "=running", "SRPP", "1a2"),
            (I::Tech(1, 2), "running", "SRPP", "w1a3"),
            (I::RetryDue(1, A, 2), "running", "SRPP", "1a3"),
            (I::Ok(1, 3), "running", "SSRP", "2a1"),
        ],
    );
    assert_eq!(s.steps[1].attempts, 3);
}

#[test]
fn retryable_failures_past_the_policy_compensate() {
    let s = run(
        "retry exhausted",
        &[
            (I::Tech(0, 1), "running", "RPPP", "w0a2"),
            (I::RetryDue(0, A, 1), "running", "RPPP", "0a2"),
            (I::Tech(0, 2), "running", "RPPP", "w0a3"),
            (I::RetryDue(0, A, 2), "running", "RPPP", "0a3"),
            (I::Tech(0, 3), "compensating", "CPPP", "0c1"),
            (I::COk(0, 1), "compensated", "XPPP", "-"),
        ],
    );
    assert!(s
        .failure
        .unwrap()
        .reason
        .starts_with("gave up after 3 attempts"));
}

#[test]
fn a_timed_out_step_is_compensated() {
    let s = run(
        "timeout",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Timeout(1, A, 1), "compensating", "SCPP", "1c1"),
            // The late reply of the timed-out action changes nothing.
            (I::Ok(1, 1), "=compensating", "SCPP", "1c1"),
            (I::COk(1, 1), "compensating", "CXPP", "0c1"),
            (I::COk(0, 1), "compensated", "XXPP", "-"),
        ],
    );
    assert!(s
        .failure
        .unwrap()
        .reason
        .starts_with("timed out after 30000 ms"));
}

#[test]
fn failing_compensation_parks_then_operator_retry_resumes() {
    let s = run(
        "stuck",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Biz(1, 1), "compensating", "SCPP", "1c1"),
            (I::COk(1, 1), "compensating", "CXPP", "0c1"),
            // Zero back-off in this policy: the retry goes out at once.
            (I::CFail(0, 1), "compensating", "CXPP", "0c2"),
            (I::Timeout(0, C, 2), "stuck", "CXPP", "-"),
            (I::CFail(0, 2), "=stuck", "CXPP", "-"),
            (I::OpAbort, "=stuck", "CXPP", "-"),
            (I::OpRetry, "compensating", "CXPP", "0c3"),
            (I::OpRetry, "=compensating", "CXPP", "0c3"),
            (I::COk(0, 3), "compensated", "XXPP", "-"),
        ],
    );
    assert!(s.stuck.is_none());
    assert_eq!(s.steps[0].compensation_attempts, 3);
}

#[test]
fn stuck_state_records_step_error_and_attempts() {
    let s = run(
        "stuck record",
        &[
            (I::Biz(0, 1), "compensating", "CPPP", "0c1"),
            (I::CFail(0, 1), "compensating", "CPPP", "0c2"),
            (I::CFail(0, 2), "stuck", "CPPP", "-"),
        ],
    );
    let st = s.stuck.unwrap();
    assert_eq!(
        (st.step.as_str(), st.last_error.as_str(), st.attempts),
        ("order.create", "nope", 2)
    );
    assert_eq!(s.events.last().unwrap().event, "stuck");
}

#[test]
fn operator_abort_compensates_a_running_saga() {
    let s = run(
        "abort",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Ok(1, 1), "running", "SSRP", "2a1"),
            (I::OpAbort, "compensating", "SSCP", "2c1"),
            (I::OpAbort, "=compensating", "SSCP", "2c1"),
            (I::Ok(2, 1), "=compensating", "SSCP", "2c1"),
            (I::COk(2, 1), "compensating", "SCXP", "1c1"),
            (I::COk(1, 1), "compensating", "CXXP", "0c1"),
            (I::COk(0, 1), "compensated", "XXXP", "-"),
        ],
    );
    assert_eq!(s.failure.unwrap().reason, "aborted by operator: test");
}

#[test]
fn effects_are_derived_from_state_with_stable_ids() {
    let d = def();
    let s = start(&d, "o-1", json!({"order_id":"o-1"}), 3, 5_000);
    let fx = effects(&s);
    assert_eq!(fx.commands[0].msg_id(), "o-1.0.create.1");
    assert_eq!(fx.commands[0].subject(), "saga.cmd.order.create");
    assert_eq!(fx.timers.len(), 1, "one watchdog, no timer per attempt");
    assert_eq!(fx.timers[0].kind, TimerKind::Watchdog);
    assert_eq!(fx.timers[0].due_ms, 35_000);
    assert_eq!(fx.timers[0].msg_id(), "o-1.watchdog.35000");
    assert_eq!(fx.events[0].subject, "saga.events.o-1.started");
    // The same state always implies the same effects.
    assert_eq!(fx, effects(&s));
    assert_eq!(s.last_input, engine::request_input_id(3));
    // Later states carry no watchdog: the armed one re-arms itself.
    let input = to_input(&d, I::Ok(0, 1), 6_000);
    let Transition::Applied(next) = apply(&d, &s, &input, "x", 6_000) else {
        panic!("applied")
    };
    assert!(effects(&next).timers.is_empty());
}

fn watchdog(due_ms: u64) -> Input {
    Input::Timer(Timer {
        saga_id: "o-1".into(),
        kind: TimerKind::Watchdog,
        step: 0,
        op: A,
        attempt: 0,
        due_ms,
    })
}

#[test]
fn the_watchdog_rearms_times_out_and_ends_with_the_saga() {
    let mut d = def(); // 30 s timeouts ...
    d.steps[1].timeout_ms = 2_000; // ... but payment.deduct has 2 s
    let apply_ok = |s: &SagaState, i: Input, now: u64| match apply(&d, s, &i, "x", now) {
        Transition::Applied(next) => *next,
        other => panic!("{other:?}"),
    };
    let s = start(&d, "o-1", json!({}), 1, 0);
    assert_eq!(s.watchdog_due_ms, Some(30_000));
    // Step 0 answers at 1 000; step 1 must be watched from 3 000: a new, earlier watchdog.
    let s = apply_ok(&s, to_input(&d, I::Ok(0, 1), 1_000), 1_000);
    assert_eq!(s.watchdog_due_ms, Some(3_000));
    assert_eq!(effects(&s).timers[0].msg_id(), "o-1.watchdog.3000");
    // The first one (30 000) is stale from now on.
    assert!(matches!(
        apply(&d, &s, &watchdog(30_000), "w", 30_000),
        Transition::Ignored(_)
    ));
    // At 3 000 step 1 times out; the compensation (same 2 s timeout) gets the next watchdog.
    let s = apply_ok(&s, watchdog(3_000), 3_000);
    assert_eq!(s.status, SagaStatus::Compensating);
    assert!(s
        .failure
        .as_ref()
        .unwrap()
        .reason
        .starts_with("timed out after 2000 ms"));
    assert_eq!(s.watchdog_due_ms, Some(5_000));
    // The refund answers; order.cancel (30 s) is due at 34 000, later than the live one: kept.
    let s = apply_ok(&s, to_input(&d, I::COk(1, 1), 4_000), 4_000);
    assert_eq!(s.watchdog_due_ms, Some(5_000));
    assert!(effects(&s).timers.is_empty());
    // The live one fires at 5 000, finds nothing overdue and hands over to one at 34 000.
    let s = apply_ok(&s, watchdog(5_000), 5_000);
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.watchdog_due_ms, Some(34_000));
    // Once the saga ends, its watchdog is ignored and none is armed.
    let s = apply_ok(&s, to_input(&d, I::COk(0, 1), 6_000), 6_000);
    assert_eq!(s.status, SagaStatus::Compensated);
    assert!(matches!(
        apply(&d, &s, &watchdog(34_000), "w", 34_000),
        Transition::Ignored(_)
    ));
    assert!(effects(&s).timers.is_empty());
    // ... and the end clears the live one's schedule, so it need not fire at all.
    assert_eq!(
        effects(&s).cancel_schedules,
        ["saga.sched.o-1.watchdog.34000"]
    );
}

#[test]
fn only_an_ended_saga_cancels_a_watchdog_that_has_not_fired() {
    let d = def();
    let at = |s: &SagaState, i: Input, now: u64| match apply(&d, s, &i, "x", now) {
        Transition::Applied(next) => *next,
        other => panic!("{other:?}"),
    };
    let s = start(&d, "o-1", json!({}), 1, 0);
    assert!(effects(&s).cancel_schedules.is_empty(), "running");
    let mut s = s;
    for step in 0..4 {
        assert!(effects(&s).cancel_schedules.is_empty(), "step {step}");
        s = at(&s, to_input(&d, I::Ok(step, 1), 1_000), 1_000);
    }
    assert_eq!(s.status, SagaStatus::Completed);
    assert_eq!(
        effects(&s).cancel_schedules,
        ["saga.sched.o-1.watchdog.30000"]
    );
    // A saga that ends after its watchdog came due has nothing to cancel (it fired).
    let mut s = start(&d, "o-1", json!({}), 1, 0);
    for (step, now) in [(0, 1_000), (1, 2_000), (2, 3_000), (3, 30_500)] {
        s = at(&s, to_input(&d, I::Ok(step, 1), now), now);
    }
    assert_eq!(
        (s.status, s.watchdog_due_ms),
        (SagaStatus::Completed, Some(30_000))
    );
    assert!(effects(&s).cancel_schedules.is_empty());
    // A parked saga keeps its watchdog: an operator retry relies on it.
    let s = run(
        "stuck keeps",
        &[
            (I::Biz(0, 1), "compensating", "CPPP", "0c1"),
            (I::CFail(0, 1), "compensating", "CPPP", "0c2"),
            (I::CFail(0, 2), "stuck", "CPPP", "-"),
        ],
    );
    assert!(effects(&s).cancel_schedules.is_empty());
}

#[test]
fn the_watchdog_enforces_the_deadline_first() {
    let mut d = def();
    d.deadline_ms = Some(10_000);
    let s = start(&d, "o-1", json!({}), 1, 0);
    assert_eq!(
        effects(&s).timers[0].due_ms,
        10_000,
        "deadline before the 30 s timeout"
    );
    assert_eq!(s.watchdog_due_ms, Some(10_000));
    let Transition::Applied(s) = apply(&d, &s, &watchdog(10_000), "w", 10_000) else {
        panic!()
    };
    assert_eq!(s.status, SagaStatus::Compensating);
    assert!(s.failure.unwrap().reason.contains("deadline of 10000 ms"));
}

#[test]
fn an_operator_retry_rearms_the_watchdog_once_the_old_one_is_gone() {
    let d = def();
    let s = run(
        "stuck rearm",
        &[
            (I::Biz(0, 1), "compensating", "CPPP", "0c1"),
            (I::CFail(0, 1), "compensating", "CPPP", "0c2"),
            (I::CFail(0, 2), "stuck", "CPPP", "-"),
        ],
    );
    // The live watchdog comes due while the saga is parked: ignored, the chain stops.
    let live = s.watchdog_due_ms.unwrap();
    assert!(matches!(
        apply(&d, &s, &watchdog(live), "w", live),
        Transition::Ignored(_)
    ));
    let later = live + 60_000;
    let Transition::Applied(s) = apply(&d, &s, &Input::Operator(Operator::Retry), "op", later)
    else {
        panic!()
    };
    assert_eq!(s.watchdog_due_ms, Some(later + 30_000));
    assert!(effects(&s)
        .timers
        .iter()
        .any(|t| t.kind == TimerKind::Watchdog));
}

#[test]
fn backoff_grows_caps_and_jitters_within_bounds() {
    let p = RetryPolicy {
        max_attempts: 10,
        initial_backoff_ms: 100,
        max_backoff_ms: 1000,
        multiplier: 2.0,
        jitter: 0.2,
    };
    let table = [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)];
    for (failed, base) in table {
        assert_eq!(
            engine::backoff_ms(&p, failed, 0.5),
            base,
            "no jitter at the midpoint"
        );
        let lo = engine::backoff_ms(&p, failed, 0.0);
        let hi = engine::backoff_ms(&p, failed, 0.999_999);
        assert!(lo as f64 >= base as f64 * 0.8 - 1.0, "{failed}: {lo}");
        assert!(
            hi <= 1000 && hi as f64 <= base as f64 * 1.2 + 1.0,
            "{failed}: {hi}"
        );
    }
    let no_jitter = RetryPolicy { jitter: 0.0, ..p };
    assert_eq!(engine::backoff_ms(&no_jitter, 3, 0.9), 400);
}

#[test]
fn retry_delay_is_recorded_in_the_state() {
    let mut d = def();
    d.steps[0].retry.jitter = 0.5;
    let s = start(&d, "o-1", json!({}), 1, 10_000);
    let input = to_input(&d, I::Tech(0, 1), 11_000);
    let Transition::Applied(next) = apply(&d, &s, &input, "x", 11_000) else {
        panic!("applied")
    };
    let next = *next;
    let at = next.steps[0].retry_at_ms.unwrap();
    assert!((11_050..=11_150).contains(&at), "{at}");
    assert_eq!(effects(&next).timers[0].due_ms, at);
}

#[test]
fn a_passed_deadline_aborts_a_running_saga_only() {
    let s = run(
        "deadline",
        &[
            (I::Ok(0, 1), "running", "SRPP", "1a1"),
            (I::Deadline, "compensating", "SCPP", "1c1"),
            (I::Deadline, "=compensating", "SCPP", "1c1"),
            (I::COk(1, 1), "compensating", "CXPP", "0c1"),
            (I::COk(0, 1), "compensated", "XXPP", "-"),
            (I::Deadline, "=compensated", "XXPP", "-"),
        ],
    );
    assert!(s.failure.unwrap().reason.contains("deadline"));
}
