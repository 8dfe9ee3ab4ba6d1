UPDATE state_changes SET state_payload = convert_to('{"redacted":true}', 'UTF8') WHERE state_payload = ''::bytea;
ALTER TABLE durable_state DROP COLUMN generation;
