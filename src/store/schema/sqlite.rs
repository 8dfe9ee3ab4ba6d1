// @generated automatically by Diesel CLI.

diesel::table! {
    durable_state (persistence_id) {
        persistence_id -> Text,
        entity_type -> Text,
        revision -> BigInt,
        db_timestamp -> Text,
        state_ser_id -> Integer,
        state_ser_manifest -> Text,
        state_payload -> Binary,
        state_schema_version -> Integer,
        generation -> BigInt,
        slice -> Nullable<Integer>,
    }
}

diesel::table! {
    entity_timers (persistence_id, name) {
        persistence_id -> Text,
        name -> Text,
        entity_type -> Text,
        slice -> Integer,
        due -> Text,
        schedule -> Text,
        command -> Binary,
        missed -> Integer,
    }
}

diesel::table! {
    feed_offsets (consumer) {
        consumer -> Text,
        position -> BigInt,
        updated_at -> Text,
    }
}

diesel::table! {
    state_changes (position) {
        position -> BigInt,
        revision -> BigInt,
        committed_at -> Text,
        state_payload -> Binary,
        entity_type -> Text,
        persistence_id -> Text,
        state_schema_version -> Integer,
    }
}

diesel::allow_tables_to_appear_in_same_query!(durable_state, entity_timers, feed_offsets, state_changes,);
