-- A delete or a purge redacts the entity's earlier change feed rows in its
-- own statement: this index finds them without scanning the feed. Built
-- CONCURRENTLY (outside a transaction: metadata.toml), so that on a large
-- existing feed the upgrade never blocks the writers meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS state_changes_by_persistence_id ON state_changes (persistence_id, position);
