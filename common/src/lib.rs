//! Shared pieces of jetsaga: the wire protocol (subjects, headers, command and reply JSON), the
//! JetStream topology every process reconciles at start, connection helpers that log what NATS only
//! reports out of band, dead-lettering, logging setup, and a test kit that runs a real nats-server.
//!
//! Everything a participant written in another language needs to join a saga is in [`protocol`]
//! and [`topology`]; the README documents the same contract.

pub mod dev;
pub mod dlq;
pub mod ids;
pub mod metrics;
pub mod nats;
pub mod otel;
pub mod protocol;
pub mod telemetry;
pub mod testkit;
pub mod time;
pub mod topology;
pub mod trace;
