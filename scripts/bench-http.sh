#!/usr/bin/env bash
# The HTTP path as users meet it: requests/s and latency of
# examples/http_service.rs (the library) against examples/http_naive.rs
# (read-modify-write per request), both on the same PostgreSQL database,
# driven by wrk (Debian's package) with scripts/http-load.lua, in one run.
#
# Usage: scripts/bench-http.sh [DATABASE_URL]   (a database of its own: it is truncated)
#   env: DURATION (10s), CONNECTIONS (64), THREADS (2), ROUNDS (2), OUT (bench/http.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-64}
threads=${THREADS:-2}
rounds=${ROUNDS:-2}
out=${OUT:-bench/http.jsonl}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release --example http_service --example http_naive

serve() { # name port -> pid
  local name=$1 port=$2
  RUST_LOG=warn DATABASE_URL="$url" BIND_ADDR="127.0.0.1:$port" "./target/release/examples/$name" >"/tmp/bench-$name.log" 2>&1 &
  echo $!
}

measure() { # name port
  local name=$1 port=$2 pid line
  psql -q "$url" -c "TRUNCATE durable_state" 2>/dev/null || true
  pid=$(serve "$name" "$port")
  for _ in $(seq 1 100); do
    curl -s -o /dev/null -X POST "http://127.0.0.1:$port/malls/m/users/warmup/commands" \
      -H 'content-type: application/json' -d '{"type":"user_login"}' && break
    sleep 0.1
  done
  line=$(wrk -t"$threads" -c"$connections" -d"$duration" --latency -s scripts/http-load.lua \
           "http://127.0.0.1:$port" | tail -n 1)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['service']=sys.argv[2]; d['connections']=int(sys.argv[3]); print(json.dumps(d))" \
    "$line" "$name" "$connections" | tee -a "$out"
}

for _ in $(seq 1 "$rounds"); do
  measure http_service 18081
  measure http_naive 18082
done
