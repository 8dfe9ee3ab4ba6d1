#!/usr/bin/env bash
# What cluster mode costs and recovers (issue 28), in one run on one machine:
#  1. one node, the load generator's mix, alternated ROUNDS times: the default mode (every
#     unwritten answer checked), the exclusive writer (no check, no fence), cluster mode
#     (every write fenced, reads from memory under the lease); with the lease's renewals/s;
#  2. forwarding: examples/http_service.rs in cluster mode, driven by wrk through node a,
#     first alone (every user local), then beside node b (about half the users forwarded
#     to b over HTTP): requests/s, latency and the service's CPU per request.
# Writes bench/results/cluster.jsonl.
#
# Usage: bench/scripts/bench-cluster.sh [DATABASE_URL]   (a database of its own: it is truncated)
#   env: COMMANDS (300000), ROUNDS (3), DURATION (10s), CONNECTIONS (64), OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
commands=${COMMANDS:-300000}
rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-64}
out=${OUT:-bench/results/cluster.jsonl}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release -p persist-durable-bench --bin loadtest
cargo build --release --example http_service

echo "== one node: default, exclusive writer, cluster mode (alternated, $rounds rounds)"
for round in $(seq 1 "$rounds"); do
  for mode in default exclusive cluster; do
    case $mode in
      default) flags=() ;;
      exclusive) flags=(--exclusive-writer) ;;
      cluster) flags=(--cluster) ;;
    esac
    ./target/release/loadtest --database-url "$url" --truncate --commands "$commands" "${flags[@]}" | tail -n 1 \
      | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['bench']='one-node'; d['mode_name']='$mode'; d['round']=$round; print(json.dumps(d))" \
      | tee -a "$out"
  done
done

echo "== forwarding: wrk through node a, alone and beside node b"
node() { # name port -> pid
  RUST_LOG=warn DATABASE_URL="$url" NODE_ID="$1" BIND_ADDR="127.0.0.1:$2" ./target/release/examples/http_service \
    >"/tmp/bench-cluster-$1.log" 2>&1 &
  echo $!
}
wait_up() { for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return; sleep 0.1; done; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # label pids...
  local label=$1 line before after pid
  shift
  before=0; for pid in "$@"; do before=$((before + $(cpu_ticks "$pid"))); done
  line=$(wrk -t2 -c"$connections" -d"$duration" --latency -s bench/scripts/http-load.lua http://127.0.0.1:18181 | tail -n 1)
  after=0; for pid in "$@"; do after=$((after + $(cpu_ticks "$pid"))); done
  python3 - "$line" "$label" "$((after - before))" "$(getconf CLK_TCK)" <<'PY' | tee -a "$out"
import json, sys
d = json.loads(sys.argv[1])
d["bench"], d["setup"] = "forwarding", sys.argv[2]
d["services_cpu_us_per_request"] = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / max(d["requests"], 1)
print(json.dumps(d))
PY
}
psql -q "$url" -c "TRUNCATE durable_state" -c "UPDATE cluster_slices SET owner = NULL" -c "DELETE FROM cluster_nodes" 2>/dev/null || true
a=$(node a 18181); wait_up 18181
measure "node a alone: every user local" "$a"
b=$(node b 18182); wait_up 18182
# b takes its share within a few renewal rounds.
sleep 5
measure "node a beside b: about half the users forwarded to b" "$a" "$b"
kill -TERM "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
echo "results: $out"
