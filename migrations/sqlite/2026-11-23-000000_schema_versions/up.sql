-- The schema version of each stored state (see the PostgreSQL migration).
-- Rows written before this migration are at version 1.
ALTER TABLE durable_state ADD COLUMN state_schema_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE state_changes ADD COLUMN state_schema_version INTEGER NOT NULL DEFAULT 1;
