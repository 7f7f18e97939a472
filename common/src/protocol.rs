//! The wire contract between the orchestrator and participants.
//!
//! A participant in any language joins a saga by consuming `saga.cmd.<service>.>` from the
//! commands stream, answering each [`Command`] with a [`Reply`] published (as a JetStream publish,
//! with the `Nats-Msg-Id` from [`Reply::msg_id`]) to `saga.reply.<service>`, and acking the command
//! only after the reply's PubAck arrived. Both bodies are JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Header JetStream uses to drop duplicates inside a stream's duplicate window.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Dead-letter headers: why the message was refused, and where it came from.
pub const DLQ_REASON: &str = "Jetsaga-Reason";
pub const DLQ_SOURCE_SUBJECT: &str = "Jetsaga-Source-Subject";
pub const DLQ_SOURCE_STREAM: &str = "Jetsaga-Source-Stream";
pub const DLQ_SOURCE_SEQ: &str = "Jetsaga-Source-Seq";

/// Whether a command asks for the step's action or for its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Action,
    Compensation,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Action => "action",
            Op::Compensation => "compensation",
        }
    }
}

/// A request from the orchestrator to one service to run one step's action or compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub saga_id: String,
    /// The saga definition's kind, e.g. `order`.
    pub kind: String,
    /// Index of the step in the definition (0-based).
    pub step: u32,
    /// The step's name, e.g. `payment.deduct`.
    pub step_name: String,
    pub service: String,
    /// The action or compensation name to run, e.g. `deduct` or `refund`.
    pub action: String,
    pub op: Op,
    /// 1 for the first try; retries of the same op count up.
    pub attempt: u32,
    /// The saga's validated input (the request plus derived fields such as `amount_cents`).
    pub input: Value,
}

impl Command {
    /// `saga.cmd.<service>.<action>`
    pub fn subject(&self) -> String {
        command_subject(&self.service, &self.action)
    }

    /// Deterministic id `<saga_id>.<step>.<action>.<attempt>`: a re-publish of the same command
    /// (after a crash, or by a second orchestrator) is dropped by the server's duplicate window.
    pub fn msg_id(&self) -> String {
        command_msg_id(&self.saga_id, self.step, &self.action, self.attempt)
    }
}

/// The message id of attempt `attempt` of `action` (an action or compensation name) on a step.
pub fn command_msg_id(saga_id: &str, step: u32, action: &str, attempt: u32) -> String {
    format!("{saga_id}.{step}.{action}.{attempt}")
}

/// How a participant ended a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done; `output` may carry data.
    Success,
    /// The business said no (balance too low, stock short). Not retried: the saga compensates.
    BusinessFailure,
    /// A technical error (database busy, dependency down). The orchestrator may retry.
    RetryableFailure,
    /// The action arrived after its compensation (a hanging action) and was not run.
    Aborted,
}

impl Outcome {
    /// The wire name (as serialised), for metrics labels, logs and span attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::BusinessFailure => "business_failure",
            Outcome::RetryableFailure => "retryable_failure",
            Outcome::Aborted => "aborted",
        }
    }
}

/// A participant's answer to one [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub saga_id: String,
    pub step: u32,
    pub op: Op,
    pub attempt: u32,
    pub service: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

impl Reply {
    /// A reply to `cmd` with the given outcome.
    pub fn to(
        cmd: &Command,
        outcome: Outcome,
        error: Option<String>,
        output: Option<Value>,
    ) -> Self {
        Reply {
            saga_id: cmd.saga_id.clone(),
            step: cmd.step,
            op: cmd.op,
            attempt: cmd.attempt,
            service: cmd.service.clone(),
            outcome,
            error,
            output,
        }
    }

    /// `saga.reply.<service>`
    pub fn subject(&self) -> String {
        reply_subject(&self.service)
    }

    /// `<saga_id>.<step>.<op>.<attempt>.reply`: one reply per command attempt reaches the stream.
    pub fn msg_id(&self) -> String {
        format!(
            "{}.{}.{}.{}.reply",
            self.saga_id,
            self.step,
            self.op.as_str(),
            self.attempt
        )
    }
}

pub fn command_subject(service: &str, action: &str) -> String {
    format!("saga.cmd.{service}.{action}")
}

/// Filter of one service's durable consumer on the commands stream.
pub fn command_filter(service: &str) -> String {
    format!("saga.cmd.{service}.>")
}

pub fn reply_subject(service: &str) -> String {
    format!("saga.reply.{service}")
}

/// `saga.events.<saga_id>.<event>`
pub fn event_subject(saga_id: &str, event: &str) -> String {
    format!("saga.events.{saga_id}.{event}")
}

/// Read-only query subjects the services answer with core request/reply.
pub fn query_subject(service: &str, what: &str) -> String {
    format!("jetsaga.query.{service}.{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_the_wire_names() {
        for o in [
            Outcome::Success,
            Outcome::BusinessFailure,
            Outcome::RetryableFailure,
            Outcome::Aborted,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }

    fn cmd() -> Command {
        Command {
            saga_id: "o-1".into(),
            kind: "order".into(),
            step: 1,
            step_name: "payment.deduct".into(),
            service: "payment".into(),
            action: "deduct".into(),
            op: Op::Action,
            attempt: 2,
            input: serde_json::json!({"order_id": "o-1"}),
        }
    }

    #[test]
    fn subjects_and_ids_are_deterministic() {
        let c = cmd();
        assert_eq!(c.subject(), "saga.cmd.payment.deduct");
        assert_eq!(c.msg_id(), "o-1.1.deduct.2");
        let r = Reply::to(&c, Outcome::Success, None, None);
        assert_eq!(r.subject(), "saga.reply.payment");
        assert_eq!(r.msg_id(), "o-1.1.action.2.reply");
    }

    #[test]
    fn json_round_trip_and_shape() {
        let c = cmd();
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""op":"action""#));
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), c);
        let r = Reply::to(
            &c,
            Outcome::BusinessFailure,
            Some("balance too low".into()),
            None,
        );
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""outcome":"business_failure""#));
        assert!(!text.contains("output"));
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
    }
}
