//! The HTTP endpoint every jetsaga process can expose: Prometheus text metrics on `/metrics`,
//! `/healthz` (the process is up) and `/readyz` (connected to NATS and the streams it needs
//! exist). Metrics use `prometheus-client` (the Prometheus project's Rust client); the server is
//! axum. Off unless an address is configured (`JETSAGA_METRICS_ADDR`).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{connection::State, jetstream};
use axum::{extract::State as AxState, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Label sets are small `(name, value)` lists.
pub type Labels = Vec<(String, String)>;

/// Builds a label set.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Metrics every process has: dead letters, redeliveries and the lag of its durable consumers.
#[derive(Clone, Default)]
pub struct Common {
    pub dead_letters: Family<Labels, Counter>,
    pub redeliveries: Family<Labels, Counter>,
    pub consumer_pending: Family<Labels, Gauge>,
    pub consumer_ack_pending: Family<Labels, Gauge>,
}

impl Common {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "jetsaga_dead_letters",
            "Messages dead-lettered, by source",
            self.dead_letters.clone(),
        );
        r.register(
            "jetsaga_redeliveries",
            "Messages received more than once, by consumer",
            self.redeliveries.clone(),
        );
        r.register(
            "jetsaga_consumer_pending",
            "Messages waiting in a durable consumer (lag)",
            self.consumer_pending.clone(),
        );
        r.register(
            "jetsaga_consumer_ack_pending",
            "Messages delivered but not yet acked, by consumer",
            self.consumer_ack_pending.clone(),
        );
    }

    /// Counts a redelivery if this message was delivered before.
    pub fn note_delivery(&self, consumer: &str, msg: &jetstream::Message) {
        if msg.info().map(|i| i.delivered > 1).unwrap_or(false) {
            self.redeliveries
                .get_or_create(&labels(&[("consumer", consumer)]))
                .inc();
        }
    }

    /// Samples the lag of `consumers` (stream, durable) every `every`, forever.
    pub async fn sample_lag(
        &self,
        js: jetstream::Context,
        consumers: Vec<(String, String)>,
        every: Duration,
    ) {
        loop {
            for (stream, durable) in &consumers {
                let got = js
                    .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                        durable, stream,
                    )
                    .await;
                if let Ok(mut c) = got {
                    if let Ok(info) = c.info().await {
                        let l = labels(&[("consumer", durable)]);
                        self.consumer_pending
                            .get_or_create(&l)
                            .set(info.num_pending as i64);
                        self.consumer_ack_pending
                            .get_or_create(&l)
                            .set(info.num_ack_pending as i64);
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// What `/readyz` checks: the connection is up and these streams exist.
#[derive(Clone)]
pub struct Readiness {
    pub client: async_nats::Client,
    pub streams: Vec<String>,
}

impl Readiness {
    pub async fn check(&self) -> Result<(), String> {
        if self.client.connection_state() != State::Connected {
            return Err("not connected to NATS".into());
        }
        let js = jetstream::new(self.client.clone());
        for s in &self.streams {
            js.get_stream(s)
                .await
                .map_err(|e| format!("stream {s}: {e}"))?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Mutex<Registry>>,
    ready: Arc<Mutex<Option<Readiness>>>,
}

/// Handle to set readiness once the process has connected.
#[derive(Clone)]
pub struct ReadyHandle(Arc<Mutex<Option<Readiness>>>);

impl ReadyHandle {
    pub fn set(&self, r: Readiness) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
}

/// The router, without binding a port (tests call it directly).
pub fn router(registry: Registry) -> (axum::Router, ReadyHandle) {
    let ready = Arc::new(Mutex::new(None));
    let state = AppState {
        registry: Arc::new(Mutex::new(registry)),
        ready: ready.clone(),
    };
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    (app, ReadyHandle(ready))
}

async fn metrics(AxState(st): AxState<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    let result = {
        let reg = st.registry.lock().unwrap_or_else(|e| e.into_inner());
        encode(&mut body, &reg)
    };
    match result {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn readyz(AxState(st): AxState<AppState>) -> impl IntoResponse {
    let r = st.ready.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match r {
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string()),
        Some(r) => match r.check().await {
            Ok(()) => (StatusCode::OK, "ready\n".to_string()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
    }
}

/// Binds `addr` and serves the router in the background; returns the bound address (useful
/// with port 0) and the readiness handle.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
) -> std::io::Result<(SocketAddr, ReadyHandle)> {
    let (app, ready) = router(registry);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics, /healthz and /readyz served");
    Ok((bound, ready))
}
