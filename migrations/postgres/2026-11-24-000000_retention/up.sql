-- Admin reads and retention look at one entity type at a time, in
-- persistence id order: counting a type's rows, paging through its keys,
-- and finding its rows not written for a while, chunk after chunk. The
-- primary key cannot serve them (the type is a prefix of the id, and a
-- collation need not keep a prefix's ids together). Updates leave both
-- columns alone, so a state write still updates no index. Built
-- CONCURRENTLY (outside a transaction: metadata.toml), so that on a large
-- existing table the upgrade does not block writers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS durable_state_by_entity_type ON durable_state (entity_type, persistence_id);
