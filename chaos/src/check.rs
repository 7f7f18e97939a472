//! The invariants a chaos run must end with, checked over the plan (what was asked) and the
//! snapshot (what the bucket and the services' own stores hold). Pure: no NATS, no processes, so
//! every invariant is unit-tested on hand-made worlds below.
//!
//! | invariant | what must hold |
//! |---|---|
//! | `terminal` | every saga is `completed` or `compensated`; `stuck` exactly for the injected stuck sagas |
//! | `outcome_allowed` | a poor, stock-short or stuck saga never completed; a flaky one that completed retried every step |
//! | `kv_matches_barrier` | every step the saga state calls succeeded/compensated has that success in the participant's barrier |
//! | `money_per_saga` | completed: one payment, not refunded, of the order's amount; compensated or stuck: nothing left charged |
//! | `money_conserved` | per customer, balance + what its unrefunded payments took = seed balance (so also in total) |
//! | `stock_per_saga` | completed: exactly the order's units reserved, none released; otherwise nothing left reserved |
//! | `stock_conserved` | per SKU, stock + unreleased reservations = seed stock |
//! | `order_matches_saga` | completed: APPROVED; compensated: CANCELLED (or never created); stuck: neither APPROVED nor CANCELLED |
//! | `barrier_matches_business` | every business row has its barrier row and vice versa (nothing applied outside the barrier) |
//! | `no_hanging_action` | no action ran (success or business failure recorded) after its compensation was recorded |
//! | `no_double_action` | at most one barrier row per (service, saga, step, op), one payment per saga, one reservation per (saga, SKU) |
//! | `no_foreign_rows` | no business or barrier row for a saga that was not submitted |

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::{
    collect::{BarrierRow, Snapshot},
    plan::{Category, Saga, SeedData},
};

/// One broken invariant and the sagas (or keys) that break it.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
    pub sagas: Vec<String>,
}

/// Counts for the report.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub by_status: BTreeMap<String, usize>,
    pub by_category: BTreeMap<(String, String), usize>,
    /// Actions that arrived after their compensation and were refused (`aborted`).
    pub hanging_actions_blocked: usize,
    /// Compensations recorded without any action (the action never ran).
    pub null_compensations: usize,
    /// Action attempts beyond the first, summed over every saga's steps.
    pub action_retries: u64,
    pub compensation_retries: u64,
}

/// Collects violations, grouping the sagas of one invariant+detail together.
#[derive(Default)]
struct Found {
    map: BTreeMap<(&'static str, String), Vec<String>>,
}

impl Found {
    fn add(&mut self, invariant: &'static str, detail: impl Into<String>, saga: &str) {
        self.map
            .entry((invariant, detail.into()))
            .or_default()
            .push(saga.to_string());
    }

    fn into_vec(self) -> Vec<Violation> {
        self.map
            .into_iter()
            .map(|((invariant, detail), sagas)| Violation {
                invariant,
                detail,
                sagas,
            })
            .collect()
    }
}

/// Step indexes of the order saga (see `orchestrator/definitions/order.json`).
const CREATE: u32 = 0;
const DEDUCT: u32 = 1;
const RESERVE: u32 = 2;
const APPROVE: u32 = 3;

/// Checks every invariant. `stuck_retried`: the injected compensation failures were switched
/// off and every stuck saga got an operator `retry`, so the `stuck-` sagas must now be
/// compensated like any other.
pub fn check(
    seed: &SeedData,
    sagas: &[Saga],
    snap: &Snapshot,
    stuck_retried: bool,
) -> (Vec<Violation>, Stats) {
    let mut f = Found::default();
    let mut stats = Stats::default();
    let planned: HashMap<&str, &Saga> = sagas.iter().map(|s| (s.id.as_str(), s)).collect();

    // Barrier rows by key; duplicates are themselves a violation.
    let mut barrier: HashMap<(&str, &str, u32, &str), &BarrierRow> = HashMap::new();
    for r in &snap.barrier {
        if !planned.contains_key(r.saga_id.as_str()) {
            f.add(
                "no_foreign_rows",
                format!("barrier row in {}", r.service),
                &r.saga_id,
            );
        }
        let key = (
            r.service.as_str(),
            r.saga_id.as_str(),
            r.step,
            r.op.as_str(),
        );
        if barrier.insert(key, r).is_some() {
            f.add(
                "no_double_action",
                format!(
                    "two barrier rows for {} step {} {}",
                    r.service, r.step, r.op
                ),
                &r.saga_id,
            );
        }
    }
    let row = |svc: &str, id: &str, step: u32, op: &str| barrier.get(&(svc, id, step, op)).copied();
    let success = |svc: &str, id: &str, step: u32, op: &str| {
        row(svc, id, step, op).is_some_and(|r| r.outcome == "success")
    };

    // Hanging actions and null compensations, from the barrier alone.
    for r in snap.barrier.iter().filter(|r| r.op == "compensation") {
        match row(&r.service, &r.saga_id, r.step, "action") {
            None => stats.null_compensations += 1,
            Some(a) if a.outcome == "aborted" => stats.hanging_actions_blocked += 1,
            Some(a) if a.recorded_at_ms > r.recorded_at_ms => f.add(
                "no_hanging_action",
                format!(
                    "{} step {} action recorded {} ({}) after its compensation",
                    r.service,
                    r.step,
                    a.outcome,
                    a.recorded_at_ms - r.recorded_at_ms
                ) + " ms",
                &r.saga_id,
            ),
            Some(_) => {}
        }
    }

    // Business rows by saga.
    let mut payments: HashMap<&str, Vec<_>> = HashMap::new();
    for p in &snap.payments {
        if !planned.contains_key(p.saga_id.as_str()) {
            f.add("no_foreign_rows", "payment row", &p.saga_id);
        }
        payments.entry(p.saga_id.as_str()).or_default().push(p);
    }
    let mut reservations: HashMap<&str, Vec<_>> = HashMap::new();
    for r in &snap.reservations {
        if !planned.contains_key(r.saga_id.as_str()) {
            f.add("no_foreign_rows", "reservation row", &r.saga_id);
        }
        reservations.entry(r.saga_id.as_str()).or_default().push(r);
    }
    let mut orders: HashMap<&str, Vec<_>> = HashMap::new();
    for o in &snap.orders {
        if !planned.contains_key(o.saga_id.as_str()) {
            f.add("no_foreign_rows", "order row", &o.saga_id);
        }
        orders.entry(o.saga_id.as_str()).or_default().push(o);
    }

    for s in sagas {
        let id = s.id.as_str();
        let state = snap.states.get(id);
        let status = state
            .and_then(|v| v["status"].as_str())
            .unwrap_or("missing")
            .to_string();
        *stats.by_status.entry(status.clone()).or_insert(0) += 1;
        *stats
            .by_category
            .entry((s.category.name().to_string(), status.clone()))
            .or_insert(0) += 1;
        let steps: Vec<&Value> = state
            .and_then(|v| v["steps"].as_array())
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        for st in &steps {
            stats.action_retries += st["attempts"].as_u64().unwrap_or(0).saturating_sub(1);
            stats.compensation_retries += st["compensation_attempts"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(1);
        }

        // terminal / outcome_allowed
        let stuck_expected = s.category == Category::Stuck && !stuck_retried;
        match status.as_str() {
            "completed" | "compensated" if !stuck_expected => {}
            "stuck" if stuck_expected => {}
            "stuck" if stuck_retried && s.category == Category::Stuck => {
                f.add("terminal", "still stuck after the operator retry", id)
            }
            "stuck" => f.add(
                "terminal",
                "stuck without an injected compensation failure",
                id,
            ),
            "missing" => f.add("terminal", "no saga state in the bucket", id),
            other if stuck_expected => {
                f.add("terminal", format!("injected stuck saga ended {other}"), id)
            }
            other => f.add("terminal", format!("not terminal: {other}"), id),
        }
        if status == "completed" {
            match s.category {
                Category::Poor | Category::Short | Category::Stuck => f.add(
                    "outcome_allowed",
                    format!("{} saga completed", s.category.name()),
                    id,
                ),
                Category::Flaky
                    if steps
                        .iter()
                        .any(|st| st["attempts"].as_u64().unwrap_or(0) < 2) =>
                {
                    f.add(
                        "outcome_allowed",
                        "flaky saga completed without retrying a step",
                        id,
                    )
                }
                _ => {}
            }
        }

        // kv_matches_barrier
        for (i, st) in steps.iter().enumerate() {
            let svc = st["service"].as_str().unwrap_or("?");
            let step = i as u32;
            match st["status"].as_str() {
                Some("succeeded") if !success(svc, id, step, "action") => f.add(
                    "kv_matches_barrier",
                    format!("step {step} succeeded in the saga, no recorded success at {svc}"),
                    id,
                ),
                Some("compensated") if !success(svc, id, step, "compensation") => f.add(
                    "kv_matches_barrier",
                    format!(
                        "step {step} compensated in the saga, no recorded compensation at {svc}"
                    ),
                    id,
                ),
                _ => {}
            }
        }

        // money_per_saga
        let pays = payments.get(id).cloned().unwrap_or_default();
        let charged: Vec<_> = pays.iter().filter(|p| !p.refunded).collect();
        if pays.len() > 1 {
            f.add(
                "no_double_action",
                format!("{} payment rows", pays.len()),
                id,
            );
        }
        match status.as_str() {
            "completed" => {
                if charged.len() != 1 {
                    f.add(
                        "money_per_saga",
                        format!("completed but charged {} times", charged.len()),
                        id,
                    );
                } else if charged[0].amount_cents != s.amount()
                    || charged[0].customer_id != s.customer
                {
                    f.add(
                        "money_per_saga",
                        "completed but charged the wrong amount or customer",
                        id,
                    );
                }
            }
            _ if !charged.is_empty() => {
                f.add("money_per_saga", format!("{status} but still charged"), id)
            }
            _ => {}
        }

        // stock_per_saga
        let res = reservations.get(id).cloned().unwrap_or_default();
        let mut held: BTreeMap<String, i64> = BTreeMap::new();
        let mut per_sku: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &res {
            *per_sku.entry(r.sku.as_str()).or_insert(0) += 1;
            if !r.released {
                *held.entry(r.sku.clone()).or_insert(0) += r.quantity;
            }
        }
        if per_sku.values().any(|n| *n > 1) {
            f.add("no_double_action", "two reservations of one SKU", id);
        }
        match status.as_str() {
            "completed" if held != s.units() => f.add(
                "stock_per_saga",
                "completed but the reserved units differ from the order",
                id,
            ),
            "completed" => {}
            _ if !held.is_empty() => f.add(
                "stock_per_saga",
                format!("{status} but stock still reserved"),
                id,
            ),
            _ => {}
        }

        // order_matches_saga
        let ords = orders.get(id).cloned().unwrap_or_default();
        if ords.len() > 1 {
            f.add("no_double_action", format!("{} order rows", ords.len()), id);
        }
        let order_status = ords.first().map(|o| o.status.as_str());
        let ok = match status.as_str() {
            "completed" => order_status == Some("APPROVED"),
            "compensated" => matches!(order_status, None | Some("CANCELLED")),
            "stuck" => !matches!(order_status, Some("APPROVED" | "CANCELLED")),
            _ => true, // already reported as not terminal
        };
        if !ok {
            f.add(
                "order_matches_saga",
                format!("saga {status}, order {}", order_status.unwrap_or("absent")),
                id,
            );
        }
        if let Some(o) = ords.first() {
            if o.order_id != s.id || o.amount_cents != s.amount() || o.customer_id != s.customer {
                f.add(
                    "order_matches_saga",
                    "order row differs from the request",
                    id,
                );
            }
        }

        // barrier_matches_business: business rows only where the barrier recorded the success,
        // and every recorded success left its business row.
        let checks = [
            ("order", CREATE, "action", !ords.is_empty(), "order row"),
            (
                "order",
                CREATE,
                "compensation-ran",
                order_status == Some("CANCELLED"),
                "CANCELLED order",
            ),
            (
                "order",
                APPROVE,
                "action",
                order_status == Some("APPROVED"),
                "APPROVED order",
            ),
            ("payment", DEDUCT, "action", !pays.is_empty(), "payment row"),
            (
                "payment",
                DEDUCT,
                "compensation-ran",
                pays.iter().any(|p| p.refunded),
                "refunded payment",
            ),
            (
                "inventory",
                RESERVE,
                "action",
                !res.is_empty(),
                "reservation rows",
            ),
            (
                "inventory",
                RESERVE,
                "compensation-ran",
                res.iter().any(|r| r.released),
                "released reservation",
            ),
        ];
        for (svc, step, what, business, name) in checks {
            let recorded = match what {
                "action" => success(svc, id, step, "action"),
                // A compensation that really undid something: its action succeeded first.
                _ => success(svc, id, step, "compensation") && success(svc, id, step, "action"),
            };
            if business && !recorded {
                f.add(
                    "barrier_matches_business",
                    format!("{name} without its recorded success at {svc}"),
                    id,
                );
            }
            // Approval and a successful create/deduct/reserve must have left their rows; a
            // compensation that ran must have left its mark (CANCELLED / refunded / released).
            if recorded && !business {
                let exempt = what == "action"
                    && svc == "order"
                    && step == APPROVE
                    && order_status == Some("CANCELLED");
                if !exempt {
                    f.add(
                        "barrier_matches_business",
                        format!("recorded success at {svc} step {step} ({what}) left no {name}"),
                        id,
                    );
                }
            }
        }
    }

    // money_conserved / stock_conserved, per key (so a double charge shows on its customer).
    let mut taken: BTreeMap<&str, i64> = BTreeMap::new();
    for p in snap.payments.iter().filter(|p| !p.refunded) {
        *taken.entry(p.customer_id.as_str()).or_insert(0) += p.amount_cents;
    }
    let customers: BTreeSet<&str> = seed
        .customers
        .keys()
        .chain(snap.accounts.keys())
        .map(String::as_str)
        .collect();
    for c in customers {
        let opening = seed.customers.get(c).copied().unwrap_or(0);
        let now = snap.accounts.get(c).copied().unwrap_or(0);
        let t = taken.get(c).copied().unwrap_or(0);
        if now + t != opening {
            f.add(
                "money_conserved",
                format!(
                    "{c}: balance {now} + charged {t} != seed {opening} (off by {})",
                    now + t - opening
                ),
                c,
            );
        }
    }
    let mut reserved: BTreeMap<&str, i64> = BTreeMap::new();
    for r in snap.reservations.iter().filter(|r| !r.released) {
        *reserved.entry(r.sku.as_str()).or_insert(0) += r.quantity;
    }
    let skus: BTreeSet<&str> = seed
        .stock
        .keys()
        .chain(snap.stock.keys())
        .map(String::as_str)
        .collect();
    for k in skus {
        let opening = seed.stock.get(k).copied().unwrap_or(0);
        let now = snap.stock.get(k).copied().unwrap_or(0);
        let r = reserved.get(k).copied().unwrap_or(0);
        if now + r != opening {
            f.add(
                "stock_conserved",
                format!(
                    "{k}: stock {now} + reserved {r} != seed {opening} (off by {})",
                    now + r - opening
                ),
                k,
            );
        }
    }
    (f.into_vec(), stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        collect::{OrderRow, PaymentRow, ReservationRow},
        plan::Item,
    };
    use serde_json::json;

    fn seed() -> SeedData {
        SeedData {
            customers: [("c-1".to_string(), 10_000), ("c-poor".to_string(), 500)].into(),
            stock: [("sku-1".to_string(), 100)].into(),
        }
    }

    fn saga(id: &str, category: Category, customer: &str) -> Saga {
        Saga {
            id: id.into(),
            category,
            customer: customer.into(),
            items: vec![Item {
                sku: "sku-1".into(),
                quantity: 2,
                unit_price_cents: 1000,
            }],
        }
    }

    fn b(svc: &str, id: &str, step: u32, op: &str, outcome: &str, at: u64) -> BarrierRow {
        BarrierRow {
            service: svc.into(),
            saga_id: id.into(),
            step,
            op: op.into(),
            action: "x".into(),
            attempt: 1,
            outcome: outcome.into(),
            recorded_at_ms: at,
        }
    }

    fn state(status: &str, steps: &[(&str, &str, u32)]) -> Value {
        json!({
            "status": status,
            "steps": steps.iter().map(|(svc, st, attempts)| json!({
                "service": svc, "status": st, "attempts": attempts, "compensation_attempts": 0
            })).collect::<Vec<_>>()
        })
    }

    /// One completed saga (o-1), one compensated at payment (p-1, poor), one stuck (stuck-1):
    /// a consistent world.
    fn world() -> (Vec<Saga>, Snapshot) {
        let sagas = vec![
            saga("o-1", Category::Ok, "c-1"),
            saga("p-1", Category::Poor, "c-poor"),
            saga("stuck-1", Category::Stuck, "c-poor"),
        ];
        let mut snap = Snapshot::default();
        let s = "succeeded";
        snap.states.insert(
            "o-1".into(),
            state(
                "completed",
                &[
                    ("order", s, 1),
                    ("payment", s, 1),
                    ("inventory", s, 1),
                    ("order", s, 1),
                ],
            ),
        );
        snap.states.insert(
            "p-1".into(),
            state(
                "compensated",
                &[
                    ("order", "compensated", 1),
                    ("payment", "compensated", 1),
                    ("inventory", "pending", 0),
                    ("order", "pending", 0),
                ],
            ),
        );
        snap.states.insert(
            "stuck-1".into(),
            state(
                "stuck",
                &[
                    ("order", s, 1),
                    ("payment", "compensating", 1),
                    ("inventory", "pending", 0),
                    ("order", "pending", 0),
                ],
            ),
        );
        snap.accounts = [("c-1".to_string(), 8_000), ("c-poor".to_string(), 500)].into();
        snap.stock = [("sku-1".to_string(), 98)].into();
        snap.payments = vec![PaymentRow {
            saga_id: "o-1".into(),
            step: 1,
            customer_id: "c-1".into(),
            amount_cents: 2000,
            refunded: false,
        }];
        snap.reservations = vec![ReservationRow {
            saga_id: "o-1".into(),
            step: 2,
            sku: "sku-1".into(),
            quantity: 2,
            released: false,
        }];
        let order = |id: &str, status: &str| OrderRow {
            order_id: id.into(),
            saga_id: id.into(),
            customer_id: if id == "o-1" { "c-1" } else { "c-poor" }.into(),
            amount_cents: 2000,
            status: status.into(),
        };
        snap.orders = vec![
            order("o-1", "APPROVED"),
            order("p-1", "CANCELLED"),
            order("stuck-1", "PENDING"),
        ];
        snap.barrier = vec![
            b("order", "o-1", 0, "action", "success", 1),
            b("payment", "o-1", 1, "action", "success", 2),
            b("inventory", "o-1", 2, "action", "success", 3),
            b("order", "o-1", 3, "action", "success", 4),
            b("order", "p-1", 0, "action", "success", 1),
            b("payment", "p-1", 1, "action", "business_failure", 2),
            b("payment", "p-1", 1, "compensation", "success", 3),
            b("order", "p-1", 0, "compensation", "success", 4),
            b("order", "stuck-1", 0, "action", "success", 1),
            b("payment", "stuck-1", 1, "action", "business_failure", 2),
        ];
        (sagas, snap)
    }

    fn invariants(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_consistent_world_passes() {
        let (sagas, snap) = world();
        let (v, stats) = check(&seed(), &sagas, &snap, false);
        assert!(v.is_empty(), "{v:#?}");
        assert_eq!(stats.by_status["completed"], 1);
        assert_eq!(stats.by_status["stuck"], 1);
    }

    #[test]
    fn a_double_charge_breaks_money() {
        let (sagas, mut snap) = world();
        *snap.accounts.get_mut("c-1").unwrap() -= 2000;
        let (v, _) = check(&seed(), &sagas, &snap, false);
        assert_eq!(invariants(&v), ["money_conserved"], "{v:#?}");
        assert_eq!(v[0].sagas, ["c-1"]);
    }

    #[test]
    fn a_compensated_saga_left_charged_is_caught_with_its_id() {
        let (sagas, mut snap) = world();
        snap.payments[0].refunded = true;
        *snap.accounts.get_mut("c-1").unwrap() += 2000;
        let (v, _) = check(&seed(), &sagas, &snap, false);
        // The completed saga is no longer charged; its refund has no recorded compensation.
        assert!(invariants(&v).contains(&"money_per_saga"), "{v:#?}");
        assert!(
            invariants(&v).contains(&"barrier_matches_business"),
            "{v:#?}"
        );
        assert!(v.iter().all(|x| x.sagas == ["o-1"]), "{v:#?}");
    }

    #[test]
    fn a_hanging_action_that_ran_is_caught() {
        let (sagas, mut snap) = world();
        // p-1's payment action recorded after its compensation.
        snap.barrier[5].recorded_at_ms = 10;
        let (v, _) = check(&seed(), &sagas, &snap, false);
        assert_eq!(invariants(&v), ["no_hanging_action"], "{v:#?}");
        assert_eq!(v[0].sagas, ["p-1"]);
        // An aborted one is the barrier doing its job.
        snap.barrier[5].outcome = "aborted".into();
        let (v, stats) = check(&seed(), &sagas, &snap, false);
        assert!(v.is_empty(), "{v:#?}");
        assert_eq!(stats.hanging_actions_blocked, 1);
    }

    #[test]
    fn stuck_only_where_injected_and_poor_never_completes() {
        let (sagas, mut snap) = world();
        snap.states.get_mut("stuck-1").unwrap()["status"] = json!("compensating");
        snap.states.get_mut("p-1").unwrap()["status"] = json!("stuck");
        let (v, _) = check(&seed(), &sagas, &snap, false);
        let t: Vec<_> = v.iter().filter(|v| v.invariant == "terminal").collect();
        assert_eq!(t.len(), 2, "{v:#?}");
        let (sagas, mut snap) = world();
        snap.states.get_mut("p-1").unwrap()["status"] = json!("completed");
        let (v, _) = check(&seed(), &sagas, &snap, false);
        assert!(invariants(&v).contains(&"outcome_allowed"), "{v:#?}");
    }

    #[test]
    fn after_an_operator_retry_stuck_sagas_must_be_compensated() {
        let (sagas, mut snap) = world();
        let (v, _) = check(&seed(), &sagas, &snap, true);
        assert_eq!(invariants(&v), ["terminal"], "{v:#?}");
        assert_eq!(v[0].sagas, ["stuck-1"]);
        // Retried: the refund was a no-op (the deduct had failed), the cancel ran.
        let st = snap.states.get_mut("stuck-1").unwrap();
        st["status"] = json!("compensated");
        st["steps"][0]["status"] = json!("compensated");
        st["steps"][1]["status"] = json!("compensated");
        snap.orders[2].status = "CANCELLED".into();
        snap.barrier
            .push(b("payment", "stuck-1", 1, "compensation", "success", 5));
        snap.barrier
            .push(b("order", "stuck-1", 0, "compensation", "success", 6));
        let (v, _) = check(&seed(), &sagas, &snap, true);
        assert!(v.is_empty(), "{v:#?}");
    }

    #[test]
    fn stock_and_order_status_mismatches_are_caught() {
        let (sagas, mut snap) = world();
        snap.stock.insert("sku-1".into(), 97);
        snap.orders[1].status = "PENDING".into();
        let (v, _) = check(&seed(), &sagas, &snap, false);
        let names = invariants(&v);
        assert!(names.contains(&"stock_conserved"), "{v:#?}");
        assert!(names.contains(&"order_matches_saga"), "{v:#?}");
    }
}
