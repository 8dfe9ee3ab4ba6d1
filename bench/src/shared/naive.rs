//! The service a team would write without actors: per command, one
//! transaction that reads the user's row (`FOR UPDATE`), applies the same
//! pure transition as the library, and writes it back. Shared by the load
//! generator's naive mode and `bench/src/bin/http_naive.rs`.

use diesel::sql_types::{BigInt, Binary, Integer, Text};
use diesel::OptionalExtension;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use persist_durable::{apply, Command, DurableEntity, EntityKey, StatePolicy, UserKey, UserState};

/// The serializer id the library writes: serde JSON.
const JSON_SERIALIZER_ID: i32 = 1;

const NAIVE_READ: &str = "SELECT revision, state_payload FROM durable_state WHERE persistence_id = $1 FOR UPDATE";
const NAIVE_INSERT: &str = "INSERT INTO durable_state \
     (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
     VALUES ($1, $2, 1, now(), $3, $4, $5) \
     ON CONFLICT (persistence_id) DO UPDATE SET revision = durable_state.revision + 1, \
     db_timestamp = now(), state_payload = excluded.state_payload";
const NAIVE_UPDATE: &str =
    "UPDATE durable_state SET revision = revision + 1, db_timestamp = now(), state_payload = $2 \
     WHERE persistence_id = $1";

#[derive(diesel::QueryableByName)]
struct NaiveRow {
    #[diesel(sql_type = BigInt)]
    revision: i64,
    #[diesel(sql_type = Binary)]
    state_payload: Vec<u8>,
}

/// Read, apply, write back, in one transaction; the state after the command.
pub async fn naive_command(pool: Pool<AsyncPgConnection>, key: UserKey, command: Command) -> Result<UserState, String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let id = key.persistence_id().to_string();
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        let row: Option<NaiveRow> = diesel::sql_query(NAIVE_READ)
            .bind::<Text, _>(&id)
            .get_result(conn)
            .await
            .optional()?;
        let state: UserState = match &row {
            Some(row) => serde_json::from_slice(&row.state_payload).unwrap_or_default(),
            None => UserState::default(),
        };
        if command.is_read_only() {
            return Ok(state);
        }
        let next = apply(&state, &command, chrono::Utc::now(), &StatePolicy::default());
        let payload = serde_json::to_vec(&next).unwrap_or_default();
        match row.map(|r| r.revision) {
            None => {
                diesel::sql_query(NAIVE_INSERT)
                    .bind::<Text, _>(&id)
                    .bind::<Text, _>(UserState::ENTITY_TYPE)
                    .bind::<Integer, _>(JSON_SERIALIZER_ID)
                    .bind::<Text, _>(UserState::MANIFEST)
                    .bind::<Binary, _>(payload)
                    .execute(conn)
                    .await?
            }
            Some(_) => {
                diesel::sql_query(NAIVE_UPDATE)
                    .bind::<Text, _>(&id)
                    .bind::<Binary, _>(payload)
                    .execute(conn)
                    .await?
            }
        };
        Ok(next)
    })
    .await
    .map_err(|e| e.to_string())
}
