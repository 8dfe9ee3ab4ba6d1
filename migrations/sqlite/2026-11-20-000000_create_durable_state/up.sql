-- The SQLite form of the PostgreSQL table: same columns and key, with
-- db_timestamp as ISO-8601 text (SQLite has no timestamp type).
CREATE TABLE IF NOT EXISTS durable_state (
    persistence_id     TEXT    NOT NULL PRIMARY KEY,
    entity_type        TEXT    NOT NULL,
    revision           INTEGER NOT NULL CHECK (revision > 0),
    db_timestamp       TEXT    NOT NULL,
    state_ser_id       INTEGER NOT NULL,
    state_ser_manifest TEXT    NOT NULL,
    state_payload      BLOB    NOT NULL
);
