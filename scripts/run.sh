#!/usr/bin/env bash
# Quick start: installs the pinned nats-server if missing, builds, starts nats-server with the
# repo's nats.conf, the orchestrator and the three services as separate processes, runs the demo,
# and keeps everything running until Ctrl-C, which stops every process it started.
#
#   scripts/run.sh                 # NATS on 127.0.0.1:4222, state under .run/
#   NATS_PORT=4333 scripts/run.sh  # another port
#   PROFILE=release scripts/run.sh # optimised build
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
port="${NATS_PORT:-4222}"
profile="${PROFILE:-debug}"
run_dir="$root/.run"
logs="$run_dir/logs"
seed="${JETSAGA_SEED:-$root/participants/seed/default.json}"

scripts/install-nats.sh
if [ "$profile" = release ]; then cargo build --release --workspace --bins; else cargo build --workspace --bins; fi
bin="$root/target/$profile"

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is taken (another nats-server?): stop it or set NATS_PORT" >&2
  exit 1
fi

mkdir -p "$logs"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping ${#pids[@]} processes..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped."
}
trap cleanup INT TERM EXIT

start() { # name, command...
  local name="$1"; shift
  "$@" >>"$logs/$name.log" 2>&1 &
  pids+=("$!")
  echo "started $name (pid $!, log .run/logs/$name.log)"
}

export NATS_URL="nats://127.0.0.1:$port"
# nats.conf has one user per process; their passwords come from the environment. Development
# values unless you set your own (the README's Security section lists the variables).
users="orchestrator order payment inventory admin client"
for u in $users; do
  var="JETSAGA_$(echo "$u" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  export "$var=${!var:-dev-$u}"
done
creds() { # user -> env assignments for a process connecting as that user
  local var="JETSAGA_$(echo "$1" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  echo "NATS_USER=$1 NATS_PASSWORD=${!var}"
}
start nats-server "$root/.venv/bin/nats-server" -c "$root/nats.conf" -p "$port" -sd "$run_dir/nats"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
# shellcheck disable=SC2046 # creds prints assignments meant to be split
start orchestrator env $(creds orchestrator) "$bin/jetsaga-orchestrator"
for svc in order payment inventory; do
  # shellcheck disable=SC2046
  start "$svc" env $(creds "$svc") JETSAGA_DB="$run_dir/$svc.sqlite" JETSAGA_SEED="$seed" "$bin/jetsaga-$svc"
done

# The CLI is an operator: the admin user.
export NATS_USER=admin NATS_PASSWORD="$JETSAGA_ADMIN_PASSWORD"
"$bin/jetsaga" demo
cat <<MSG

jetsaga is running on $NATS_URL (users and dev passwords: README, Security). Try:
  export NATS_URL=$NATS_URL NATS_USER=admin NATS_PASSWORD=$JETSAGA_ADMIN_PASSWORD
  $bin/jetsaga submit --wait '{"order_id":"o-1001","customer_id":"c-1","items":[{"sku":"sku-1","quantity":2,"unit_price_cents":1250}]}'
  $bin/jetsaga show o-1001
  nats --user admin --password $JETSAGA_ADMIN_PASSWORD kv get sagas o-1001   # with the nats CLI
Press Ctrl-C to stop everything.
MSG
wait
