-- The change feed carries any entity type: rows name the entity by its type
-- and persistence id instead of a user's mall and user ids. Every existing
-- row is kept, converted to the persistence id its user's row has.
ALTER TABLE state_changes ADD COLUMN entity_type TEXT, ADD COLUMN persistence_id TEXT;
UPDATE state_changes SET
    entity_type = 'UserState',
    persistence_id = 'UserState|' || replace(replace(mall_id, '%', '%25'), '-', '%2D')
                     || '-' || replace(replace(user_id, '%', '%25'), '-', '%2D');
ALTER TABLE state_changes
    ALTER COLUMN entity_type SET NOT NULL,
    ALTER COLUMN persistence_id SET NOT NULL,
    DROP COLUMN mall_id,
    DROP COLUMN user_id;
-- A typed feed reads one entity type in position order.
CREATE INDEX state_changes_by_entity_type ON state_changes (entity_type, position);
