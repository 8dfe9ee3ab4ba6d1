-- Durable timers (see the PostgreSQL migration); `due` as the ISO-8601 text
-- the other timestamps are (fixed width, so text order is time order).
CREATE TABLE IF NOT EXISTS entity_timers (
    persistence_id TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    entity_type    TEXT    NOT NULL,
    slice          INTEGER NOT NULL,
    due            TEXT    NOT NULL,
    schedule       TEXT    NOT NULL,
    command        BLOB    NOT NULL,
    missed         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (persistence_id, name)
);
CREATE INDEX IF NOT EXISTS entity_timers_by_due ON entity_timers (entity_type, due);
