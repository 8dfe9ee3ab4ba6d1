-- The change feed carries any entity type (see the PostgreSQL migration).
-- Every existing row is kept, converted to its user's persistence id.
ALTER TABLE state_changes ADD COLUMN entity_type TEXT NOT NULL DEFAULT 'UserState';
ALTER TABLE state_changes ADD COLUMN persistence_id TEXT NOT NULL DEFAULT '';
UPDATE state_changes SET
    persistence_id = 'UserState|' || replace(replace(mall_id, '%', '%25'), '-', '%2D')
                     || '-' || replace(replace(user_id, '%', '%25'), '-', '%2D');
ALTER TABLE state_changes DROP COLUMN mall_id;
ALTER TABLE state_changes DROP COLUMN user_id;
CREATE INDEX state_changes_by_entity_type ON state_changes (entity_type, position);
