//! End-to-end: real nats-server, real orchestrator and service processes, a client that only
//! speaks NATS. Each test starts its own server on a free port and kills everything on drop.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{order, Options, System};

const WAIT: Duration = Duration::from_secs(60);

fn step_statuses(s: &Value) -> Vec<(String, String)> {
    s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            (
                st["name"].as_str().unwrap().to_string(),
                st["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_saga_charges_reserves_and_approves() {
    let sys = System::start(1).await;
    let ack = sys
        .request(&order("o-1001", "c-1", "sku-1", 2, 1250), None)
        .await;
    assert_eq!(
        ack["stream"], "JETSAGA_REQUESTS",
        "nats req gets the PubAck: {ack}"
    );
    let s = sys.wait_terminal("o-1001", WAIT).await;
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(
        step_statuses(&s),
        [
            ("order.create".into(), "succeeded".into()),
            ("payment.deduct".into(), "succeeded".into()),
            ("inventory.reserve".into(), "succeeded".into()),
            ("order.approve".into(), "succeeded".into()),
        ]
    );
    assert_eq!(s["input"]["amount_cents"], 2500);
    assert!(s["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(s["steps"][1]["ended_at"].is_string());
    assert_eq!(sys.balance("c-1").await, 1_000_000 - 2500);
    assert_eq!(sys.stock("sku-1").await, 998);
    assert_eq!(sys.order_status("o-1001").await, "APPROVED");
    // Lifecycle events are in the events stream for `nats sub 'saga.events.>'`.
    let events = sys.js.get_stream("JETSAGA_EVENTS").await.unwrap();
    let last = events
        .get_last_raw_message_by_subject("saga.events.o-1001.completed")
        .await
        .expect("completed event");
    let ev: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(ev["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_balance_compensates_and_cancels_the_order() {
    let sys = System::start(1).await;
    sys.publish(&order("o-poor", "c-2", "sku-1", 1, 5000), None)
        .await;
    let s = sys.wait_terminal("o-poor", WAIT).await;
    assert_eq!(s["status"], "compensated", "{s}");
    assert_eq!(s["failure"]["step"], "payment.deduct");
    assert!(
        s["failure"]["reason"].as_str().unwrap().contains("balance"),
        "{s}"
    );
    assert_eq!(s["steps"][0]["status"], "compensated");
    assert_eq!(s["steps"][2]["status"], "pending");
    assert_eq!(sys.balance("c-2").await, 500);
    assert_eq!(sys.stock("sku-1").await, 1000);
    assert_eq!(sys.order_status("o-poor").await, "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_stock_refunds_then_cancels() {
    let sys = System::start(1).await;
    sys.publish(&order("o-short", "c-3", "sku-3", 2, 700), None)
        .await;
    let s = sys.wait_terminal("o-short", WAIT).await;
    assert_eq!(s["status"], "compensated", "{s}");
    assert_eq!(s["failure"]["step"], "inventory.reserve");
    assert!(
        s["failure"]["reason"].as_str().unwrap().contains("sku-3"),
        "{s}"
    );
    assert_eq!(
        step_statuses(&s),
        [
            ("order.create".into(), "compensated".into()),
            ("payment.deduct".into(), "compensated".into()),
            ("inventory.reserve".into(), "compensated".into()),
            ("order.approve".into(), "pending".into()),
        ]
    );
    // Compensations ran in reverse: refund before cancel.
    let refund = s["steps"][1]["compensation_ended_at"].as_str().unwrap();
    let cancel = s["steps"][0]["compensation_ended_at"].as_str().unwrap();
    assert!(refund <= cancel, "refund {refund} then cancel {cancel}");
    assert_eq!(sys.balance("c-3").await, 1_000_000, "refunded");
    assert_eq!(sys.stock("sku-3").await, 1, "stock untouched");
    assert_eq!(sys.order_status("o-short").await, "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_twice_runs_one_saga_and_charges_once() {
    let sys = System::start(1).await;
    let body = order("o-dup", "c-1", "sku-2", 1, 900);
    let first = sys.request(&body, Some("req-o-dup")).await;
    let second = sys.request(&body, Some("req-o-dup")).await;
    assert_eq!(first["duplicate"], Value::Null, "{first}");
    assert_eq!(
        second["duplicate"], true,
        "inside the window the server drops it: {second}"
    );
    let s = sys.wait_terminal("o-dup", WAIT).await;
    assert_eq!(s["status"], "completed");
    // Later, with another message id: the stream takes it, the KV create finds the saga.
    let third = sys.request(&body, Some("req-o-dup-again")).await;
    assert_eq!(third["duplicate"], Value::Null);
    sys.publish(&body, None).await;
    // Wait until the orchestrator consumed both (the requests stream is a work queue).
    let requests = sys.js.get_stream("JETSAGA_REQUESTS").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while requests.get_info().await.unwrap().state.messages > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests not consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = sys.saga("o-dup").await.unwrap();
    assert_eq!(again["version"], s["version"], "the saga did not move");
    assert_eq!(again["request_seq"], first["seq"]);
    assert_eq!(
        sys.balance("c-1").await,
        1_000_000 - 900,
        "money taken once"
    );
    assert_eq!(sys.stock("sku-2").await, 999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_dead_lettered_and_the_loop_keeps_serving() {
    let sys = System::start(1).await;
    let item = json!({"sku": "sku-1", "quantity": 1, "unit_price_cents": 1});
    let big_note = "x".repeat(70 * 1024);
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{not json".to_vec(), "not valid JSON"),
        (
            "wrong type",
            json!({"order_id": 7, "customer_id": "c-1", "items": [item]})
                .to_string()
                .into_bytes(),
            "order_id: must be a string",
        ),
        (
            "missing field",
            json!({"order_id": "b-1", "items": [item]})
                .to_string()
                .into_bytes(),
            "customer_id: is missing",
        ),
        (
            "empty items",
            json!({"order_id": "b-2", "customer_id": "c-1", "items": []})
                .to_string()
                .into_bytes(),
            "items: must have at least 1",
        ),
        (
            "zero quantity",
            order("b-3", "c-1", "sku-1", 0, 1),
            "quantity: must be >= 1",
        ),
        (
            "negative quantity",
            order("b-4", "c-1", "sku-1", -5, 1),
            "quantity: must be >= 1",
        ),
        (
            "overflow",
            json!({"order_id": "b-5", "customer_id": "c-1", "items": [
                {"sku": "sku-1", "quantity": 10000, "unit_price_cents": i64::MAX / 100},
            ]})
            .to_string()
            .into_bytes(),
            "amount_cents: overflows",
        ),
        (
            "id KV cannot hold",
            order("b.6", "c-1", "sku-1", 1, 1),
            "order_id: id contains '.'",
        ),
        (
            "id too long",
            order(&"b".repeat(65), "c-1", "sku-1", 1, 1),
            "at most 64",
        ),
        (
            "oversize",
            json!({"order_id": "b-7", "customer_id": "c-1", "items": [item], "note": big_note})
                .to_string()
                .into_bytes(),
            "at most 65536 are accepted",
        ),
        (
            "unknown field",
            json!({"order_id": "b-8", "customer_id": "c-1", "items": [item], "coupon": "x"})
                .to_string()
                .into_bytes(),
            "coupon: is not a known field",
        ),
    ];
    for (what, body, _) in &bad {
        let ack = sys.request(body, None).await;
        assert!(ack["seq"].is_u64(), "{what}: the stream takes it: {ack}");
    }
    // A good request right after all of them still completes.
    sys.publish(&order("good-1", "c-1", "sku-1", 1, 100), None)
        .await;
    let s = sys.wait_terminal("good-1", WAIT).await;
    assert_eq!(s["status"], "completed");
    let deadline = tokio::time::Instant::now() + WAIT;
    let letters = loop {
        let l = sys.dead_letters().await;
        if l.len() >= bad.len() || tokio::time::Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter each: {letters:?}"
    );
    for (what, body, reason) in &bad {
        let found = letters.iter().find(|(_, p)| p == body);
        let (got, _) = found.unwrap_or_else(|| panic!("{what}: original payload not in the DLQ"));
        assert!(
            got.contains(reason),
            "{what}: reason {got:?} should contain {reason:?}"
        );
    }
    // None of them started a saga, and none is still waiting for redelivery.
    for id in ["b-1", "b-2", "b-3", "b-4", "b-5", "b-7", "b-8"] {
        assert!(sys.saga(id).await.is_none(), "{id} started a saga");
    }
    let requests = sys.js.get_stream("JETSAGA_REQUESTS").await.unwrap();
    assert_eq!(requests.get_info().await.unwrap().state.messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_participant_restarted_lets_waiting_sagas_complete() {
    let mut sys = System::start(1).await;
    sys.service("payment").kill();
    let ids: Vec<String> = (0..10).map(|i| format!("pk-{i}")).collect();
    for id in &ids {
        sys.publish(&order(id, "c-1", "sku-1", 1, 100), None).await;
    }
    // The commands wait in the stream for the payment service's durable consumer.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let waiting = sys
            .js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                "svc-payment",
                "JETSAGA_COMMANDS",
            )
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .num_pending;
        if waiting as usize == ids.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "commands never queued: {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sys.service("payment").restart();
    for id in &ids {
        let s = sys.wait_terminal(id, WAIT).await;
        assert_eq!(s["status"], "completed", "{id}: {s}");
    }
    assert_eq!(sys.balance("c-1").await, 1_000_000 - 100 * ids.len() as i64);
    assert_eq!(sys.stock("sku-1").await, 1000 - ids.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_orchestrator_restarted_finishes_every_saga_once() {
    let mut sys = System::start(1).await;
    // A mix: c-1 rich (completes), c-2 poor (balance), sku-3 short (stock).
    let mut orders = Vec::new();
    for i in 0..60 {
        let (customer, sku, qty, price) = match i % 3 {
            0 => ("c-1", "sku-1", 1, 100 + i),
            1 => ("c-2", "sku-1", 1, 10_000),
            _ => ("c-3", "sku-3", 5, 10),
        };
        orders.push((format!("ok-{i}"), customer, sku, qty, price));
    }
    for (n, (id, c, sku, q, p)) in orders.iter().enumerate() {
        sys.publish(&order(id, c, sku, *q, *p), None).await;
        if n == 25 {
            // Kill it in the middle of the batch, with sagas at every step.
            sys.orchestrators[0].kill();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sys.orchestrators[0].restart();
    let mut charged = 0;
    let mut reserved = 0;
    for (id, c, _, q, p) in &orders {
        let s = sys.wait_terminal(id, WAIT).await;
        let status = s["status"].as_str().unwrap();
        match *c {
            "c-1" => {
                assert_eq!(status, "completed", "{id}: {s}");
                charged += q * p;
                reserved += q;
                assert_eq!(sys.order_status(id).await, "APPROVED");
            }
            _ => {
                assert_eq!(status, "compensated", "{id}: {s}");
                assert_eq!(sys.order_status(id).await, "CANCELLED");
            }
        }
    }
    assert_eq!(
        sys.balance("c-1").await,
        1_000_000 - charged,
        "each completed order charged once"
    );
    assert_eq!(sys.balance("c-2").await, 500, "nothing taken from c-2");
    assert_eq!(
        sys.balance("c-3").await,
        1_000_000,
        "every stock-short order refunded"
    );
    assert_eq!(sys.stock("sku-1").await, 1000 - reserved);
    assert_eq!(sys.stock("sku-3").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_sagas_expire_after_the_retention_and_running_ones_stay() {
    let mut sys = System::start_with(Options {
        orchestrator_env: vec![("JETSAGA_TERMINAL_RETENTION_SECS", "2".into())],
        ..Options::default()
    })
    .await;
    sys.publish(&order("ret-done", "c-1", "sku-1", 1, 10), None)
        .await;
    assert_eq!(
        sys.wait_terminal("ret-done", WAIT).await["status"],
        "completed"
    );
    sys.service("inventory").kill();
    sys.publish(&order("ret-waiting", "c-1", "sku-1", 1, 10), None)
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while sys.saga("ret-done").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "terminal saga never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = sys
        .saga("ret-waiting")
        .await
        .expect("a running saga never expires");
    assert_eq!(waiting["status"], "running");
}
