-- Back to the user-only feed: rows of other entity types are dropped.
DROP INDEX state_changes_by_entity_type;
DELETE FROM state_changes WHERE entity_type <> 'UserState';
ALTER TABLE state_changes ADD COLUMN mall_id TEXT NOT NULL DEFAULT '';
ALTER TABLE state_changes ADD COLUMN user_id TEXT NOT NULL DEFAULT '';
UPDATE state_changes SET
    mall_id = replace(replace(substr(persistence_id, 11, instr(substr(persistence_id, 11), '-') - 1), '%2D', '-'), '%25', '%'),
    user_id = replace(replace(substr(persistence_id, 11 + instr(substr(persistence_id, 11), '-')), '%2D', '-'), '%25', '%');
ALTER TABLE state_changes DROP COLUMN entity_type;
ALTER TABLE state_changes DROP COLUMN persistence_id;
