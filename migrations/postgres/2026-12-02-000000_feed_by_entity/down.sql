DROP INDEX IF EXISTS state_changes_by_persistence_id;
