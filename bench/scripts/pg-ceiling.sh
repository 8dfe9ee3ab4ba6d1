#!/usr/bin/env bash
# PostgreSQL's own ceiling for the library's write, measured with pgbench on
# the same database: once one row per transaction, once batched as the
# library batches. Ends with one JSON line:
#   {"single_row_rows_per_sec": ..., "batched_rows_per_sec": ..., ...}
#
# Usage: bench/scripts/pg-ceiling.sh [DATABASE_URL]
#   env: DURATION (s, 10), ROWS (100000), BATCH (rows per statement, 100),
#        SINGLE_CLIENTS (32), BATCH_CLIENTS (4)
#
# The write statement below is the library's PostgresStore::WRITE_SQL from
# "inserted AS" on, word for word with its constant binds written in (a test
# checks this). Only the input step
# differs: pgbench cannot remember revisions between transactions, so it
# reads each row's current revision inline; that is one index probe per row
# more than the library does, which makes this ceiling, if anything, low.
set -euo pipefail
url=${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/persist_durable_bench}}
duration=${DURATION:-10}
rows=${ROWS:-100000}
batch=${BATCH:-100}
single_clients=${SINGLE_CLIENTS:-32}
batch_clients=${BATCH_CLIENTS:-4}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

psql -q -v ON_ERROR_STOP=1 "$url" -f "$here/migrations/postgres/2026-11-20-000000_create_durable_state/up.sql"
psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
-- 2026-11-23-000000_schema_versions's column (that migration also alters the feed's table, absent here).
ALTER TABLE durable_state ADD COLUMN IF NOT EXISTS state_schema_version INTEGER NOT NULL DEFAULT 1;
-- 2026-12-08-000000_row_generations's column.
ALTER TABLE durable_state ADD COLUMN IF NOT EXISTS generation BIGINT NOT NULL DEFAULT 0;
-- 2026-12-09-000000_slices's column.
ALTER TABLE durable_state ADD COLUMN IF NOT EXISTS slice INTEGER;
-- 2026-12-10-000000_entity_timers's table (empty: the writes fire no timer).
CREATE TABLE IF NOT EXISTS entity_timers (
    persistence_id TEXT NOT NULL, name TEXT NOT NULL, entity_type TEXT NOT NULL, slice INTEGER NOT NULL,
    due TIMESTAMPTZ NOT NULL, schedule TEXT NOT NULL, command BYTEA NOT NULL, missed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (persistence_id, name)
);
TRUNCATE durable_state;
INSERT INTO durable_state
    (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload)
SELECT 'UserState|bench-' || g, 'UserState', 1, now(), 1, 'UserState/v1',
       convert_to('{"last_login":"2026-11-20T09:00:00Z","last_cart_use":null,"recent_products":["product0001","product0002","product0003"],"marketing_opt_in":true,"last_event_time":"2026-11-20T09:00:00Z"}', 'UTF8')
FROM generate_series(1, $rows) g;
VACUUM ANALYZE durable_state;
SQL

write_script() { # $1: rows per statement
  cat > "$work/write-$1.sql" <<SQL
\set span $rows / :clients
\set base :client_id * :span + random(0, :span - $1 - 1)
WITH input AS (
    SELECT d.persistence_id, d.revision AS expected, d.revision + 1 AS revision, d.state_payload AS payload,
           d.entity_type, d.state_ser_manifest AS manifest, d.state_schema_version AS schema_version, d.generation,
           d.slice, NULL::bigint AS fence_epoch, NULL::text AS fire_name, NULL::timestamptz AS fire_due
    FROM durable_state AS d
    WHERE d.persistence_id IN (SELECT 'UserState|bench-' || (:base + g) FROM generate_series(1, $1) AS g)
), admitted AS (
    SELECT * FROM input
), inserted AS (
    INSERT INTO durable_state
        (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload,
         state_schema_version, generation, slice)
    SELECT persistence_id, entity_type, revision, now(), 1, manifest, payload, schema_version, generation, slice
    FROM admitted WHERE expected = 0 AND fire_name IS NULL
    ORDER BY persistence_id COLLATE "C"
    ON CONFLICT (persistence_id) DO NOTHING
    RETURNING persistence_id
), locked AS (
    SELECT d.ctid AS row_id, i.persistence_id, i.expected, i.revision, i.payload, i.manifest, i.schema_version,
           i.slice, i.fire_name, i.fire_due
    FROM admitted AS i JOIN durable_state AS d ON d.persistence_id = i.persistence_id AND d.revision = i.expected
        AND (i.generation IS NULL OR d.generation = i.generation)
    WHERE i.expected <> 0 AND (SELECT count(*) FROM inserted) >= 0
    ORDER BY d.persistence_id COLLATE "C"
    FOR UPDATE OF d
), fired_timer AS MATERIALIZED (
    SELECT t.persistence_id
    FROM locked AS l JOIN entity_timers AS t
      ON t.persistence_id = l.persistence_id AND t.name = l.fire_name AND t.due = l.fire_due
    ORDER BY t.persistence_id COLLATE "C"
    FOR UPDATE OF t
), updated AS (
    UPDATE durable_state AS d
    SET revision = l.revision, db_timestamp = now(), state_ser_id = 1, state_ser_manifest = l.manifest,
        state_payload = l.payload, state_schema_version = l.schema_version, slice = l.slice
    FROM locked AS l
    WHERE d.ctid = l.row_id AND d.revision = l.expected
      AND (l.fire_name IS NULL OR l.persistence_id IN (SELECT persistence_id FROM fired_timer))
    RETURNING d.persistence_id
)
SELECT persistence_id FROM inserted UNION ALL SELECT persistence_id FROM updated;
SQL
}

tps() { # $1: rows per statement, $2: clients
  write_script "$1"
  pgbench -n -M prepared -T "$duration" -c "$2" -j "$2" -D clients="$2" -f "$work/write-$1.sql" "$url" 2>&1 \
    | tee "$work/pgbench-$1.log" | awk '/^tps = / { print $3; exit }'
}

single_tps=$(tps 1 "$single_clients")
batched_tps=$(tps "$batch" "$batch_clients")
python3 - "$single_tps" "$batched_tps" "$batch" "$single_clients" "$batch_clients" "$duration" <<'PY'
import json, sys
single, batched, batch, single_clients, batch_clients, duration = sys.argv[1:]
print(json.dumps({
    "mode": "pgbench",
    "single_row_rows_per_sec": float(single),
    "batched_rows_per_sec": float(batched) * int(batch),
    "batch_rows": int(batch),
    "single_row_clients": int(single_clients),
    "batched_clients": int(batch_clients),
    "seconds": int(duration),
}))
PY
