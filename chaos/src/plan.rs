//! The seeded plan of a chaos run: the seed data, every saga (its id, category, customer, items)
//! and every fault (kind, target, when, for how long). Everything random in a run comes from here,
//! from one printed seed, so a failing run can be replayed with `--seed`.

use std::{collections::BTreeMap, time::Duration};

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde_json::{json, Value};

pub const SERVICES: [&str; 3] = ["order", "payment", "inventory"];
/// Orchestrator processes sharing the durable consumers.
pub const ORCHESTRATORS: usize = 2;

/// Saga-id prefix whose compensations every participant fails (they must end `stuck`).
pub const STUCK_PREFIX: &str = "stuck-";
/// Saga-id prefix whose actions fail on their first attempt (they must retry).
pub const FLAKY_PREFIX: &str = "flaky-";

const RICH: usize = 8;
const RICH_BALANCE: i64 = 1_000_000_000_000;
const MID: usize = 2;
const MID_BALANCE: i64 = 200_000;
const POOR: usize = 2;
const POOR_BALANCE: i64 = 500;
const SKUS: usize = 8;
const SKU_STOCK: i64 = 1_000_000_000;
const LIMITED_SKU: &str = "sku-lim";
const LIMITED_STOCK: i64 = 60;
/// Nobody can ever get 4 of these: stock-short orders ask for 4..=9.
const RARE_SKU: &str = "sku-rare";
const RARE_STOCK: i64 = 3;

/// What a saga is meant to exercise, and so what outcomes are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Rich customer, plentiful stock: completes unless a fault (a timeout) makes it compensate.
    Ok,
    /// Balance too low: must compensate (never complete).
    Poor,
    /// Stock short: must compensate (never complete).
    Short,
    /// Limited balance and stock shared by many sagas: either outcome, but conserved.
    Contended,
    /// First attempt of every action fails: completes with retries, or compensates.
    Flaky,
    /// Compensation keeps failing: must end `stuck`.
    Stuck,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::Ok,
        Category::Poor,
        Category::Short,
        Category::Contended,
        Category::Flaky,
        Category::Stuck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Ok => "ok",
            Category::Poor => "poor",
            Category::Short => "short",
            Category::Contended => "contended",
            Category::Flaky => "flaky",
            Category::Stuck => "stuck",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Category::Ok => "ok-",
            Category::Poor => "poor-",
            Category::Short => "short-",
            Category::Contended => "cont-",
            Category::Flaky => FLAKY_PREFIX,
            Category::Stuck => STUCK_PREFIX,
        }
    }
}

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// One planned saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    pub id: String,
    pub category: Category,
    pub customer: String,
    pub items: Vec<Item>,
}

impl Saga {
    pub fn amount(&self) -> i64 {
        self.items
            .iter()
            .map(|i| i.quantity * i.unit_price_cents)
            .sum()
    }

    /// The `orders.create` request body.
    pub fn request(&self) -> Value {
        json!({
            "order_id": self.id,
            "customer_id": self.customer,
            "items": self.items.iter().map(|i| json!({
                "sku": i.sku, "quantity": i.quantity, "unit_price_cents": i.unit_price_cents
            })).collect::<Vec<_>>(),
        })
    }

    /// Units per SKU this saga takes when it completes (lines of one SKU add up).
    pub fn units(&self) -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for i in &self.items {
            *m.entry(i.sku.clone()).or_insert(0) += i.quantity;
        }
        m
    }
}

/// Opening balances and stock, as the services' seed file has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedData {
    pub customers: BTreeMap<String, i64>,
    pub stock: BTreeMap<String, i64>,
}

impl SeedData {
    pub fn standard() -> Self {
        let mut customers = BTreeMap::new();
        for i in 0..RICH {
            customers.insert(format!("c-rich-{i}"), RICH_BALANCE);
        }
        for i in 0..MID {
            customers.insert(format!("c-mid-{i}"), MID_BALANCE);
        }
        for i in 0..POOR {
            customers.insert(format!("c-poor-{i}"), POOR_BALANCE);
        }
        let mut stock = BTreeMap::new();
        for i in 0..SKUS {
            stock.insert(format!("sku-{i}"), SKU_STOCK);
        }
        stock.insert(LIMITED_SKU.into(), LIMITED_STOCK);
        stock.insert(RARE_SKU.into(), RARE_STOCK);
        SeedData { customers, stock }
    }

    pub fn to_json(&self) -> Value {
        json!({ "customers": self.customers, "stock": self.stock })
    }
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL orchestrator `i`, restart it after `down`.
    KillOrchestrator { index: usize, down: Duration },
    /// SIGKILL a service, restart it after `down`.
    KillService {
        service: &'static str,
        down: Duration,
    },
    /// SIGKILL nats-server (single) or cluster node `node`, restart it on the same store and
    /// ports after `down`.
    KillNats { node: usize, down: Duration },
    /// Republish a share of the commands under new message ids, some of them late, for `window`.
    Duplicates { window: Duration, percent: u32 },
    /// Restart a service with a per-batch delay above the step timeout for `window`, then
    /// restart it healthy.
    Slow {
        service: &'static str,
        window: Duration,
    },
    /// Restart a service answering `retryable_failure` to a share of actions for `window`
    /// (it heals by itself: `JETSAGA_FAULT_RETRYABLE_FOR_MS`).
    Flaky {
        service: &'static str,
        window: Duration,
    },
}

impl FaultKind {
    pub const KINDS: [&'static str; 6] = [
        "kill_orchestrator",
        "kill_service",
        "kill_nats",
        "duplicate_commands",
        "slow_service",
        "flaky_service",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            FaultKind::KillOrchestrator { .. } => "kill_orchestrator",
            FaultKind::KillService { .. } => "kill_service",
            FaultKind::KillNats { .. } => "kill_nats",
            FaultKind::Duplicates { .. } => "duplicate_commands",
            FaultKind::Slow { .. } => "slow_service",
            FaultKind::Flaky { .. } => "flaky_service",
        }
    }

    /// Roughly how long the fault lasts (for pacing the load over the fault phase).
    pub fn duration(&self) -> Duration {
        match self {
            FaultKind::KillOrchestrator { down, .. }
            | FaultKind::KillService { down, .. }
            | FaultKind::KillNats { down, .. } => *down + Duration::from_millis(500),
            FaultKind::Duplicates { window, .. }
            | FaultKind::Slow { window, .. }
            | FaultKind::Flaky { window, .. } => *window,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FaultKind::KillOrchestrator { index, down } => {
                format!("SIGKILL orchestrator-{index}, restart after {down:?}")
            }
            FaultKind::KillService { service, down } => {
                format!("SIGKILL {service}, restart after {down:?}")
            }
            FaultKind::KillNats { node, down } => {
                format!("SIGKILL nats node {node}, restart after {down:?}")
            }
            FaultKind::Duplicates { window, percent } => {
                format!("duplicate {percent}% of commands for {window:?}")
            }
            FaultKind::Slow { service, window } => format!("slow {service} for {window:?}"),
            FaultKind::Flaky { service, window } => {
                format!("{service} answers retryable errors for {window:?}")
            }
        }
    }
}

/// A fault and the pause before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub gap_before: Duration,
    pub kind: FaultKind,
}

/// Everything a run will do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub seed_data: SeedData,
    pub sagas: Vec<Saga>,
    pub faults: Vec<Fault>,
}

impl Plan {
    /// The planned length of the fault phase.
    pub fn fault_phase(&self) -> Duration {
        self.faults
            .iter()
            .map(|f| f.gap_before + f.kind.duration())
            .sum()
    }
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo..=hi))
}

/// Builds the plan: `sagas` sagas in a fixed mix, `faults` faults cycling through every kind
/// (each round in a shuffled order) and, within a kind, through every target, so each
/// orchestrator, each service and each node is hit once before any is hit twice.
pub fn build(seed: u64, sagas: usize, faults: usize, nats_nodes: usize) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let seed_data = SeedData::standard();
    // Weights per category (percent). Stuck sagas are few: each holds its compensation budget.
    let mix = [
        (Category::Ok, 55),
        (Category::Poor, 10),
        (Category::Short, 10),
        (Category::Contended, 10),
        (Category::Flaky, 10),
        (Category::Stuck, 5),
    ];
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut planned = Vec::with_capacity(sagas);
    for n in 0..sagas {
        let mut pick = rng.gen_range(0..total);
        let mut category = Category::Ok;
        for (c, w) in mix {
            if pick < w {
                category = c;
                break;
            }
            pick -= w;
        }
        planned.push(saga(&mut rng, category, n));
    }

    let mut plan_faults = Vec::with_capacity(faults);
    let mut next_target = [0usize; 6];
    // Random starting targets, so different seeds hit different processes first.
    for t in &mut next_target {
        *t = rng.gen_range(0..6);
    }
    let mut round: Vec<usize> = Vec::new();
    while plan_faults.len() < faults {
        if round.is_empty() {
            round = (0..6).collect();
            round.shuffle(&mut rng);
        }
        let k = round.pop().expect("non-empty round");
        let t = next_target[k];
        next_target[k] += 1;
        let svc = SERVICES[t % SERVICES.len()];
        let kind = match k {
            0 => FaultKind::KillOrchestrator {
                index: t % ORCHESTRATORS,
                down: ms(&mut rng, 100, 1500),
            },
            1 => FaultKind::KillService {
                service: svc,
                down: ms(&mut rng, 100, 1500),
            },
            2 => FaultKind::KillNats {
                node: t % nats_nodes.max(1),
                down: ms(&mut rng, 300, 2500),
            },
            3 => FaultKind::Duplicates {
                window: ms(&mut rng, 2000, 4000),
                percent: rng.gen_range(20..=50),
            },
            4 => FaultKind::Slow {
                service: svc,
                window: ms(&mut rng, 3000, 5000),
            },
            _ => FaultKind::Flaky {
                service: svc,
                window: ms(&mut rng, 2000, 4000),
            },
        };
        plan_faults.push(Fault {
            gap_before: ms(&mut rng, 300, 1500),
            kind,
        });
    }
    Plan {
        seed,
        seed_data,
        sagas: planned,
        faults: plan_faults,
    }
}

fn saga(rng: &mut StdRng, category: Category, n: usize) -> Saga {
    let rich = |rng: &mut StdRng| format!("c-rich-{}", rng.gen_range(0..RICH));
    let plenty = |rng: &mut StdRng, lines: usize| -> Vec<Item> {
        (0..lines)
            .map(|_| Item {
                sku: format!("sku-{}", rng.gen_range(0..SKUS)),
                quantity: rng.gen_range(1..=5),
                unit_price_cents: rng.gen_range(100..=5000),
            })
            .collect()
    };
    let lines = rng.gen_range(1..=3);
    let (customer, items) = match category {
        Category::Ok | Category::Flaky => (rich(rng), plenty(rng, lines)),
        // Poor customers have 500 cents; every poor order costs at least 1000.
        Category::Poor | Category::Stuck => (
            format!("c-poor-{}", rng.gen_range(0..POOR)),
            (0..lines)
                .map(|_| Item {
                    sku: format!("sku-{}", rng.gen_range(0..SKUS)),
                    quantity: rng.gen_range(1..=3),
                    unit_price_cents: rng.gen_range(1000..=9000),
                })
                .collect(),
        ),
        Category::Short => {
            let mut items = plenty(rng, lines - 1);
            items.push(Item {
                sku: RARE_SKU.into(),
                quantity: rng.gen_range(RARE_STOCK + 1..=9),
                unit_price_cents: rng.gen_range(100..=900),
            });
            (rich(rng), items)
        }
        Category::Contended => {
            let customer = if rng.gen_bool(0.5) {
                format!("c-mid-{}", rng.gen_range(0..MID))
            } else {
                rich(rng)
            };
            let mut items = vec![Item {
                sku: LIMITED_SKU.into(),
                quantity: rng.gen_range(1..=3),
                unit_price_cents: rng.gen_range(1000..=8000),
            }];
            items.extend(plenty(rng, lines - 1));
            (customer, items)
        }
    };
    Saga {
        id: format!("{}{n:06}", category.prefix()),
        category,
        customer,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let a = build(7, 500, 24, 3);
        let b = build(7, 500, 24, 3);
        assert_eq!(a.sagas, b.sagas);
        assert_eq!(a.faults, b.faults);
        assert_ne!(build(8, 500, 24, 3).sagas, a.sagas);
    }

    #[test]
    fn every_kind_and_every_target_is_hit() {
        let p = build(1, 1000, 24, 3);
        assert_eq!(p.faults.len(), 24);
        for kind in FaultKind::KINDS {
            let n = p.faults.iter().filter(|f| f.kind.kind() == kind).count();
            assert_eq!(n, 4, "{kind}");
        }
        let mut orchestrators = std::collections::BTreeSet::new();
        let mut services = std::collections::BTreeSet::new();
        for f in &p.faults {
            match &f.kind {
                FaultKind::KillOrchestrator { index, .. } => {
                    orchestrators.insert(*index);
                }
                FaultKind::KillService { service, .. } => {
                    services.insert(*service);
                }
                _ => {}
            }
        }
        assert_eq!(orchestrators.len(), ORCHESTRATORS);
        assert_eq!(services.len(), 3);
        for c in Category::ALL {
            assert!(p.sagas.iter().any(|s| s.category == c), "{c:?}");
        }
    }

    #[test]
    fn categories_are_what_they_claim() {
        let p = build(3, 2000, 0, 1);
        let seed = &p.seed_data;
        for s in &p.sagas {
            let balance = seed.customers[&s.customer];
            match s.category {
                Category::Poor | Category::Stuck => assert!(s.amount() > balance, "{s:?}"),
                Category::Short => {
                    assert!(s.units()[RARE_SKU] > seed.stock[RARE_SKU], "{s:?}")
                }
                Category::Ok | Category::Flaky => {
                    assert!(s.amount() * 2000 < balance);
                    assert!(!s.units().contains_key(RARE_SKU));
                }
                Category::Contended => assert!(s.units().contains_key(LIMITED_SKU)),
            }
            assert!(s.id.starts_with(s.category.prefix()));
            jetsaga_common::ids::validate(&s.id).unwrap();
        }
    }
}
