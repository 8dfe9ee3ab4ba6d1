-- Durable timers: each row a timer an entity's state wants, set, moved and
-- cancelled in the statement that commits that state, and consumed (deleted,
-- or moved to its next occurrence) in the statement that commits its fire.
-- Narrow and apart from durable_state: a scheduler reads the few due next by
-- the index, however many are pending.
CREATE TABLE IF NOT EXISTS entity_timers (
    persistence_id TEXT        NOT NULL,
    name           TEXT        NOT NULL,
    entity_type    TEXT        NOT NULL,
    slice          INTEGER     NOT NULL,
    due            TIMESTAMPTZ NOT NULL,
    -- The schedule (once, every, cron) as JSON; the command as its entity's JSON.
    schedule       TEXT        NOT NULL,
    command        BYTEA       NOT NULL,
    -- What a recurring timer does with missed occurrences: 0 once, 1 every one, 2 skip.
    missed         INTEGER     NOT NULL DEFAULT 0,
    PRIMARY KEY (persistence_id, name)
);
CREATE INDEX IF NOT EXISTS entity_timers_by_due ON entity_timers (entity_type, due);
