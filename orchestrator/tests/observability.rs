//! Metrics, health and readiness of the orchestrator, scraped over HTTP from the real process.

mod support;

use std::time::Duration;

use jetsaga_common::testkit::free_port;
use support::{http_get, order, Options, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_exposes_metrics_health_and_readiness() {
    let addr = format!("127.0.0.1:{}", free_port());
    let payment_addr = format!("127.0.0.1:{}", free_port());
    let mut sys = System::start_with(Options {
        orchestrator_env: vec![("JETSAGA_METRICS_ADDR", addr.clone())],
        service_env: vec![("payment", "JETSAGA_METRICS_ADDR", payment_addr.clone())],
        ..Options::default()
    })
    .await;
    sys.publish(&order("m-1", "c-1", "sku-1", 1, 100), None)
        .await;
    sys.publish(&order("m-2", "c-2", "sku-1", 1, 100_000), None)
        .await;
    sys.publish(b"not json", None).await;
    sys.wait_terminal("m-1", Duration::from_secs(60)).await;
    sys.wait_terminal("m-2", Duration::from_secs(60)).await;
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        if body.contains("jetsaga_dead_letters_total") || tokio::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for want in [
        r#"jetsaga_sagas_total{kind="order",event="started"} 2"#,
        r#"jetsaga_sagas_total{kind="order",event="completed"} 1"#,
        r#"jetsaga_sagas_total{kind="order",event="compensated"} 1"#,
        r#"jetsaga_step_seconds_count{service="payment",action="deduct",op="action",outcome="business_failure"} 1"#,
        r#"jetsaga_step_seconds_count{service="payment",action="refund",op="compensation",outcome="success"} 1"#,
        r#"jetsaga_dead_letters_total{source="requests"} 1"#,
        "jetsaga_consumer_pending{consumer=\"orchestrator-requests\"}",
        "jetsaga_inputs_in_hand",
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
    // The payment service has its own.
    assert_eq!(http_get(&payment_addr, "/readyz").0, 200);
    let (_, body) = http_get(&payment_addr, "/metrics");
    for want in [
        r#"jetsaga_commands_total{service="payment",action="deduct",op="action",decision="ran",outcome="success"} 1"#,
        r#"jetsaga_commands_total{service="payment",action="deduct",op="action",decision="ran",outcome="business_failure"} 1"#,
        "jetsaga_batch_commands_count",
        "jetsaga_batch_seconds_bucket",
    ] {
        assert!(
            body.contains(want),
            "payment metrics miss {want} in\n{body}"
        );
    }
    // Without its server the orchestrator is alive but not ready.
    sys.nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz").0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_is_one_trace_across_commands_and_replies() {
    use futures::StreamExt;
    let sys = System::start(1).await;
    // Watch commands and replies as they cross the wire (core subscriptions see JetStream
    // publishes too).
    let mut cmds = sys.client.subscribe("saga.cmd.>").await.unwrap();
    let mut replies = sys.client.subscribe("saga.reply.>").await.unwrap();
    sys.client.flush().await.unwrap();
    // A client that brings its own trace context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").as_str(),
    );
    sys.client
        .publish_with_headers(
            "orders.create",
            headers,
            order("t-1", "c-1", "sku-1", 1, 5).into(),
        )
        .await
        .unwrap();
    let s = sys.wait_terminal("t-1", Duration::from_secs(60)).await;
    assert_eq!(s["trace_id"], trace);
    let header = |m: &async_nats::Message| {
        m.headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let mut spans = std::collections::HashSet::new();
    for (what, sub) in [("command", &mut cmds), ("reply", &mut replies)] {
        for _ in 0..4 {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("message")
                .unwrap();
            let tp = header(&m);
            assert!(
                tp.starts_with(&format!("00-{trace}-")),
                "{what} on {}: {tp:?}",
                m.subject
            );
            assert!(
                spans.insert(tp.clone()),
                "each message has its own span: {tp}"
            );
        }
    }
    // A saga started without a trace context gets a new trace id of its own.
    sys.publish(&order("t-2", "c-1", "sku-1", 1, 5), None).await;
    let s = sys.wait_terminal("t-2", Duration::from_secs(60)).await;
    let own = s["trace_id"].as_str().unwrap();
    assert_eq!(own.len(), 32);
    assert_ne!(own, trace);
}

/// One exported span, flattened from an OTLP request.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    error: bool,
    attrs: std::collections::HashMap<String, String>,
}

/// A minimal OTLP/HTTP collector on loopback: decodes every `POST /v1/traces` (protobuf) into
/// [`Exported`] spans.
async fn otlp_collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Exported>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                        .map(|v| match v {
                            Any::StringValue(s) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        let attrs = span
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                let v = match kv.value.as_ref()?.value.as_ref()? {
                                    Any::StringValue(s) => s.clone(),
                                    Any::IntValue(i) => i.to_string(),
                                    other => format!("{other:?}"),
                                };
                                Some((kv.key.clone(), v))
                            })
                            .collect();
                        out.push(Exported {
                            service: service.clone(),
                            name: span.name.clone(),
                            kind: span.kind,
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            error: span.status.as_ref().is_some_and(|s| s.code == 2),
                            attrs,
                        });
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_every_process_are_exported_over_otlp_as_one_trace() {
    let (endpoint, got) = otlp_collector().await;
    let otel = |k: &'static str, v: &str| (k, v.to_string());
    let env = [
        otel("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        otel("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut service_env = Vec::new();
    for svc in ["order", "payment", "inventory"] {
        for (k, v) in &env {
            service_env.push((svc, *k, v.clone()));
        }
    }
    let sys = System::start_with(Options {
        orchestrator_env: env.to_vec(),
        service_env,
        ..Options::default()
    })
    .await;
    // A client with its own trace context, and a saga that compensates (c-2 cannot pay).
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace}-{client_span}-01").as_str(),
    );
    sys.client
        .publish_with_headers(
            "orders.create",
            headers,
            order("ot-1", "c-1", "sku-1", 1, 5).into(),
        )
        .await
        .unwrap();
    sys.publish(&order("ot-2", "c-2", "sku-1", 1, 100_000), None)
        .await;
    let ok = sys.wait_terminal("ot-1", Duration::from_secs(60)).await;
    let comp = sys.wait_terminal("ot-2", Duration::from_secs(60)).await;
    assert_eq!(ok["status"], "completed");
    assert_eq!(comp["status"], "compensated");
    let comp_trace = comp["trace_id"].as_str().unwrap().to_string();

    // ot-1: root + 4 attempts (orchestrator) + 4 handled commands (services).
    // ot-2: root + create, deduct (failed), refund, cancel, and the 4 commands handled.
    let spans_of = |t: &str| -> Vec<Exported> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == t)
            .cloned()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (spans_of(trace).len() < 9 || spans_of(&comp_trace).len() < 9)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = spans_of(trace);
    let dump = format!("{spans:#?}");
    let roots: Vec<_> = spans.iter().filter(|s| s.name == "saga order").collect();
    assert_eq!(roots.len(), 1, "{dump}");
    let root = roots[0];
    assert_eq!(root.parent, client_span, "root is the client's child");
    assert_eq!(root.service, "jetsaga-orchestrator");
    assert_eq!(root.attrs["saga.status"], "completed");
    const CLIENT: i32 = 3; // SPAN_KIND_CLIENT
    const CONSUMER: i32 = 5; // SPAN_KIND_CONSUMER
    let attempts: Vec<_> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    let handled: Vec<_> = spans.iter().filter(|s| s.kind == CONSUMER).collect();
    assert_eq!(attempts.len(), 4, "{dump}");
    assert_eq!(handled.len(), 4, "{dump}");
    for a in &attempts {
        assert_eq!(a.parent, root.span_id, "{dump}");
        assert_eq!(a.service, "jetsaga-orchestrator");
        assert!(!a.error);
        // Exactly one participant span is the child of each attempt, from that attempt's service.
        let children: Vec<_> = handled.iter().filter(|h| h.parent == a.span_id).collect();
        assert_eq!(children.len(), 1, "children of {}: {dump}", a.name);
        let svc = &a.attrs["service"];
        assert_eq!(children[0].service, format!("jetsaga-{svc}"));
        assert_eq!(children[0].attrs["saga.id"], "ot-1");
    }
    let names: std::collections::HashSet<_> = attempts.iter().map(|a| a.name.as_str()).collect();
    for want in [
        "order.create",
        "payment.deduct",
        "inventory.reserve",
        "order.approve",
    ] {
        assert!(names.contains(want), "no span {want}: {dump}");
    }

    // The compensated saga: the failed step is marked, its compensation is there.
    let spans = spans_of(&comp_trace);
    let dump = format!("{spans:#?}");
    let find = |name: &str, kind: i32| {
        spans
            .iter()
            .find(|s| s.name == name && s.kind == kind)
            .unwrap_or_else(|| panic!("no {name}: {dump}"))
    };
    let deduct = find("payment.deduct", CLIENT);
    assert!(deduct.error, "{dump}");
    assert_eq!(deduct.attrs["saga.outcome"], "business_failure");
    assert_eq!(
        find("order.cancel", CLIENT).attrs["saga.op"],
        "compensation"
    );
    let root = find("saga order", 1); // SPAN_KIND_INTERNAL
    assert_eq!(root.attrs["saga.status"], "compensated");
    assert_eq!(root.parent, "", "no client context: a root span");
    assert!(spans
        .iter()
        .any(|s| s.kind == CONSUMER && s.service == "jetsaga-payment" && s.error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_does_not_hold_up_sagas() {
    // Nothing listens on this port: every export fails.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_string()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "200".to_string()),
    ];
    let service_env = ["order", "payment", "inventory"]
        .into_iter()
        .flat_map(|svc| env.iter().map(move |(k, v)| (svc, *k, v.clone())))
        .collect();
    let mut sys = System::start_with(Options {
        orchestrator_env: env.clone(),
        service_env,
        ..Options::default()
    })
    .await;
    for i in 0..20 {
        sys.publish(&order(&format!("od-{i}"), "c-1", "sku-1", 1, 5), None)
            .await;
    }
    for i in 0..20 {
        let s = sys
            .wait_terminal(&format!("od-{i}"), Duration::from_secs(60))
            .await;
        assert_eq!(s["status"], "completed");
    }
    for p in sys.orchestrators.iter_mut() {
        assert!(p.is_running(), "the orchestrator is still up");
    }
    for svc in ["order", "payment", "inventory"] {
        assert!(sys.service(svc).is_running(), "{svc} is still up");
    }
    // The exporters were on and said that they lose what they cannot send.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let logs = sys.logs();
        if logs.contains("BatchSpanProcessor.ExportError") || tokio::time::Instant::now() > deadline
        {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(logs.contains("exporting traces over OTLP/HTTP"), "{logs}");
    assert!(logs.contains("BatchSpanProcessor.ExportError"), "{logs}");
}
