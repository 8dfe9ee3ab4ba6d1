-- A delete or a purge redacts the entity's earlier change feed rows in its
-- own transaction: this index finds them without scanning the feed.
CREATE INDEX IF NOT EXISTS state_changes_by_persistence_id ON state_changes (persistence_id, position);
