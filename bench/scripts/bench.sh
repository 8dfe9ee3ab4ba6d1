#!/usr/bin/env bash
# Every figure of BENCHMARKS.md, in one run on one machine: the library
# (actors), the naive service, PostgreSQL's own ceiling, latency at half the
# actors' peak, resident memory per user and bulk restore. Writes
# bench/results/results.jsonl (one JSON line per measurement) and bench/results/throughput.svg.
#
# Usage: bench/scripts/bench.sh [DATABASE_URL]     (a database of its own: it is truncated)
#   env: COMMANDS (1000000), NAIVE_COMMANDS (100000), SWEEP ("16 64 256 1024")
set -euo pipefail
cd "$(dirname "$0")/../.."
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
commands=${COMMANDS:-1000000}
naive_commands=${NAIVE_COMMANDS:-100000}
sweep=${SWEEP:-16 64 256 1024}
out=bench/results/results.jsonl
mkdir -p bench
: > "$out"

cargo build --release -p persist-durable-bench --bin loadtest
loadtest() { ./target/release/loadtest --database-url "$url" --truncate "$@" | tail -n 1 | tee -a "$out"; }
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())['$1'])"; }

echo "== PostgreSQL's ceiling (pgbench)"
bench/scripts/pg-ceiling.sh "$url" | tail -n 1 | tee -a "$out"

echo "== headline: uniform and skewed users"
peak=$(loadtest --commands "$commands" | field commands_per_sec)
loadtest --commands "$commands" --skew 1.0 >/dev/null
loadtest --mode naive --commands "$naive_commands" >/dev/null
loadtest --mode naive --commands "$naive_commands" --skew 1.0 >/dev/null

echo "== latency at half the actors' peak ($peak/s)"
half=$(python3 -c "print(round($peak / 2))")
loadtest --commands "$commands" --rate "$half" --concurrency 8192 >/dev/null
loadtest --commands "$commands" --rate "$half" --concurrency 8192 --arbiters 0 >/dev/null

echo "== throughput against concurrency"
for c in $sweep; do
  loadtest --commands $((commands / 4)) --concurrency "$c" >/dev/null
  loadtest --mode naive --commands $((naive_commands / 2)) --concurrency "$c" >/dev/null
done

echo "== the change feed's cost: the same load without and with it"
loadtest --commands $((commands / 2)) >/dev/null
loadtest --commands $((commands / 2)) --change-feed >/dev/null

echo "== footprint and restore"
./target/release/loadtest --mode resident --users 1000000 --concurrency 2048 | tail -n 1 | tee -a "$out"
loadtest --mode restore --users 100000 --concurrency 2048 >/dev/null

python3 bench/scripts/chart.py "$out" bench/results/throughput.svg
echo "results: $out, chart: bench/results/throughput.svg"
