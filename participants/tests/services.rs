//! The three example services' business rules, run through the real barrier on a real SQLite
//! file: payment deduct/refund, inventory reserve/release (all or nothing), order
//! create/approve/cancel, their queries, and the idempotent seed.

use jetsaga_common::protocol::{Command, Op, Outcome, Reply};
use jetsaga_participants::{
    barrier, db,
    services::{inventory::Inventory, order::Order, payment::Payment},
    Seed, Service, Synchronous,
};
use rusqlite::Connection;
use serde_json::{json, Value};

fn seed() -> Seed {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/default.json");
    Seed::load(&path).unwrap()
}

fn open<S: Service>(svc: &S, dir: &tempfile::TempDir) -> Connection {
    let conn = db::open_writer(&dir.path().join("db.sqlite"), Synchronous::Normal).unwrap();
    barrier::migrate(&conn).unwrap();
    svc.migrate(&conn).unwrap();
    svc.seed(&conn, &seed()).unwrap();
    conn
}

fn input(order: &str, customer: &str, items: Value, amount: i64) -> Value {
    json!({ "order_id": order, "customer_id": customer, "items": items, "amount_cents": amount })
}

fn cmd(service: &str, saga: &str, step: u32, op: Op, action: &str, input: Value) -> Command {
    Command {
        saga_id: saga.into(),
        kind: "order".into(),
        step,
        step_name: format!("{service}.{action}"),
        service: service.into(),
        action: action.into(),
        op,
        attempt: 1,
        input,
    }
}

fn run<S: Service>(conn: &mut Connection, svc: &S, c: &Command) -> Reply {
    barrier::handle(conn, svc, c).unwrap().reply
}

fn query<S: Service>(conn: &Connection, svc: &S, what: &str, req: Value) -> Value {
    svc.query(conn, what, &req).unwrap()
}

#[test]
fn payment_deducts_refuses_and_refunds_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Payment;
    let mut conn = open(&svc, &dir);
    let items = json!([{ "sku": "sku-1", "quantity": 2, "unit_price_cents": 1250 }]);

    let ok = cmd(
        "payment",
        "o-1",
        1,
        Op::Action,
        "deduct",
        input("o-1", "c-1", items.clone(), 2500),
    );
    let r = run(&mut conn, &svc, &ok);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(r.output.unwrap()["balance_cents"], 997_500);
    run(&mut conn, &svc, &ok); // duplicate
    let bal = |conn: &Connection, c: &str| {
        query(conn, &Payment, "balance", json!({ "customer_id": c }))["balance_cents"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(bal(&conn, "c-1"), 997_500, "taken once");

    let poor = cmd(
        "payment",
        "o-2",
        1,
        Op::Action,
        "deduct",
        input("o-2", "c-2", items.clone(), 2500),
    );
    let r = run(&mut conn, &svc, &poor);
    assert_eq!(r.outcome, Outcome::BusinessFailure);
    assert_eq!(r.error.as_deref(), Some("insufficient balance: 500 < 2500"));
    assert_eq!(bal(&conn, "c-2"), 500);

    let nobody = cmd(
        "payment",
        "o-3",
        1,
        Op::Action,
        "deduct",
        input("o-3", "c-9", items, 1),
    );
    assert_eq!(
        run(&mut conn, &svc, &nobody).error.as_deref(),
        Some("unknown customer c-9")
    );

    let refund = cmd("payment", "o-1", 1, Op::Compensation, "refund", json!({}));
    let r = run(&mut conn, &svc, &refund);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(r.output.unwrap()["refunded_cents"], 2500);
    run(&mut conn, &svc, &refund); // duplicate
    assert_eq!(bal(&conn, "c-1"), 1_000_000);

    let dump = query(&conn, &svc, "dump", json!({}));
    assert_eq!(dump["payments"].as_array().unwrap().len(), 1);
    assert_eq!(dump["payments"][0]["refunded"], true);
    assert!(svc
        .query(&conn, "balance", &json!({ "customer_id": "c-9" }))
        .is_err());
    assert!(svc.query(&conn, "balance", &json!({})).is_err());

    // Unknown action: a business failure with a clear message.
    let weird = cmd("payment", "o-4", 1, Op::Action, "steal", json!({}));
    let r = run(&mut conn, &svc, &weird);
    assert_eq!(r.outcome, Outcome::BusinessFailure);
    assert!(r.error.unwrap().contains("unknown action \"steal\""));
}

#[test]
fn seed_never_resets_existing_rows() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Payment;
    let mut conn = open(&svc, &dir);
    let c = cmd(
        "payment",
        "o-1",
        1,
        Op::Action,
        "deduct",
        input(
            "o-1",
            "c-1",
            json!([{ "sku": "sku-1", "quantity": 1, "unit_price_cents": 100 }]),
            100,
        ),
    );
    run(&mut conn, &svc, &c);
    svc.seed(&conn, &seed()).unwrap();
    let b = query(&conn, &svc, "balance", json!({ "customer_id": "c-1" }));
    assert_eq!(b["balance_cents"], 999_900);
}

#[test]
fn inventory_reserves_all_or_nothing_and_releases_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Inventory;
    let mut conn = open(&svc, &dir);
    let stock = |conn: &Connection, sku: &str| {
        query(conn, &Inventory, "stock", json!({ "sku": sku }))["quantity"]
            .as_i64()
            .unwrap()
    };

    // sku-1 twice on two lines plus sku-2.
    let items = json!([
        { "sku": "sku-1", "quantity": 2, "unit_price_cents": 10 },
        { "sku": "sku-2", "quantity": 3, "unit_price_cents": 10 },
        { "sku": "sku-1", "quantity": 1, "unit_price_cents": 10 }
    ]);
    let ok = cmd(
        "inventory",
        "o-1",
        2,
        Op::Action,
        "reserve",
        input("o-1", "c-1", items, 50),
    );
    assert_eq!(run(&mut conn, &svc, &ok).outcome, Outcome::Success);
    assert_eq!((stock(&conn, "sku-1"), stock(&conn, "sku-2")), (997, 997));

    // Short on sku-3: nothing at all is taken, sku-1 included.
    let short = json!([
        { "sku": "sku-1", "quantity": 1, "unit_price_cents": 10 },
        { "sku": "sku-3", "quantity": 2, "unit_price_cents": 10 }
    ]);
    let c = cmd(
        "inventory",
        "o-2",
        2,
        Op::Action,
        "reserve",
        input("o-2", "c-1", short, 30),
    );
    let r = run(&mut conn, &svc, &c);
    assert_eq!(r.outcome, Outcome::BusinessFailure);
    assert_eq!(
        r.error.as_deref(),
        Some("stock short for sku-3: want 2, have 1")
    );
    assert_eq!((stock(&conn, "sku-1"), stock(&conn, "sku-3")), (997, 1));

    let rel = cmd(
        "inventory",
        "o-1",
        2,
        Op::Compensation,
        "release",
        json!({}),
    );
    assert_eq!(run(&mut conn, &svc, &rel).outcome, Outcome::Success);
    run(&mut conn, &svc, &rel);
    assert_eq!((stock(&conn, "sku-1"), stock(&conn, "sku-2")), (1000, 1000));
    let dump = query(&conn, &svc, "dump", json!({}));
    assert_eq!(dump["reservations"].as_array().unwrap().len(), 2);
    assert!(dump["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["released"] == true));

    // Null compensation for the failed o-2 touches nothing.
    let rel2 = cmd(
        "inventory",
        "o-2",
        2,
        Op::Compensation,
        "release",
        json!({}),
    );
    assert_eq!(run(&mut conn, &svc, &rel2).outcome, Outcome::Success);
    assert_eq!(stock(&conn, "sku-3"), 1);
}

#[test]
fn order_goes_pending_approved_or_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Order;
    let mut conn = open(&svc, &dir);
    let items = json!([{ "sku": "sku-1", "quantity": 1, "unit_price_cents": 10 }]);
    let inp = input("o-1", "c-1", items.clone(), 10);
    let status = |conn: &Connection, id: &str| {
        query(conn, &Order, "status", json!({ "order_id": id }))["status"].clone()
    };

    assert_eq!(
        run(
            &mut conn,
            &svc,
            &cmd("order", "o-1", 0, Op::Action, "create", inp.clone())
        )
        .outcome,
        Outcome::Success
    );
    let s = query(&conn, &svc, "status", json!({ "order_id": "o-1" }));
    assert_eq!(
        s,
        json!({ "order_id": "o-1", "status": "PENDING", "customer_id": "c-1", "amount_cents": 10 })
    );
    assert_eq!(
        run(
            &mut conn,
            &svc,
            &cmd("order", "o-1", 3, Op::Action, "approve", inp.clone())
        )
        .outcome,
        Outcome::Success
    );
    assert_eq!(status(&conn, "o-1"), "APPROVED");

    // A second saga cannot create the same order.
    let dup = run(
        &mut conn,
        &svc,
        &cmd("order", "other", 0, Op::Action, "create", inp),
    );
    assert_eq!(dup.outcome, Outcome::BusinessFailure);

    // o-2: created, then cancelled; approving afterwards is refused.
    let inp2 = input("o-2", "c-2", items, 10);
    run(
        &mut conn,
        &svc,
        &cmd("order", "o-2", 0, Op::Action, "create", inp2.clone()),
    );
    let r = run(
        &mut conn,
        &svc,
        &cmd("order", "o-2", 0, Op::Compensation, "cancel", inp2.clone()),
    );
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(status(&conn, "o-2"), "CANCELLED");
    let r = run(
        &mut conn,
        &svc,
        &cmd("order", "o-2", 3, Op::Action, "approve", inp2),
    );
    assert_eq!(r.outcome, Outcome::BusinessFailure);
    assert_eq!(
        r.error.as_deref(),
        Some("order o-2 is CANCELLED, not PENDING")
    );

    assert_eq!(
        svc.query(&conn, "status", &json!({ "order_id": "nope" })),
        Err("not found".into())
    );
    assert_eq!(
        query(&conn, &svc, "dump", json!({}))["orders"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Invalid input never succeeds.
    let bad = run(
        &mut conn,
        &svc,
        &cmd(
            "order",
            "o-3",
            0,
            Op::Action,
            "create",
            json!({ "order_id": "o-3" }),
        ),
    );
    assert_eq!(bad.outcome, Outcome::BusinessFailure);
    assert!(bad.error.unwrap().starts_with("invalid order input"));
}
