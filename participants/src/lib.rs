//! jetsaga's participant SDK and the three example services.
//!
//! A service implements [`Service`] (its tables, its business action and its compensation, its
//! read-only queries) and hands it to [`runtime::run`]. Everything a saga participant must get
//! right once — the barrier that makes commands idempotent and safe against out-of-order
//! compensations ([`barrier`]), group-committed SQLite transactions, replies published before the
//! command is acked, dead-lettering of garbage — lives here, not in the services.
//!
//! The services in [`services`] are the example order saga's participants; each binary in
//! `src/bin/` is a thin `main` around one of them.

pub mod barrier;
pub mod cli;
pub mod config;
pub mod db;
pub mod metrics;
pub mod runtime;
pub mod seed;
pub mod service;
pub mod services;

pub use config::{Config, Faults, Synchronous};
pub use seed::Seed;
pub use service::{Service, StepError};
