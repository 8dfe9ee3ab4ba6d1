UPDATE state_changes SET state_payload = CAST('{"redacted":true}' AS BLOB) WHERE state_payload = X'';
ALTER TABLE durable_state DROP COLUMN generation;
