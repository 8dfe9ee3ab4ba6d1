-- The change feed (see the PostgreSQL migration). SQLite serialises writers,
-- so AUTOINCREMENT positions are already in commit order and gapless
-- (a rolled-back transaction rolls back its increments too).
CREATE TABLE IF NOT EXISTS state_changes (
    position      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    mall_id       TEXT    NOT NULL,
    user_id       TEXT    NOT NULL,
    revision      INTEGER NOT NULL,
    committed_at  TEXT    NOT NULL,
    state_payload BLOB    NOT NULL
);

CREATE TABLE IF NOT EXISTS feed_offsets (
    consumer   TEXT    NOT NULL PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at TEXT    NOT NULL
);
