-- Which life of a row this is: set when the row is created, kept by every
-- write, and checked by every write and every freshness check beside the
-- revision. A row purged by retention and created again under the same id
-- starts at revision 1 again; its new generation keeps a node that still
-- holds the purged row's state (at the same revision) from answering from it
-- or writing over the new row. Rows from before this migration are at 0; a
-- new row never is. A constant default adds the column without rewriting
-- the table.
ALTER TABLE durable_state ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

-- A redacted change feed row's payload is now empty, which no encoded state
-- is: the former marker, {"redacted":true}, was also what a state with one
-- field `redacted` set to true encodes to, and read as a redaction.
UPDATE state_changes SET state_payload = ''::bytea WHERE state_payload = convert_to('{"redacted":true}', 'UTF8');
