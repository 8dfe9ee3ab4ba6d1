-- The change feed: one row per committed revision of a user's state, written
-- in the same statement as the state itself (a transactional outbox).
-- position is gapless and in commit order: writers take it from feed_head,
-- whose row lock they hold until they commit.
CREATE TABLE IF NOT EXISTS state_changes (
    position      BIGINT      NOT NULL PRIMARY KEY,
    mall_id       TEXT        NOT NULL,
    user_id       TEXT        NOT NULL,
    revision      BIGINT      NOT NULL,
    committed_at  TIMESTAMPTZ NOT NULL,
    state_payload BYTEA       NOT NULL
);

CREATE TABLE IF NOT EXISTS feed_head (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    position BIGINT  NOT NULL
);
INSERT INTO feed_head (id, position) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- Where each consumer of the feed has got to.
CREATE TABLE IF NOT EXISTS feed_offsets (
    consumer   TEXT        NOT NULL PRIMARY KEY,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
