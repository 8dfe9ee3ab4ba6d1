#!/usr/bin/env bash
# The full-length reliability runs behind RELIABILITY.md: SIGKILLs under load,
# two nodes on one database, three nodes in cluster mode (SIGKILL, SIGSTOP past
# the lease, graceful leave, deletes; every answer checked for linearizability),
# and PostgreSQL outages (fast and immediate shutdown) under load. Writes
# bench/results/reliability.jsonl, one JSON line per scenario; exits non-zero if
# any acknowledged command was lost or applied twice, or any answer was stale.
#
# Usage: bench/scripts/reliability.sh [DATABASE_URL]    (a database of its own: it is truncated)
#   The outage scenario stops and starts the local cluster with pg_ctlcluster (run as root).
#   env: SCALE (1; CI uses 0.1: the cluster scenario then runs one round of faults, 35-40 s in a dev build),
#        PROFILE (--release; CI uses --profile=dev), OUT (bench/results/reliability.jsonl)
set -euo pipefail
cd "$(dirname "$0")/../.."
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_reliability}}
scale=${SCALE:-1}
n() { python3 -c "print(max(1, int($1 * $scale)))"; }
profile=${PROFILE:---release}
out=${OUT:-bench/results/reliability.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"

cargo build $profile -p persist-durable-bench --bin reliability
bin=./target/$([ "$profile" = "--release" ] && echo release || echo debug)/reliability
"$bin" kill9 --database-url "$url" --kills "$(python3 -c "print(max(20, int(50 * $scale)))")" --commands "$(n 100000)" | tee -a "$out"
"$bin" two-nodes --database-url "$url" --commands "$(n 100000)" | tee -a "$out"
"$bin" cluster --database-url "$url" --rounds "$(n 4)" --calm-seconds "$(python3 -c "print(max(2, 8 * $scale))")" | tee -a "$out"
"$bin" outage --database-url "$url" --commands "$(n 40000)" --outage-seconds "$(python3 -c "print(max(2, 5 * $scale))")" | tee -a "$out"
echo "results: $out"
