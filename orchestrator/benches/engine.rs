//! Criterion micro-benchmark of the pure saga engine: how many transitions per second the engine
//! computes with no NATS in the way, for the built-in 4-step order saga — a saga that completes
//! (start + 4 action replies) and one that compensates (payment refused: refund, then cancel) —
//! and the same sagas with the CPU work the driver adds per input (state JSON in and out, the
//! effects and their JSON), which bounds what one core can do before any I/O.
//!
//! Run: `cargo bench -p jetsaga-orchestrator --bench engine` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jetsaga_common::protocol::{Op, Outcome, Reply};
use jetsaga_orchestrator::{
    definition::Definition,
    engine::{self, Input, Transition},
    state::SagaState,
};
use serde_json::{json, Value};

const NOW: u64 = 1_764_000_000_000;

fn input() -> Value {
    json!({"order_id": "o-123456", "customer_id": "c-1",
           "items": [{"sku": "sku-1", "quantity": 2, "unit_price_cents": 1250}],
           "amount_cents": 2500})
}

fn reply(step: u32, op: Op, outcome: Outcome) -> Input {
    let service = ["order", "payment", "inventory", "order"][step as usize];
    let output = (step == 1 && op == Op::Action && outcome == Outcome::Success)
        .then(|| json!({"customer_id": "c-1", "amount_cents": 2500, "balance_cents": 997_500}));
    let error = (outcome == Outcome::BusinessFailure)
        .then(|| "insufficient balance: 500 < 2500".to_string());
    Input::Reply(Reply {
        saga_id: "o-123456".into(),
        step,
        op,
        attempt: 1,
        service: service.into(),
        outcome,
        error,
        output,
    })
}

/// The replies that take a saga from start to its end.
fn success_path() -> Vec<Input> {
    (0..4)
        .map(|s| reply(s, Op::Action, Outcome::Success))
        .collect()
}

/// Payment refused: the failed step is compensated (a null compensation), then the order.
fn compensation_path() -> Vec<Input> {
    vec![
        reply(0, Op::Action, Outcome::Success),
        reply(1, Op::Action, Outcome::BusinessFailure),
        reply(1, Op::Compensation, Outcome::Success),
        reply(0, Op::Compensation, Outcome::Success),
    ]
}

/// Pure engine: start, then apply every input; returns the final state.
fn run_pure(def: &Definition, path: &[Input]) -> SagaState {
    let mut s = engine::start(def, "o-123456", input(), 1, NOW);
    for (k, inp) in path.iter().enumerate() {
        let id = inp.id(0);
        match engine::apply(def, &s, inp, &id, NOW + k as u64 + 1) {
            Transition::Applied(next) => s = *next,
            Transition::Ignored(why) => panic!("input {k} ignored: {why}"),
        }
    }
    s
}

/// What the driver does on the CPU per input besides the engine: parse the stored state, apply,
/// serialise the new state, derive the effects and serialise each one.
fn run_with_json(def: &Definition, path: &[Input]) -> usize {
    let first = engine::start(def, "o-123456", input(), 1, NOW);
    let mut bytes = serde_json::to_vec(&first).unwrap();
    let mut written = bytes.len() + effects_json(&first);
    for (k, inp) in path.iter().enumerate() {
        let state: SagaState = serde_json::from_slice(&bytes).unwrap();
        let id = inp.id(0);
        let Transition::Applied(next) = engine::apply(def, &state, inp, &id, NOW + k as u64 + 1)
        else {
            panic!("input {k} ignored");
        };
        bytes = serde_json::to_vec(&*next).unwrap();
        written += bytes.len() + effects_json(&next);
    }
    written
}

fn effects_json(s: &SagaState) -> usize {
    let fx = engine::effects(s);
    let mut n = 0;
    for c in &fx.commands {
        n += serde_json::to_vec(c).unwrap().len() + c.msg_id().len() + c.subject().len();
    }
    for t in &fx.timers {
        n += serde_json::to_vec(t).unwrap().len() + t.msg_id().len() + t.subject().len();
    }
    for e in &fx.events {
        n += serde_json::to_vec(&e.payload).unwrap().len();
    }
    n
}

fn bench(c: &mut Criterion) {
    let def = Definition::builtin_order();
    let success = success_path();
    let compensation = compensation_path();
    assert!(run_pure(&def, &success).status.is_terminal());
    assert!(run_pure(&def, &compensation).status.is_terminal());

    let mut g = c.benchmark_group("engine");
    // One start plus four replies: five transitions per saga.
    g.throughput(Throughput::Elements(5));
    g.bench_function("success_saga", |b| {
        b.iter(|| black_box(run_pure(&def, black_box(&success))))
    });
    g.bench_function("compensation_saga", |b| {
        b.iter(|| black_box(run_pure(&def, black_box(&compensation))))
    });
    g.bench_function("success_saga_with_json", |b| {
        b.iter(|| black_box(run_with_json(&def, black_box(&success))))
    });
    g.bench_function("compensation_saga_with_json", |b| {
        b.iter(|| black_box(run_with_json(&def, black_box(&compensation))))
    });
    g.finish();

    // Single operations on a saga in the middle of its run.
    let mid = run_pure(&def, &success[..2]);
    let next = reply(2, Op::Action, Outcome::Success);
    let next_id = next.id(0);
    let mid_json = serde_json::to_vec(&mid).unwrap();
    let mut g = c.benchmark_group("engine_op");
    g.throughput(Throughput::Elements(1));
    g.bench_function("apply", |b| {
        b.iter(|| {
            black_box(engine::apply(
                &def,
                black_box(&mid),
                &next,
                &next_id,
                NOW + 9,
            ))
        })
    });
    g.bench_function("effects", |b| {
        b.iter(|| black_box(engine::effects(black_box(&mid))))
    });
    g.bench_function("state_from_json", |b| {
        b.iter(|| black_box(serde_json::from_slice::<SagaState>(black_box(&mid_json)).unwrap()))
    });
    g.bench_function("state_to_json", |b| {
        b.iter_batched(
            || mid.clone(),
            |s| black_box(serde_json::to_vec(&s).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
