-- One row per user, modelled on Pekko's durable_state table.
-- persistence_id is 'UserState|<mall>-<user>' with '%' and '-' inside the ids
-- percent-escaped, so two different (mall, user) pairs never share a row.
CREATE TABLE IF NOT EXISTS durable_state (
    persistence_id     TEXT        NOT NULL PRIMARY KEY,
    entity_type        TEXT        NOT NULL,
    revision           BIGINT      NOT NULL CHECK (revision > 0),
    db_timestamp       TIMESTAMPTZ NOT NULL,
    state_ser_id       INTEGER     NOT NULL,
    state_ser_manifest TEXT        NOT NULL,
    state_payload      BYTEA       NOT NULL
);
