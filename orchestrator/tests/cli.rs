//! The `jetsaga` CLI against a running system: every subcommand an operator uses, run as the real
//! binary, its output checked.

mod support;

use std::{process::Command, time::Duration};

use jetsaga_common::{dev, testkit::bin};
use serde_json::json;
use support::{order, System};

fn jetsaga(sys: &System, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("jetsaga"))
        .args(args)
        .env("NATS_URL", sys.nats.url())
        .envs(dev::credentials("admin"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_do_their_job_with_the_cli() {
    let mut sys = System::start(1).await;
    // submit --wait: prints the stream ack, the saga id and the outcome.
    let body = String::from_utf8(order("cli-1", "c-1", "sku-1", 2, 100)).unwrap();
    let (ok, out) = jetsaga(&sys, &["submit", "--wait", &body]);
    assert!(ok, "{out}");
    assert!(
        out.contains("JETSAGA_REQUESTS") && out.contains("saga cli-1"),
        "{out}"
    );
    assert!(out.contains("completed"), "{out}");
    sys.publish(&order("cli-2", "c-2", "sku-1", 1, 9999), None)
        .await;
    sys.wait_terminal("cli-2", Duration::from_secs(60)).await;
    // A saga waiting at inventory, to abort.
    sys.service("inventory").kill();
    sys.publish(&order("cli-3", "c-1", "sku-1", 1, 100), None)
        .await;
    sys.wait_saga("cli-3", Duration::from_secs(60), |s| {
        s["steps"][2]["status"] == "running"
    })
    .await;

    let (ok, out) = jetsaga(&sys, &["list"]);
    assert!(ok, "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("cli-")).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows[0].starts_with("cli-3")
            && rows[0].contains("running")
            && rows[0].contains("inventory.reserve"),
        "newest first: {out}"
    );
    let (_, out) = jetsaga(&sys, &["list", "--status", "compensated"]);
    assert!(out.contains("cli-2") && !out.contains("cli-1 "), "{out}");
    assert!(out.contains("insufficient balance"), "{out}");

    let (ok, out) = jetsaga(&sys, &["show", "cli-2"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("status: compensated") && out.contains("payment.deduct"),
        "{out}"
    );
    assert!(
        out.contains("undo cancel") && out.contains(" ms)"),
        "timeline with durations: {out}"
    );
    let (_, out) = jetsaga(&sys, &["show", "cli-2", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["saga_id"],
        "cli-2"
    );

    let (ok, out) = jetsaga(&sys, &["stats"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("sagas: 3") && out.contains("oldest in flight: cli-3"),
        "{out}"
    );

    // watch: live events for one saga while it is aborted.
    let mut watcher = std::process::Command::new(bin("jetsaga"))
        .args(["watch", "cli-3"])
        .env("NATS_URL", sys.nats.url())
        .envs(dev::credentials("admin"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out) = jetsaga(&sys, &["abort", "cli-3", "--reason", "operator test"]);
    assert!(ok && out.contains("JETSAGA_OPS"), "{out}");
    sys.spawn_service("inventory", vec![]);
    let s = sys.wait_terminal("cli-3", Duration::from_secs(60)).await;
    assert_eq!(s["status"], "compensated");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = watcher.kill();
    let out = watcher.wait_with_output().unwrap();
    let watched = String::from_utf8_lossy(&out.stdout);
    assert!(
        watched.contains("step_failed") && watched.contains("compensated"),
        "{watched}"
    );
    let (ok, out) = jetsaga(&sys, &["retry", "cli-3"]);
    assert!(
        ok,
        "retry of a saga that is not stuck is accepted and ignored: {out}"
    );

    // Dead letters: list, show, replay after a fix.
    sys.publish(br#"{"order_id":"cli-4","customer_id":"c-1","items":[{"sku":"sku-1","quantity":0,"unit_price_cents":1}]}"#, None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (_, out) = jetsaga(&sys, &["dlq", "list"]);
        if out.contains("quantity") || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        out.contains("1 dead letters") && out.contains("orders.create"),
        "{out}"
    );
    let seq = out
        .lines()
        .find(|l| l.contains("orders.create"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let (ok, out) = jetsaga(&sys, &["dlq", "show", &seq]);
    assert!(
        ok && out.contains("Jetsaga-Reason") && out.contains("\"quantity\":0"),
        "{out}"
    );
    // Replaying the same bad payload dead-letters it again (a real replay follows a fix).
    let (ok, out) = jetsaga(&sys, &["dlq", "replay", &seq]);
    assert!(ok && out.contains("replayed"), "{out}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sys.dead_letters().await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay did not reach the orchestrator"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, out) = jetsaga(
        &sys,
        &[
            "query",
            "payment",
            "balance",
            &json!({"customer_id": "c-1"}).to_string(),
        ],
    );
    assert!(out.contains("balance_cents"), "{out}");
    for sub in [
        "list", "show", "watch", "stats", "submit", "abort", "retry", "dlq", "query", "demo",
    ] {
        let (ok, out) = jetsaga(&sys, &[sub, "--help"]);
        assert!(ok && out.contains("Usage"), "{sub} --help: {out}");
    }
}
