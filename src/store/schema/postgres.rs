// @generated automatically by Diesel CLI.

diesel::table! {
    cluster_leases (name) {
        name -> Text,
        holder -> Nullable<Text>,
        epoch -> Int8,
    }
}

diesel::table! {
    cluster_nodes (node_id) {
        node_id -> Text,
        address -> Text,
        lease_expires -> Timestamptz,
        joined_at -> Timestamptz,
        leaving -> Bool,
    }
}

diesel::table! {
    cluster_slices (slice) {
        slice -> Int4,
        owner -> Nullable<Text>,
        epoch -> Int8,
    }
}

diesel::table! {
    durable_state (persistence_id) {
        persistence_id -> Text,
        entity_type -> Text,
        revision -> Int8,
        db_timestamp -> Timestamptz,
        state_ser_id -> Int4,
        state_ser_manifest -> Text,
        state_payload -> Bytea,
        state_schema_version -> Int4,
        generation -> Int8,
        slice -> Nullable<Int4>,
    }
}

diesel::table! {
    entity_timers (persistence_id, name) {
        persistence_id -> Text,
        name -> Text,
        entity_type -> Text,
        slice -> Int4,
        due -> Timestamptz,
        schedule -> Text,
        command -> Bytea,
        missed -> Int4,
    }
}

diesel::table! {
    feed_head (id) {
        id -> Int4,
        position -> Int8,
    }
}

diesel::table! {
    feed_offsets (consumer) {
        consumer -> Text,
        position -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    state_changes (position) {
        position -> Int8,
        revision -> Int8,
        committed_at -> Timestamptz,
        state_payload -> Bytea,
        entity_type -> Text,
        persistence_id -> Text,
        state_schema_version -> Int4,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    cluster_leases,
    cluster_nodes,
    cluster_slices,
    durable_state,
    entity_timers,
    feed_head,
    feed_offsets,
    state_changes,
);
