-- Rows written at a later schema version keep their payloads, which the
-- previous release reads as version 1.
ALTER TABLE state_changes DROP COLUMN state_schema_version;
ALTER TABLE durable_state DROP COLUMN state_schema_version;
