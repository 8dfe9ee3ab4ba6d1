DROP TABLE IF EXISTS cluster_leases;
DROP TABLE IF EXISTS cluster_slices;
DROP TABLE IF EXISTS cluster_nodes;
ALTER TABLE durable_state DROP COLUMN IF EXISTS slice;
