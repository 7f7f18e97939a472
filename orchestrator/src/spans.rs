//! The OpenTelemetry spans a transition closes, computed from the state before and after it
//! (pure, so tested without an exporter; the driver exports them once the state is written).
//!
//! - one span per step attempt, `<service>.<action>` (kind client), from its dispatch to the
//!   reply, timeout or abort that settled it; its span id is the one the command's
//!   `traceparent` carries, so the participant's span is its child;
//! - one root span per saga, `saga <kind>`, from the request to `completed` or `compensated`,
//!   the child of the request's `traceparent` when it came with one.

use jetsaga_common::otel::{at_ms, Kind, Span};
use jetsaga_common::protocol::{self, Op};
use jetsaga_common::trace;

use crate::engine::{Input, Operator, TimerKind};
use crate::state::{SagaState, SagaStatus};

/// The root span's id for a saga (the parent of its step spans).
pub fn root_span_id(saga_id: &str) -> String {
    trace::span_id(saga_id)
}

/// The spans that the transition `before` -> `after` (caused by `input`) finished.
pub fn closed(before: &SagaState, after: &SagaState, input: &Input) -> Vec<Span> {
    let Some(trace_id) = after.trace_id.as_deref() else {
        return Vec::new();
    };
    let mut spans = Vec::new();
    if let Some(span) = closed_attempt(trace_id, before, after, input) {
        spans.push(span);
    }
    let ended = matches!(
        after.status,
        SagaStatus::Completed | SagaStatus::Compensated
    );
    if ended && before.status != after.status {
        spans.push(root(trace_id, after));
    }
    spans
}

fn closed_attempt(
    trace_id: &str,
    before: &SagaState,
    after: &SagaState,
    input: &Input,
) -> Option<Span> {
    let (i, op) = before.awaiting()?;
    let st = &before.steps[i];
    let sent = st.dispatched_at_ms?;
    let attempt = before.attempt(i, op);
    let still_open = after.awaiting() == Some((i, op))
        && after.attempt(i, op) == attempt
        && after.steps[i].dispatched_at_ms == Some(sent);
    if still_open {
        return None;
    }
    let action = match op {
        Op::Action => st.action.as_str(),
        Op::Compensation => st.compensation.as_deref()?,
    };
    let (outcome, error) = settled_by(input, after, i, op);
    let cmd_id = protocol::command_msg_id(&before.saga_id, i as u32, action, attempt);
    let mut span = Span::new(
        format!("{}.{action}", st.service),
        Kind::Client,
        trace_id,
        &trace::span_id(&cmd_id),
    )
    .attr("saga.id", before.saga_id.clone())
    .attr("saga.kind", before.kind.clone())
    .attr("saga.step.name", st.name.clone())
    .attr("saga.op", op.as_str())
    .attr("saga.outcome", outcome)
    .attr("service", st.service.clone())
    .attr("messaging.system", "nats")
    .attr(
        "messaging.destination.name",
        protocol::command_subject(&st.service, action),
    )
    .attr("messaging.message.id", cmd_id)
    .int("saga.step", i as i64)
    .int("saga.attempt", attempt as i64);
    span.parent_span_id = Some(root_span_id(&before.saga_id));
    span.start = at_ms(sent);
    span.end = at_ms(after.updated_ms);
    span.error = error;
    Some(span)
}

/// How an attempt ended, and the error to mark its span with.
fn settled_by(input: &Input, after: &SagaState, i: usize, op: Op) -> (String, Option<String>) {
    let recorded = || {
        let st = &after.steps[i];
        match op {
            Op::Action => st.error.clone(),
            Op::Compensation => st.compensation_error.clone(),
        }
        .or_else(|| after.failure.as_ref().map(|f| f.reason.clone()))
        .unwrap_or_else(|| "failed".into())
    };
    match input {
        Input::Reply(r) => {
            let outcome = r.outcome.as_str().to_string();
            let error = (r.outcome != protocol::Outcome::Success)
                .then(|| r.error.clone().unwrap_or_else(recorded));
            (outcome, error)
        }
        Input::Timer(t) if t.kind == TimerKind::Deadline => {
            ("deadline_exceeded".into(), Some(recorded()))
        }
        Input::Timer(_) => ("timed_out".into(), Some(recorded())),
        Input::Operator(Operator::Abort { .. }) => ("aborted".into(), Some(recorded())),
        Input::Operator(Operator::Retry) => ("superseded".into(), None),
    }
}

fn root(trace_id: &str, s: &SagaState) -> Span {
    let mut span = Span::new(
        format!("saga {}", s.kind),
        Kind::Internal,
        trace_id,
        &root_span_id(&s.saga_id),
    )
    .attr("saga.id", s.saga_id.clone())
    .attr("saga.kind", s.kind.clone())
    .attr("saga.status", s.status.as_str())
    .int("saga.steps", s.steps.len() as i64);
    if let Some(f) = &s.failure {
        span = span
            .attr("saga.failure.step", f.step.clone())
            .attr("saga.failure.reason", f.reason.clone());
    }
    span.parent_span_id = s.parent_span_id.clone();
    span.parent_remote = s.parent_span_id.is_some();
    span.start = at_ms(s.created_ms);
    span.end = at_ms(s.updated_ms);
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Definition;
    use crate::engine::{self, Timer, Transition};
    use jetsaga_common::protocol::{Outcome, Reply};
    use serde_json::json;

    fn def() -> Definition {
        Definition::builtin_order()
    }

    fn reply(s: &SagaState, outcome: Outcome, error: Option<&str>) -> Input {
        let (i, op) = s.awaiting().expect("awaiting");
        Input::Reply(Reply {
            saga_id: s.saga_id.clone(),
            step: i as u32,
            op,
            attempt: s.attempt(i, op),
            service: s.steps[i].service.clone(),
            outcome,
            error: error.map(str::to_string),
            output: None,
        })
    }

    fn step(def: &Definition, s: &SagaState, input: &Input, now: u64) -> SagaState {
        match engine::apply(def, s, input, "in", now) {
            Transition::Applied(next) => *next,
            Transition::Ignored(why) => panic!("ignored: {why}"),
        }
    }

    fn started(def: &Definition) -> SagaState {
        let input = json!({"order_id": "o-1", "customer_id": "c-1", "items": [{"sku": "s", "qty": 1, "price_cents": 100}]});
        let mut s = engine::start(def, "o-1", input, 1, 1_000);
        s.trace_id = Some(trace::new_trace_id());
        s.parent_span_id = Some(trace::span_id("client"));
        s
    }

    #[test]
    fn every_attempt_and_the_saga_get_one_span_each() {
        let def = def();
        let mut s = started(&def);
        let mut spans = Vec::new();
        let mut now = 1_000;
        while s.awaiting().is_some() {
            now += 7;
            let input = reply(&s, Outcome::Success, None);
            let next = step(&def, &s, &input, now);
            spans.extend(closed(&s, &next, &input));
            s = next;
        }
        assert_eq!(s.status, SagaStatus::Completed);
        assert_eq!(spans.len(), def.steps.len() + 1);
        let trace = s.trace_id.clone().unwrap();
        let root = spans.last().unwrap();
        assert_eq!(root.name, "saga order");
        assert_eq!(root.span_id, root_span_id("o-1"));
        assert_eq!(root.parent_span_id, Some(trace::span_id("client")));
        assert!(root.parent_remote);
        assert_eq!((root.start, root.end), (at_ms(1_000), at_ms(now)));
        for (i, span) in spans[..def.steps.len()].iter().enumerate() {
            let st = &s.steps[i];
            let id = protocol::command_msg_id("o-1", i as u32, &st.action, 1);
            assert_eq!(span.trace_id, trace);
            assert_eq!(span.span_id, trace::span_id(&id), "step {i}");
            assert_eq!(span.parent_span_id.as_deref(), Some(root.span_id.as_str()));
            assert_eq!(span.name, format!("{}.{}", st.service, st.action));
            assert_eq!(span.end.duration_since(span.start).unwrap().as_millis(), 7);
            assert!(span.error.is_none());
        }
    }

    #[test]
    fn failures_timeouts_and_retries_close_their_attempt_with_an_error() {
        let def = def();
        let s0 = started(&def);
        // Step 0 succeeds, step 1 answers a business failure.
        let ok = reply(&s0, Outcome::Success, None);
        let s1 = step(&def, &s0, &ok, 1_010);
        let fail = reply(&s1, Outcome::BusinessFailure, Some("insufficient balance"));
        let s2 = step(&def, &s1, &fail, 1_020);
        let spans = closed(&s1, &s2, &fail);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].error.as_deref(), Some("insufficient balance"));
        assert!(spans[0]
            .attributes
            .contains(&("saga.outcome", "business_failure".to_string())));
        // The compensation of step 0 times out: its span closes, marked as such.
        let (i, op) = s2.awaiting().unwrap();
        assert_eq!(op, Op::Compensation);
        let due = s2.steps[i].dispatched_at_ms.unwrap() + def.steps[i].timeout_ms;
        let timeout = Input::Timer(Timer {
            saga_id: "o-1".into(),
            kind: TimerKind::Timeout,
            step: i as u32,
            op,
            attempt: 1,
            due_ms: due,
        });
        let s3 = step(&def, &s2, &timeout, due);
        let spans = closed(&s2, &s3, &timeout);
        assert_eq!(spans.len(), 1);
        let comp = s2.steps[i].compensation.clone().unwrap();
        let id = protocol::command_msg_id("o-1", i as u32, &comp, 1);
        assert_eq!(spans[0].span_id, trace::span_id(&id));
        assert!(spans[0]
            .attributes
            .contains(&("saga.outcome", "timed_out".to_string())));
        assert!(spans[0].error.is_some());
        // Nothing closes while the saga only waits (a retry timer that is not due is ignored,
        // and applying the same state twice closes nothing).
        assert!(closed(&s3, &s3, &timeout).is_empty());
    }

    #[test]
    fn no_trace_id_no_spans() {
        let def = def();
        let mut s0 = started(&def);
        s0.trace_id = None;
        let ok = reply(&s0, Outcome::Success, None);
        let s1 = step(&def, &s0, &ok, 1_010);
        assert!(closed(&s0, &s1, &ok).is_empty());
    }
}
