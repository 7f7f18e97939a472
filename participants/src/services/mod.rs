//! The example order saga's participants (DESIGN §1): order, payment, inventory. Each is a small
//! [`crate::Service`]: its tables, its action, its compensation, its queries; the SDK does the
//! rest. Every business row is keyed by `(saga_id, step)` so invariants (money conserved, nothing
//! applied twice) can be checked from the services' own stores through their `dump` queries.

pub mod inventory;
pub mod order;
pub mod payment;

use jetsaga_common::protocol::Command;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::service::StepError;

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// The saga input every step of the order saga receives: the validated order request plus
/// `amount_cents`, computed by the orchestrator. Unknown fields are ignored on purpose, so the
/// orchestrator may add derived fields without breaking the services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInput {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<Item>,
    pub amount_cents: i64,
}

impl OrderInput {
    /// Reads and checks `cmd.input`. Bad input can never succeed, so it is a business failure.
    pub fn from_command(cmd: &Command) -> Result<OrderInput, StepError> {
        let input: OrderInput = serde_json::from_value(cmd.input.clone())
            .map_err(|e| StepError::business(format!("invalid order input: {e}")))?;
        if input.order_id.is_empty() {
            return Err(StepError::business("invalid order input: empty order_id"));
        }
        if input.customer_id.is_empty() {
            return Err(StepError::business(
                "invalid order input: empty customer_id",
            ));
        }
        if input.items.is_empty() {
            return Err(StepError::business("invalid order input: no items"));
        }
        if let Some(item) = input.items.iter().find(|i| i.quantity <= 0) {
            return Err(StepError::business(format!(
                "invalid order input: quantity {} for {}",
                item.quantity, item.sku
            )));
        }
        if input.amount_cents < 0 {
            return Err(StepError::business(format!(
                "invalid order input: amount_cents {}",
                input.amount_cents
            )));
        }
        Ok(input)
    }
}

/// A required string field of a query request.
pub(crate) fn required_str<'a>(req: &'a Value, field: &str) -> Result<&'a str, String> {
    req.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field {field:?}"))
}

pub(crate) fn unknown_action(service: &str, cmd: &Command) -> StepError {
    StepError::business(format!(
        "unknown {} {:?} for service {service}",
        cmd.op.as_str(),
        cmd.action
    ))
}

pub(crate) fn storage(e: rusqlite::Error) -> String {
    format!("storage: {e}")
}
