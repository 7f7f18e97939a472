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
