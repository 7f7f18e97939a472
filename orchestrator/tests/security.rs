//! The shipped nats.conf, proven: each user can do its job and nothing else. Denials are seen the
//! way NATS reports them — as server-error events on the connection ("Permissions Violation"),
//! while the API call itself just times out — and the data is checked to be untouched.

mod support;

use std::time::Duration;

use async_nats::{jetstream, ConnectOptions, Event};
use jetsaga_common::{dev, testkit::bin};
use support::{order, System};
use tokio::sync::mpsc;

/// Connects as `user` and returns the client plus a stream of its server errors.
async fn connect(url: &str, user: &str) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_user_and_password(user.into(), dev::password(user))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(err) = e {
                    let _ = tx.send(err.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    (client, rx)
}

async fn expect_violation(rx: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(e)) = tokio::time::timeout(left, rx.recv()).await else {
            panic!("no permission violation reported for {subject}");
        };
        if e.to_lowercase().contains("permissions violation") && e.contains(subject) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_can_do_its_job_and_nothing_else() {
    let sys = System::start(1).await;
    let url = sys.nats.url();
    // Wrong password: refused.
    let wrong = ConnectOptions::with_user_and_password("payment".into(), "guess".into())
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "a wrong password must be refused");

    // The client user may start a saga (and gets the stream's ack, like `nats req`) ...
    let (client, mut client_errors) = connect(&url, "client").await;
    let ack = client
        .request(
            "orders.create",
            order("sec-1", "c-1", "sku-1", 1, 10).into(),
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&ack.payload).contains("JETSAGA_REQUESTS"));
    assert_eq!(
        sys.wait_terminal("sec-1", Duration::from_secs(60)).await["status"],
        "completed"
    );
    // ... but not publish a command.
    client
        .publish("saga.cmd.payment.deduct", "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_violation(&mut client_errors, "saga.cmd.payment.deduct").await;

    let (payment, mut payment_errors) = connect(&url, "payment").await;
    let js = jetstream::new(payment.clone());
    // Payment cannot read the order service's commands: not by subscribing ...
    let _sub = payment.subscribe("saga.cmd.order.>").await.unwrap();
    payment.flush().await.unwrap();
    expect_violation(&mut payment_errors, "saga.cmd.order.>").await;
    // ... nor through the order service's durable consumer ...
    let next = tokio::time::timeout(
        Duration::from_secs(3),
        payment.request(
            "$JS.API.CONSUMER.MSG.NEXT.JETSAGA_COMMANDS.svc-order",
            "1".into(),
        ),
    )
    .await;
    assert!(
        !matches!(next, Ok(Ok(_))),
        "pull from svc-order must fail: {next:?}"
    );
    expect_violation(
        &mut payment_errors,
        "$JS.API.CONSUMER.MSG.NEXT.JETSAGA_COMMANDS.svc-order",
    )
    .await;
    // ... nor by making a consumer of its own on them.
    let create = tokio::time::timeout(
        Duration::from_secs(3),
        js.create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                durable_name: Some("svc-payment".into()),
                filter_subject: "saga.cmd.order.>".into(),
                ..Default::default()
            },
            "JETSAGA_COMMANDS",
        ),
    )
    .await;
    assert!(
        !matches!(create, Ok(Ok(_))),
        "a consumer on order commands must fail"
    );
    // It cannot publish a reply as inventory.
    payment
        .publish("saga.reply.inventory", "{}".into())
        .await
        .unwrap();
    payment.flush().await.unwrap();
    expect_violation(&mut payment_errors, "saga.reply.inventory").await;
    // It cannot write the sagas bucket.
    payment
        .publish("$KV.sagas.sec-1", r#"{"status":"completed"}"#.into())
        .await
        .unwrap();
    payment.flush().await.unwrap();
    expect_violation(&mut payment_errors, "$KV.sagas.sec-1").await;
    let s = sys.saga("sec-1").await.unwrap();
    assert!(
        s["saga_id"] == "sec-1" && s["steps"].is_array(),
        "the saga is untouched: {s}"
    );
    // Nor can the admin user, who may read it.
    let (admin, mut admin_errors) = connect(&url, "admin").await;
    admin.publish("$KV.sagas.sec-1", "{}".into()).await.unwrap();
    admin.flush().await.unwrap();
    expect_violation(&mut admin_errors, "$KV.sagas.sec-1").await;
    assert!(sys.saga("sec-1").await.unwrap()["steps"].is_array());
    // What payment may do, it can: its own reply subject.
    let ok = js
        .publish("saga.reply.payment", "not a reply".into())
        .await
        .unwrap()
        .await;
    assert!(ok.is_ok(), "payment may publish its replies: {ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_logs_the_permission_violations_it_meets() {
    let mut sys = System::start(1).await;
    // Run the payment service with the order user's credentials: it may not touch payment's
    // consumer, and says so in its log.
    sys.service("payment").kill();
    let mut env = vec![("NATS_URL".to_string(), sys.nats.url())];
    env.extend(dev::credentials("order"));
    let p = jetsaga_common::testkit::Proc::spawn(
        "payment-as-order",
        bin("jetsaga-payment"),
        vec![],
        [
            env,
            vec![(
                "JETSAGA_DB".into(),
                sys.dir().join("p2.sqlite").display().to_string(),
            )],
        ]
        .concat(),
        sys.dir().join("payment-as-order.log"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !p.output().to_lowercase().contains("permissions violation") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no violation logged:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
