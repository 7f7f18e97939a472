//! The orchestrator's Prometheus metrics: sagas by kind and lifecycle event, step latency by
//! service and action (dispatch to applied reply), retries, CAS conflicts, inputs in hand, and
//! the common dead-letter / redelivery / consumer-lag metrics.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use jetsaga_common::metrics::{labels, Common, Labels};

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Clone)]
pub struct Metrics {
    pub common: Common,
    pub sagas: Family<Labels, Counter>,
    pub step_seconds: HistogramFamily,
    pub retries: Family<Labels, Counter>,
    pub cas_conflicts: Counter,
    pub inputs_in_hand: Gauge,
    pub waiting_sagas_cached: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            common: Common::default(),
            sagas: Family::default(),
            step_seconds: Family::new_with_constructor(step_histogram as fn() -> Histogram),
            retries: Family::default(),
            cas_conflicts: Counter::default(),
            inputs_in_hand: Gauge::default(),
            waiting_sagas_cached: Gauge::default(),
        }
    }
}

impl Metrics {
    /// A registry with every orchestrator metric in it.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        self.common.register(&mut r);
        r.register(
            "jetsaga_sagas",
            "Saga lifecycle events by kind: started, completed, compensated, stuck",
            self.sagas.clone(),
        );
        r.register(
            "jetsaga_step_seconds",
            "From dispatching a step's command to applying its reply, by service, action, op and outcome",
            self.step_seconds.clone(),
        );
        r.register(
            "jetsaga_step_retries",
            "Attempts that failed and will be retried, by service, action and op",
            self.retries.clone(),
        );
        r.register(
            "jetsaga_cas_conflicts",
            "Revision conflicts on saga writes (retried)",
            self.cas_conflicts.clone(),
        );
        r.register(
            "jetsaga_inputs_in_hand",
            "Inputs being handled right now",
            self.inputs_in_hand.clone(),
        );
        r.register(
            "jetsaga_waiting_sagas_cached",
            "Waiting sagas whose state this process holds in its cache",
            self.waiting_sagas_cached.clone(),
        );
        r
    }

    pub fn saga_event(&self, kind: &str, event: &str) {
        self.sagas
            .get_or_create(&labels(&[("kind", kind), ("event", event)]))
            .inc();
    }

    pub fn step(&self, service: &str, action: &str, op: &str, outcome: &str, seconds: f64) {
        self.step_seconds
            .get_or_create(&labels(&[
                ("service", service),
                ("action", action),
                ("op", op),
                ("outcome", outcome),
            ]))
            .observe(seconds);
    }

    pub fn retry(&self, service: &str, action: &str, op: &str) {
        self.retries
            .get_or_create(&labels(&[
                ("service", service),
                ("action", action),
                ("op", op),
            ]))
            .inc();
    }
}
