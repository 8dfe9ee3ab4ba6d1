-- Each row's slice (see the PostgreSQL migration); filled in by the store at
-- start for rows from before. SQLite serves one node: no cluster tables.
ALTER TABLE durable_state ADD COLUMN slice INTEGER;
CREATE INDEX IF NOT EXISTS durable_state_by_slice ON durable_state (slice, entity_type, db_timestamp);
