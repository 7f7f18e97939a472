//! Metrics, health and readiness of the orchestrator, scraped over HTTP from the real process.

mod support;

use std::time::Duration;

use jetsaga_common::testkit::free_port;
use support::{http_get, order, Options, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_exposes_metrics_health_and_readiness() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut sys = System::start_with(Options {
        orchestrator_env: vec![("JETSAGA_METRICS_ADDR", addr.clone())],
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
    // Without its server the orchestrator is alive but not ready.
    sys.nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz").0, 503);
}
