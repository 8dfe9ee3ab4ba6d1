#!/usr/bin/env bash
# Before and after in one session: the load generator of two commits,
# alternated round by round on the same database, so that the machine's
# drift hits both equally. The spread between rounds of one binary is the
# run-to-run noise the difference is held against.
#
# Usage: bench/scripts/bench-compare.sh BEFORE_BINARY AFTER_BINARY [DATABASE_URL]
#   env: ROUNDS (3), COMMANDS (300000), NAIVE_COMMANDS (30000), OUT (bench/results/compare.jsonl),
#        BEFORE_DATABASE_URL (DATABASE_URL): a database of its own for a commit
#        whose schema differs (both are truncated)
# Build the binaries with `cargo build --release -p persist-durable-bench --bin loadtest` in a
# worktree of each commit (`git worktree add ../before <commit>`).
set -euo pipefail
cd "$(dirname "$0")/../.."
before=$1
after=$2
url=${3:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
rounds=${ROUNDS:-3}
commands=${COMMANDS:-300000}
naive_commands=${NAIVE_COMMANDS:-30000}
before_url=${BEFORE_DATABASE_URL:-$url}
out=${OUT:-bench/results/compare.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"

run() { # label binary args...
  local label=$1 binary=$2 database=$url
  shift 2
  [ "$label" = before ] && database=$before_url
  "$binary" --database-url "$database" --truncate "$@" | tail -n 1 \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['build']='$label'; print(json.dumps(d))" \
    | tee -a "$out"
}

for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for label in before after; do
    binary=$before
    [ "$label" = after ] && binary=$after
    run "$label" "$binary" --commands "$commands"
    run "$label" "$binary" --mode naive --commands "$naive_commands"
  done
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def cps(build, mode):
    return [r["commands_per_sec"] for r in rows if r["build"] == build and r["mode"] == mode]
print("| build | actors commands/s (each round) | naive commands/s | actors / naive (median) |")
print("| --- | --- | --- | --- |")
for build in ("before", "after"):
    a, n = cps(build, "actors"), cps(build, "naive")
    ratio = statistics.median(a) / statistics.median(n)
    print(f"| {build} | {', '.join(f'{x:,.0f}' for x in a)} | {', '.join(f'{x:,.0f}' for x in n)} | {ratio:.1f}x |")
for build in ("before", "after"):
    a = cps(build, "actors")
    print(f"{build}: actors median {statistics.median(a):,.0f}, spread {(max(a) - min(a)) / statistics.median(a):.1%}")
b, a = statistics.median(cps("before", "actors")), statistics.median(cps("after", "actors"))
print(f"after / before (actors, medians): {a / b:.3f}")
PY
