-- Admin reads and retention look at one entity type at a time, in
-- persistence id order (see the PostgreSQL migration).
CREATE INDEX IF NOT EXISTS durable_state_by_entity_type ON durable_state (entity_type, persistence_id);
