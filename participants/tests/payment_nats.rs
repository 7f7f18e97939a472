//! The payment service's real runtime against a real nats-server: a command published through
//! JetStream is answered on the replies stream and visible through the query subject; the same
//! command again (new message id, or a retry attempt) gets the same answer and takes the money
//! once; garbage lands in the dead-letter stream with its reason and the service keeps serving.

use std::{future::IntoFuture, time::Duration};

use async_nats::{
    header::HeaderMap,
    jetstream::{self, consumer::pull::Stream as PullStream},
};
use bytes::Bytes;
use futures::StreamExt;
use jetsaga_common::{
    dev,
    nats::ConnectConfig,
    protocol::{self, Command, Op, Outcome, Reply, DLQ_REASON, DLQ_SOURCE_SUBJECT, MSG_ID},
    testkit::NatsServer,
    topology,
};
use jetsaga_participants::{runtime, services::payment::Payment, Config, Seed};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn deduct(saga: &str, customer: &str, amount: i64, attempt: u32) -> Command {
    Command {
        saga_id: saga.into(),
        kind: "order".into(),
        step: 1,
        step_name: "payment.deduct".into(),
        service: "payment".into(),
        action: "deduct".into(),
        op: Op::Action,
        attempt,
        input: json!({
            "order_id": saga,
            "customer_id": customer,
            "items": [{ "sku": "sku-1", "quantity": 2, "unit_price_cents": amount / 2 }],
            "amount_cents": amount,
        }),
    }
}

async fn publish_raw(js: &jetstream::Context, subject: &str, msg_id: &str, payload: Vec<u8>) {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, msg_id);
    let ack = js
        .publish_with_headers(subject.to_string(), headers, Bytes::from(payload))
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!ack.duplicate, "{msg_id} was meant to be new");
}

async fn publish_cmd(js: &jetstream::Context, cmd: &Command, msg_id: &str) {
    publish_raw(js, &cmd.subject(), msg_id, serde_json::to_vec(cmd).unwrap()).await;
}

async fn next_reply(replies: &mut PullStream) -> Reply {
    let msg = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply in time")
        .expect("reply stream open")
        .expect("reply message");
    msg.ack().await.unwrap();
    serde_json::from_slice(&msg.payload).expect("a Reply")
}

async fn query(client: &async_nats::Client, what: &str, req: Value) -> Value {
    let subject = protocol::query_subject("payment", what);
    let body = Bytes::from(serde_json::to_vec(&req).unwrap());
    let start = std::time::Instant::now();
    loop {
        match client.request(subject.clone(), body.clone()).await {
            Ok(msg) => return serde_json::from_slice(&msg.payload).unwrap(),
            // No responders until the service has subscribed.
            Err(e) if start.elapsed() < WAIT => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("query {what}: {e}"),
        }
    }
}

async fn balance(client: &async_nats::Client, customer: &str) -> i64 {
    query(client, "balance", json!({ "customer_id": customer })).await["balance_cents"]
        .as_i64()
        .unwrap()
}

/// Waits until every command the service consumer got was acked.
async fn commands_drained(js: &jetstream::Context) {
    let mut stream = js.get_stream(topology::COMMANDS_STREAM).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let info = stream
            .consumer_info(topology::service_consumer("payment"))
            .await
            .unwrap();
        let msgs = stream.info().await.unwrap().state.messages;
        if info.num_pending == 0 && info.num_ack_pending == 0 && msgs == 0 {
            return;
        }
        assert!(start.elapsed() < WAIT, "commands not drained: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letter(js: &jetstream::Context, min_seq: u64) -> jetstream::message::StreamMessage {
    let stream = js.get_stream(topology::DLQ_STREAM).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Ok(m) = stream
            .get_last_raw_message_by_subject("saga.dlq.command")
            .await
        {
            if m.sequence >= min_seq {
                return m;
            }
        }
        assert!(start.elapsed() < WAIT, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_service_over_jetstream() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The service connects as its nats.conf user; the test plays the orchestrator (commands,
    // replies, streams) and an operator (queries).
    let nats = ConnectConfig {
        url: server.url(),
        user: Some("payment".into()),
        password: Some(dev::password("payment")),
        tls: Default::default(),
    };
    let mut config = Config::new(nats, dir.path().join("payment.sqlite"));
    config.seed = Some(
        Seed::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/default.json"))
            .unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(runtime::run(Payment, config, async {
        let _ = stopped.await;
    }));

    let client = dev::connect_as(&server.url(), "orchestrator")
        .await
        .unwrap();
    let admin = dev::connect_as(&server.url(), "admin").await.unwrap();
    let js = jetstream::new(client.clone());
    let settings = topology::Settings::default();
    topology::ensure_shared(&js, &settings).await.unwrap();
    let mut replies = topology::ensure_consumer(
        &js,
        topology::REPLIES_STREAM,
        "test-replies",
        Some(protocol::reply_subject("payment")),
        &settings,
    )
    .await
    .unwrap()
    .messages()
    .await
    .unwrap();

    // 1. A deduct is answered, and the money is gone.
    let first = deduct("o-1", "c-1", 2500, 1);
    publish_cmd(&js, &first, &first.msg_id()).await;
    let r = next_reply(&mut replies).await;
    assert_eq!(
        (r.saga_id.as_str(), r.step, r.op, r.attempt),
        ("o-1", 1, Op::Action, 1)
    );
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.output.as_ref().unwrap()["balance_cents"], 997_500);
    assert_eq!(balance(&admin, "c-1").await, 997_500);

    // 2. The very same command under a new message id: consumed, answered with the same reply
    //    (whose message id the replies stream drops as a duplicate), money taken once.
    publish_cmd(&js, &first, "o-1.1.deduct.1.again").await;
    commands_drained(&js).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), replies.next())
            .await
            .is_err(),
        "the repeated reply must be deduplicated by the server"
    );
    assert_eq!(balance(&admin, "c-1").await, 997_500);

    // 3. A retry attempt of the same step: a new reply, the stored answer.
    let retry = deduct("o-1", "c-1", 2500, 2);
    publish_cmd(&js, &retry, &retry.msg_id()).await;
    let r2 = next_reply(&mut replies).await;
    assert_eq!(r2.attempt, 2);
    assert_eq!((r2.outcome, &r2.output), (r.outcome, &r.output));
    assert_eq!(balance(&admin, "c-1").await, 997_500);

    // 4. Garbage, and a command for another service on payment's subject: dead-lettered with
    //    the reason, never answered.
    publish_raw(
        &js,
        "saga.cmd.payment.deduct",
        "garbage-1",
        b"{not json".to_vec(),
    )
    .await;
    let dead = dead_letter(&js, 1).await;
    assert_eq!(dead.payload.as_ref(), b"{not json");
    let reason = dead
        .headers
        .get(DLQ_REASON)
        .expect("reason header")
        .to_string();
    assert!(reason.starts_with("not a command"), "{reason}");
    assert_eq!(
        dead.headers.get(DLQ_SOURCE_SUBJECT).unwrap().as_str(),
        "saga.cmd.payment.deduct"
    );
    let mut stranger = deduct("o-9", "c-1", 100, 1);
    stranger.service = "inventory".into();
    publish_raw(
        &js,
        "saga.cmd.payment.deduct",
        "stranger-1",
        serde_json::to_vec(&stranger).unwrap(),
    )
    .await;
    let dead2 = dead_letter(&js, dead.sequence + 1).await;
    let reason2 = dead2.headers.get(DLQ_REASON).unwrap().to_string();
    assert!(reason2.contains("reached service \"payment\""), "{reason2}");

    // 5. ... and the next good commands are served: a business failure, then its (null)
    //    compensation.
    let poor = deduct("o-2", "c-2", 2500, 1);
    publish_cmd(&js, &poor, &poor.msg_id()).await;
    let r = next_reply(&mut replies).await;
    assert_eq!(r.saga_id, "o-2");
    assert_eq!(r.outcome, Outcome::BusinessFailure);
    assert_eq!(r.error.as_deref(), Some("insufficient balance: 500 < 2500"));
    let mut refund = deduct("o-2", "c-2", 2500, 1);
    refund.op = Op::Compensation;
    refund.action = "refund".into();
    publish_cmd(&js, &refund, &refund.msg_id()).await;
    let r = next_reply(&mut replies).await;
    assert_eq!((r.op, r.outcome), (Op::Compensation, Outcome::Success));
    assert_eq!(balance(&admin, "c-2").await, 500);
    commands_drained(&js).await;

    // Queries: barrier rows, dump, and errors as {"error": ...}.
    let rows = query(&admin, "barrier", json!({ "saga_id": "o-2" })).await;
    assert_eq!(rows["rows"].as_array().unwrap().len(), 2, "{rows}");
    let dump = query(&admin, "dump", json!({})).await;
    assert_eq!(dump["payments"].as_array().unwrap().len(), 1, "{dump}");
    assert!(query(&admin, "nope", json!({})).await["error"].is_string());
    assert!(query(&admin, "balance", json!({ "customer_id": "c-404" })).await["error"].is_string());

    // Graceful shutdown returns cleanly.
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, service)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
}

/// Many commands at once go through the group-commit path (many per transaction): every one is
/// answered exactly once and applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_applied_exactly_once() {
    const N: usize = 3000;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The service connects as its nats.conf user; the test plays the orchestrator (commands,
    // replies, streams) and an operator (queries).
    let nats = ConnectConfig {
        url: server.url(),
        user: Some("payment".into()),
        password: Some(dev::password("payment")),
        tls: Default::default(),
    };
    let mut config = Config::new(nats, dir.path().join("payment.sqlite"));
    config.seed = Some(Seed {
        customers: [("c-1".to_string(), 1_000_000)].into(),
        ..Default::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(runtime::run(Payment, config, async {
        let _ = stopped.await;
    }));
    let client = dev::connect_as(&server.url(), "orchestrator")
        .await
        .unwrap();
    let admin = dev::connect_as(&server.url(), "admin").await.unwrap();
    let js = jetstream::new(client.clone());
    let settings = topology::Settings::default();
    topology::ensure_shared(&js, &settings).await.unwrap();
    let mut replies = topology::ensure_consumer(
        &js,
        topology::REPLIES_STREAM,
        "test-replies",
        Some(protocol::reply_subject("payment")),
        &settings,
    )
    .await
    .unwrap()
    .messages()
    .await
    .unwrap();

    let started = std::time::Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..N {
        let cmd = deduct(&format!("s-{i}"), "c-1", 2, 1);
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID, cmd.msg_id().as_str());
        acks.push(
            js.publish_with_headers(
                cmd.subject(),
                headers,
                serde_json::to_vec(&cmd).unwrap().into(),
            )
            .await
            .unwrap()
            .into_future(),
        );
        // Every command of saga 0..100 twice, as a redelivery would.
        if i < 100 {
            publish_cmd(&js, &cmd, &format!("{}.again", cmd.msg_id())).await;
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let r = next_reply(&mut replies).await;
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert!(
            seen.insert(r.saga_id.clone()),
            "second reply for {}",
            r.saga_id
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{N} commands answered in {elapsed:?} ({:.0}/s)",
        N as f64 / elapsed.as_secs_f64()
    );
    commands_drained(&js).await;
    assert_eq!(balance(&admin, "c-1").await, 1_000_000 - 2 * N as i64);
    let dump = query(&admin, "dump", json!({})).await;
    assert_eq!(dump["payments"].as_array().unwrap().len(), N);

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
