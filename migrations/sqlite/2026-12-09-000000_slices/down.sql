DROP INDEX IF EXISTS durable_state_by_slice;
ALTER TABLE durable_state DROP COLUMN slice;
