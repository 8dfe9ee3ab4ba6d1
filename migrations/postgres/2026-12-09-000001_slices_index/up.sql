-- An owner's rows by slice and type, oldest write first (Pekko's index, less
-- the revision): retention and timers of a slice's owner. Built
-- CONCURRENTLY (outside a transaction: metadata.toml), so that on a large
-- existing table the upgrade does not block writers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS durable_state_by_slice ON durable_state (slice, entity_type, db_timestamp);
