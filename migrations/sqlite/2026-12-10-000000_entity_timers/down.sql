DROP TABLE IF EXISTS entity_timers;
