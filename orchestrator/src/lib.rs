//! jetsaga's orchestrator: saga [`definition`]s as data, a pure [`engine`] over the [`state`]
//! stored in KV, and the [`driver`] that feeds it JetStream inputs under the one rule.

pub mod definition;
pub mod driver;
pub mod engine;
pub mod metrics;
pub mod schema;
pub mod spans;
pub mod state;

#[cfg(test)]
mod engine_tests;
