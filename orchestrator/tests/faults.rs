//! Time, retries, parking, operator commands and faults, end to end: real nats-server, real
//! orchestrator and service processes, faults injected by killing processes (SIGKILL), stopping
//! them (SIGTERM), restarting the server, and the services' fault-injection switches.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{check_mixed, mixed_batch, order, order_definition, terminate, Options, System};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_is_compensated_and_the_late_action_undone() {
    let mut def = order_definition();
    def["steps"][1]["timeout_ms"] = 1000.into();
    let sys = System::start_with(Options {
        definition: Some(def),
        service_env: vec![("payment", "JETSAGA_FAULT_DELAY_MS", "2500".into())],
        ..Options::default()
    })
    .await;
    sys.publish(&order("slow-1", "c-1", "sku-1", 1, 700), None)
        .await;
    let s = sys.wait_terminal("slow-1", WAIT).await;
    assert_eq!(s["status"], "compensated", "{s}");
    assert_eq!(s["failure"]["step"], "payment.deduct");
    assert!(
        s["failure"]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out after 1000 ms"),
        "{s}"
    );
    // The slow payment service still runs the deduct, then the refund: net zero.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = sys.query("payment", "dump", json!({})).await;
        let refunded = rows["payments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["saga_id"] == "slow-1" && p["refunded"] == true);
        let applied = rows["payments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["saga_id"] == "slow-1");
        // Either the deduct never ran (null compensation) or it ran and was refunded.
        let barrier = sys
            .query("payment", "barrier", json!({"saga_id": "slow-1"}))
            .await;
        let compensated = barrier["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["op"] == "compensation");
        if compensated && (!applied || refunded) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "payment never settled: {rows} {barrier}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sys.balance("c-1").await, 1_000_000);
    assert_eq!(sys.order_status("slow-1").await, "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_until_the_service_recovers() {
    let mut def = order_definition();
    def["steps"][1]["retry"] = json!({
        "max_attempts": 50, "initial_backoff_ms": 100, "max_backoff_ms": 300, "multiplier": 2.0, "jitter": 0.1
    });
    let mut sys = System::start_with(Options {
        definition: Some(def),
        service_env: vec![("payment", "JETSAGA_FAULT_RETRYABLE_PERCENT", "100".into())],
        ..Options::default()
    })
    .await;
    sys.publish(&order("flaky-1", "c-1", "sku-1", 2, 300), None)
        .await;
    sys.wait_saga("flaky-1", WAIT, |s| {
        s["steps"][1]["attempts"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    // The service recovers.
    sys.spawn_service("payment", vec![]);
    let s = sys.wait_terminal("flaky-1", WAIT).await;
    assert_eq!(s["status"], "completed", "{s}");
    let attempts = s["steps"][1]["attempts"].as_u64().unwrap();
    assert!(attempts >= 3, "attempts recorded: {s}");
    assert_eq!(
        sys.balance("c-1").await,
        1_000_000 - 600,
        "charged once despite {attempts} attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_failing_past_its_policy_parks_the_saga_until_an_operator_retries() {
    let mut def = order_definition();
    def["steps"][1]["compensation_retry"] = json!({
        "max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 200, "multiplier": 2.0, "jitter": 0.0
    });
    let mut sys = System::start_with(Options {
        definition: Some(def),
        service_env: vec![(
            "payment",
            "JETSAGA_FAULT_FAIL_COMPENSATION_PREFIX",
            "stuck-".into(),
        )],
        ..Options::default()
    })
    .await;
    // c-3 can pay, sku-3 is short: the refund is needed and keeps failing.
    sys.publish(&order("stuck-1", "c-3", "sku-3", 5, 100), None)
        .await;
    let s = sys.wait_terminal("stuck-1", WAIT).await;
    assert_eq!(s["status"], "stuck", "{s}");
    assert_eq!(s["stuck"]["step"], "payment.deduct");
    assert_eq!(s["stuck"]["attempts"], 3);
    assert!(s["stuck"]["last_error"].is_string());
    assert_eq!(
        sys.balance("c-3").await,
        1_000_000 - 500,
        "not refunded yet"
    );
    // Retrying while the service still fails parks it again, after three more attempts.
    // The service recovers; the operator retries (twice: the second is a no-op).
    sys.spawn_service("payment", vec![]);
    let ack = sys.operator("stuck-1", json!({"command": "retry"})).await;
    assert_eq!(ack["stream"], "JETSAGA_OPS", "{ack}");
    let s = sys
        .wait_saga("stuck-1", WAIT, |s| s["status"] == "compensated")
        .await;
    sys.operator("stuck-1", json!({"command": "retry"})).await;
    assert_eq!(s["steps"][1]["compensation_attempts"], 4, "{s}");
    assert_eq!(sys.balance("c-3").await, 1_000_000, "refunded once");
    assert_eq!(sys.order_status("stuck-1").await, "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abort_compensates_a_running_saga() {
    let mut sys = System::start(1).await;
    // Inventory is down: the saga waits at inventory.reserve.
    sys.service("inventory").kill();
    sys.publish(&order("abort-1", "c-1", "sku-1", 1, 250), None)
        .await;
    sys.wait_saga("abort-1", WAIT, |s| s["steps"][2]["status"] == "running")
        .await;
    sys.operator(
        "abort-1",
        json!({"command": "abort", "reason": "customer called"}),
    )
    .await;
    sys.operator("abort-1", json!({"command": "abort"})).await;
    sys.spawn_service("inventory", vec![]);
    let s = sys.wait_terminal("abort-1", WAIT).await;
    assert_eq!(s["status"], "compensated", "{s}");
    assert_eq!(
        s["failure"]["reason"],
        "aborted by operator: customer called"
    );
    assert_eq!(sys.balance("c-1").await, 1_000_000);
    assert_eq!(
        sys.stock("sku-1").await,
        1000,
        "the late reserve was undone or never ran"
    );
    assert_eq!(sys.order_status("abort-1").await, "CANCELLED");
    // A bad operator command is dead-lettered with a reason.
    sys.operator("abort-1", json!({"command": "explode"})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sys
        .dead_letters()
        .await
        .iter()
        .any(|(r, _)| r.contains("operator command is not valid"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad operator command not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_after_an_orchestrator_restart() {
    let mut def = order_definition();
    def["steps"][1]["timeout_ms"] = 1500.into();
    let mut sys = System::start_with(Options {
        definition: Some(def),
        ..Options::default()
    })
    .await;
    sys.service("payment").kill();
    sys.publish(&order("timer-1", "c-1", "sku-1", 1, 400), None)
        .await;
    sys.wait_saga("timer-1", WAIT, |s| s["steps"][1]["status"] == "running")
        .await;
    // The timeout comes due while no orchestrator runs.
    sys.orchestrators[0].kill();
    // Until then it is a message schedule kept by the server, not a message handed out early:
    // the timers consumer has nothing pending or in hand.
    let stream = sys.js.get_stream("JETSAGA_TIMERS").await.unwrap();
    let due = sys.saga("timer-1").await.unwrap()["watchdog_due_ms"].clone();
    let sched = stream
        .get_last_raw_message_by_subject(&format!("saga.sched.timer-1.watchdog.{due}"))
        .await
        .expect("the watchdog's schedule is stored");
    let header = |k: &str| {
        sched
            .headers
            .get(k)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert!(header("Nats-Schedule").starts_with("@at "), "{sched:?}");
    assert_eq!(header("Nats-Schedule-Target"), "saga.timer.timer-1");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("orchestrator-timers").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "no timer is delivered before it is due"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    sys.orchestrators[0].restart();
    let s = sys
        .wait_saga("timer-1", WAIT, |s| s["status"] != "running")
        .await;
    assert!(
        s["failure"]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{s}"
    );
    sys.spawn_service("payment", vec![]);
    let s = sys.wait_terminal("timer-1", WAIT).await;
    assert_eq!(s["status"], "compensated", "{s}");
    assert_eq!(
        sys.balance("c-1").await,
        1_000_000,
        "deduct then refund, or neither"
    );
    assert_eq!(sys.order_status("timer-1").await, "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_that_ends_takes_its_watchdog_with_it() {
    let mut def = order_definition();
    for step in def["steps"].as_array_mut().unwrap() {
        step["timeout_ms"] = 1500.into();
    }
    let sys = System::start_with(Options {
        definition: Some(def),
        ..Options::default()
    })
    .await;
    sys.publish(&order("ends-1", "c-1", "sku-1", 1, 400), None)
        .await;
    let s = sys.wait_terminal("ends-1", WAIT).await;
    assert_eq!(s["status"], "completed", "{s}");
    let due = s["watchdog_due_ms"].as_u64().expect("a watchdog was armed");
    // Past the watchdog's due time and the cancel message's one-second TTL: the schedule was
    // cleared, so nothing fired, nothing was delivered and nothing is left in the stream.
    let wait = due.saturating_sub(jetsaga_common::time::now_ms()) + 2_500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut stream = sys.js.get_stream("JETSAGA_TIMERS").await.unwrap();
    let left = stream.info().await.unwrap().state.messages;
    assert_eq!(left, 0, "the timers stream still holds messages");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("orchestrator-timers").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.delivered.stream_sequence, 0,
        "a timer fired for a saga that had ended: {info:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_give_the_same_results_as_one() {
    let sys = System::start(2).await;
    let batch = mixed_batch("two", 60);
    for (_, body, _, _, _) in &batch {
        sys.publish(body, None).await;
    }
    check_mixed(&sys, &batch).await;
    // Both did work.
    for o in &sys.orchestrators {
        assert!(
            o.output().contains("saga event"),
            "{} handled nothing",
            o.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_and_restarted_mid_batch_loses_nothing() {
    let mut sys = System::start(1).await;
    let batch = mixed_batch("srv", 45);
    for (id, body, _, _, _) in &batch {
        sys.publish_acked(body, &format!("req-{id}")).await;
    }
    // Kill it while most of the batch is in flight (how many were done is logged below).
    let untaken = sys
        .js
        .get_stream("JETSAGA_REQUESTS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages;
    sys.nats.kill();
    eprintln!("requests not yet taken by the orchestrator at the kill: {untaken}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sys.nats.restart();
    check_mixed(&sys, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_nothing_is_lost() {
    let mut sys = System::start(1).await;
    let batch = mixed_batch("term", 45);
    for (n, (_, body, _, _, _)) in batch.iter().enumerate() {
        sys.publish(body, None).await;
        if n == 20 {
            terminate(&sys.orchestrators[0]);
            terminate(&sys.services["payment"]);
        }
    }
    for p in [&mut sys.orchestrators[0]] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while p.is_running() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} ignored SIGTERM",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            p.output().contains("orchestrator stopped"),
            "{}",
            p.output()
        );
        p.restart();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sys.service("payment").is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "payment ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sys.spawn_service("payment", vec![]);
    check_mixed(&sys, &batch).await;
}
