DROP TABLE IF EXISTS durable_state;
