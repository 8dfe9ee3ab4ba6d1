-- Each row records the schema version of the state it holds: the entity's
-- DurableEntity::SCHEMA_VERSION when it was written. A row stored at an older
-- version is upgraded when it is read, and written back at the new version
-- by its next write. Rows written before this migration are at version 1.
-- The change feed's rows carry their own, as they are read long after.
ALTER TABLE durable_state ADD COLUMN state_schema_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE state_changes ADD COLUMN state_schema_version INTEGER NOT NULL DEFAULT 1;
