DROP INDEX IF EXISTS durable_state_by_slice;
