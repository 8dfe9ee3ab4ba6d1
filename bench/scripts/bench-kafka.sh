#!/usr/bin/env bash
# Records per second from a Kafka topic to committed state, in one run:
# the library's ingest (KafkaIngest into UserStates) against a naive consumer
# (per record: read-modify-write in one transaction, then a synchronous
# offset commit), alternated, each round reading the same topic from the start
# in a consumer group of its own into a fresh PostgreSQL database.
#
# Usage: bench/scripts/bench-kafka.sh [ADMIN_DATABASE_URL]
#   env: RECORDS (100000), NAIVE_RECORDS (5000: the naive consumer reads the
#        first ones only, or a round would take minutes), USERS (10000),
#        ROUNDS (2), PORT (19192), OUT (bench/results/kafka.jsonl)
# Needs tansu (cargo install tansu --locked --features dynostore).
set -euo pipefail
cd "$(dirname "$0")/../.."
admin=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
records=${RECORDS:-100000}
naive_records=${NAIVE_RECORDS:-5000}
users=${USERS:-10000}
rounds=${ROUNDS:-2}
port=${PORT:-19192}
out=${OUT:-bench/results/kafka.jsonl}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release -p persist-durable-bench --features kafka --bin kafka_load
load=./target/release/kafka_load

tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > /tmp/bench-tansu.log 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
tansu topic create --broker "tcp://127.0.0.1:$port" --partitions 4 user-events
"$load" --mode produce --brokers "127.0.0.1:$port" --records "$records" --users "$users"

base=${admin%/*}
for round in $(seq 1 "$rounds"); do
  for mode in ingest naive; do
    db="persist_durable_bench_kafka_$mode"
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    n=$records; [ "$mode" = naive ] && n=$naive_records
    "$load" --mode "$mode" --brokers "127.0.0.1:$port" --records "$n" --group "$mode-$round-$$" \
      --database-url "$base/$db" | tail -n 1 | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rate = {m: statistics.median(r["records_per_s"] for r in rows if r["mode"] == m) for m in ("ingest", "naive")}
cpu = {m: statistics.median(r["cpu_us_per_record"] for r in rows if r["mode"] == m) for m in ("ingest", "naive")}
print(json.dumps({"ingest_records_per_s": rate["ingest"], "naive_records_per_s": rate["naive"],
                  "ratio": round(rate["ingest"] / rate["naive"], 1),
                  "ingest_cpu_us_per_record": cpu["ingest"], "naive_cpu_us_per_record": cpu["naive"]}))
PY
