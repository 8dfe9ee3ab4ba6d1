-- Which life of a row this is (see the PostgreSQL migration); 0 before it.
ALTER TABLE durable_state ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

-- A redacted change feed row's payload is now empty (see the PostgreSQL migration).
UPDATE state_changes SET state_payload = X'' WHERE state_payload = CAST('{"redacted":true}' AS BLOB);
