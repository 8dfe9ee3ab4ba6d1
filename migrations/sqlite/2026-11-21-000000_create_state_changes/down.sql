DROP TABLE IF EXISTS feed_offsets;
DROP TABLE IF EXISTS state_changes;
