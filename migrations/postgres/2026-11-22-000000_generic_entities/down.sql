-- Back to the user-only feed: rows of other entity types cannot be expressed and are dropped.
DROP INDEX state_changes_by_entity_type;
DELETE FROM state_changes WHERE entity_type <> 'UserState';
ALTER TABLE state_changes ADD COLUMN mall_id TEXT, ADD COLUMN user_id TEXT;
UPDATE state_changes SET
    mall_id = replace(replace(split_part(substr(persistence_id, 11), '-', 1), '%2D', '-'), '%25', '%'),
    user_id = replace(replace(split_part(substr(persistence_id, 11), '-', 2), '%2D', '-'), '%25', '%');
ALTER TABLE state_changes
    ALTER COLUMN mall_id SET NOT NULL,
    ALTER COLUMN user_id SET NOT NULL,
    DROP COLUMN entity_type,
    DROP COLUMN persistence_id;
