//! OpenTelemetry trace export over OTLP/HTTP (protobuf), off unless configured.
//!
//! It is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`); the usual `OTEL_*`
//! variables tune it (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`).
//!
//! The spans are built from what the processes already know rather than from `tracing` spans:
//! a saga's trace id lives in its state and every message's span id is derived from its message
//! id ([`crate::trace`]). So the orchestrator exports, from state it has durably written, one span
//! per step attempt whose id is the one its command's `traceparent` carries, and one root span per
//! saga; a participant exports one span per command it handled, the child of that command span
//! and the parent of its reply. Every process of a saga lands in one trace, and a redelivered
//! message re-exports a span with the same ids instead of starting a new branch.
//!
//! Export is asynchronous and lossy by design: spans queue in the SDK's batch processor (its own
//! thread), are dropped when the queue is full, and an exporter failure is logged, never returned.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;

static EXPORT: OnceLock<Export> = OnceLock::new();

struct Export {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

/// Flushes and stops the exporter when dropped (keep it alive for the life of `main`).
#[must_use = "the exporter stops when the guard is dropped"]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(e) = EXPORT.get() {
            if let Err(err) = e.processor.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %err, "OpenTelemetry exporter did not shut down cleanly");
            }
        }
    }
}

/// Whether the environment asks for trace export.
pub fn configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let is = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x.trim().eq_ignore_ascii_case(v));
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// Starts the exporter if [`configured`]; `service` is the default `service.name`.
/// Returns `None` (and exports nothing) when it is not configured or cannot start.
pub fn init(service: &str) -> Option<Guard> {
    if !configured() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the OpenTelemetry exporter; traces are not exported");
            return None;
        }
    };
    let mut processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().build())
        .build();
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| service.to_string());
    let resource = Resource::builder().with_service_name(name.clone()).build();
    processor.set_resource(&resource);
    let scope = InstrumentationScope::builder("jetsaga")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    if EXPORT.set(Export { processor, scope }).is_err() {
        return None;
    }
    tracing::info!(service = %name, "exporting traces over OTLP/HTTP");
    Some(Guard(()))
}

/// Whether spans are being exported (cheap; check it before building a [`Span`]).
pub fn enabled() -> bool {
    EXPORT.get().is_some()
}

/// What a span is, in OpenTelemetry's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    Client,
    Consumer,
}

/// A finished span, ids in W3C hex as [`crate::trace`] makes them.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub kind: Kind,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    /// The parent was made by another process.
    pub parent_remote: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub int_attributes: Vec<(&'static str, i64)>,
    /// Marks the span as failed, with this description.
    pub error: Option<String>,
}

impl Span {
    pub fn new(name: impl Into<String>, kind: Kind, trace_id: &str, span_id: &str) -> Self {
        let now = SystemTime::now();
        Span {
            name: name.into(),
            kind,
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            parent_span_id: None,
            parent_remote: false,
            start: now,
            end: now,
            attributes: Vec::new(),
            int_attributes: Vec::new(),
            error: None,
        }
    }

    pub fn attr(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }

    pub fn int(mut self, key: &'static str, value: i64) -> Self {
        self.int_attributes.push((key, value));
        self
    }
}

/// Milliseconds since the Unix epoch as a `SystemTime`.
pub fn at_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Queues a finished span for export; does nothing when export is off or the ids are malformed.
pub fn export(span: Span) {
    let Some(e) = EXPORT.get() else {
        return;
    };
    if let Some(data) = to_span_data(span, &e.scope) {
        e.processor.on_end(data);
    }
}

fn to_span_data(span: Span, scope: &InstrumentationScope) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&span.trace_id).ok()?;
    let span_id = SpanId::from_hex(&span.span_id).ok()?;
    let parent = match &span.parent_span_id {
        Some(p) => SpanId::from_hex(p).ok()?,
        None => SpanId::INVALID,
    };
    let mut attributes: Vec<KeyValue> = span
        .attributes
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, v))
        .collect();
    attributes.extend(
        span.int_attributes
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, v)),
    );
    Some(SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: span.parent_remote,
        span_kind: match span.kind {
            Kind::Internal => SpanKind::Internal,
            Kind::Client => SpanKind::Client,
            Kind::Consumer => SpanKind::Consumer,
        },
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.end.max(span.start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(msg) => Status::error(msg),
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ids_times_and_status() {
        let scope = InstrumentationScope::builder("t").build();
        let t = crate::trace::new_trace_id();
        let s = crate::trace::span_id("o-1.0.create.1");
        let p = crate::trace::span_id("o-1");
        let mut span = Span::new("order.create", Kind::Client, &t, &s)
            .attr("saga.id", "o-1")
            .int("saga.step", 0);
        span.parent_span_id = Some(p.clone());
        span.start = at_ms(1_000);
        span.end = at_ms(1_500);
        span.error = Some("timed out".into());
        let d = to_span_data(span, &scope).expect("valid ids");
        assert_eq!(d.span_context.trace_id().to_string(), t);
        assert_eq!(d.span_context.span_id().to_string(), s);
        assert_eq!(d.parent_span_id.to_string(), p);
        assert_eq!(d.span_kind, SpanKind::Client);
        assert_eq!(
            d.end_time.duration_since(d.start_time).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(d.status, Status::error("timed out"));
        assert_eq!(d.attributes.len(), 2);

        let bad = Span::new("x", Kind::Internal, "not-hex", &s);
        assert!(to_span_data(bad, &scope).is_none());
        // An end before the start (clock step) is clamped, not exported as a negative span.
        let mut back = Span::new("x", Kind::Internal, &t, &s);
        back.start = at_ms(2_000);
        back.end = at_ms(1_000);
        let d = to_span_data(back, &scope).unwrap();
        assert_eq!(d.end_time, d.start_time);
    }

    #[test]
    fn off_unless_configured() {
        // The test environment sets no OTEL_* endpoint.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert!(!configured());
            assert!(init("test").is_none());
            assert!(!enabled());
        }
    }
}
