//! A participant's Prometheus metrics: commands handled by action, op, barrier decision and
//! outcome; the size and duration of each group-committed batch; and the common dead-letter,
//! redelivery and consumer-lag metrics. Served with `/healthz` and `/readyz` when
//! `JETSAGA_METRICS_ADDR` is set.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use jetsaga_common::metrics::{labels, Common, Labels};

#[derive(Clone)]
pub struct Metrics {
    pub common: Common,
    pub commands: Family<Labels, Counter>,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            common: Common::default(),
            commands: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            batch_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        self.common.register(&mut r);
        r.register(
            "jetsaga_commands",
            "Commands handled, by service, action, op, barrier decision and outcome",
            self.commands.clone(),
        );
        r.register(
            "jetsaga_batch_commands",
            "Commands per group-committed transaction",
            self.batch_size.clone(),
        );
        r.register(
            "jetsaga_batch_seconds",
            "Time to apply and commit one batch",
            self.batch_seconds.clone(),
        );
        r
    }

    pub fn command(&self, service: &str, action: &str, op: &str, decision: &str, outcome: &str) {
        self.commands
            .get_or_create(&labels(&[
                ("service", service),
                ("action", action),
                ("op", op),
                ("decision", decision),
                ("outcome", outcome),
            ]))
            .inc();
    }
}
