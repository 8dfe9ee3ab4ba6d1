#!/usr/bin/env bash
# The HTTP path as users meet it: requests/s and latency of
# examples/http_service.rs (the library) against bench/src/bin/http_naive.rs
# (read-modify-write per request), both on the same PostgreSQL database,
# driven by wrk (Debian's package) with bench/scripts/http-load.lua, in one run.
#
# Usage: bench/scripts/bench-http.sh [DATABASE_URL]   (a database of its own: it is truncated)
#   env: DURATION (10s), CONNECTIONS (64), THREADS (2), ROUNDS (2), OUT (bench/results/http.jsonl),
#        LAYOUTS ("default"): thread layouts of the library's service, measured in turn each
#        round, separated by ';', each "default" or environment settings for
#        examples/http_service.rs, e.g. "default;ARBITERS=1 STORE_THREADS=1"
# Each line also has the service process's CPU time per request (user + system,
# from /proc) and its threads' context switches per request.
set -euo pipefail
cd "$(dirname "$0")/../.."
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-64}
threads=${THREADS:-2}
rounds=${ROUNDS:-2}
layouts=${LAYOUTS:-default}
out=${OUT:-bench/results/http.jsonl}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release --example http_service
cargo build --release -p persist-durable-bench --bin http_naive

binary() { # name -> path: the library's example, or the bench crate's baseline
  if [ "$1" = http_service ]; then echo ./target/release/examples/http_service; else echo "./target/release/$1"; fi
}
serve() { # name port layout -> pid
  local name=$1 port=$2 layout=$3 settings=()
  [ "$layout" = default ] || read -r -a settings <<<"$layout"
  env "${settings[@]}" RUST_LOG=warn DATABASE_URL="$url" BIND_ADDR="127.0.0.1:$port" \
    "$(binary "$name")" >"/tmp/bench-$name.log" 2>&1 &
  echo $!
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
context_switches() { cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'; }

measure() { # name port [layout]
  local name=$1 port=$2 layout=${3:-default} pid line ticks switches
  psql -q "$url" -c "TRUNCATE durable_state" 2>/dev/null || true
  pid=$(serve "$name" "$port" "$layout")
  for _ in $(seq 1 100); do
    curl -s -o /dev/null -X POST "http://127.0.0.1:$port/malls/m/users/warmup/commands" \
      -H 'content-type: application/json' -d '{"type":"user_login"}' && break
    sleep 0.1
  done
  ticks=$(cpu_ticks "$pid"); switches=$(context_switches "$pid")
  line=$(wrk -t"$threads" -c"$connections" -d"$duration" --latency -s bench/scripts/http-load.lua \
           "http://127.0.0.1:$port" | tail -n 1)
  ticks=$(( $(cpu_ticks "$pid") - ticks )); switches=$(( $(context_switches "$pid") - switches ))
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$line" "$name" "$connections" "$layout" "$ticks" "$(getconf CLK_TCK)" "$switches" <<'PY' | tee -a "$out"
import json, sys
d = json.loads(sys.argv[1])
d["service"], d["connections"], d["layout"] = sys.argv[2], int(sys.argv[3]), sys.argv[4]
requests = max(d["requests"], 1)
d["service_cpu_us_per_request"] = int(sys.argv[5]) / int(sys.argv[6]) * 1e6 / requests
d["context_switches_per_request"] = int(sys.argv[7]) / requests
print(json.dumps(d))
PY
}

IFS=';' read -r -a layout_list <<<"$layouts"
for _ in $(seq 1 "$rounds"); do
  for layout in "${layout_list[@]}"; do
    measure http_service 18081 "$layout"
  done
  measure http_naive 18082
done
