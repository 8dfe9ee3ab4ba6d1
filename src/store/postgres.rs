use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use diesel::sql_types::{Array, BigInt, Binary, Integer, Text};
use diesel::QueryableByName;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::group_commit::{GroupCommit, RowWrite, SqlBackend};
use super::row::{StateRow, JSON_SERIALIZER_ID, STATE_MANIFEST};
use super::runtime::DbRuntime;
use super::{Revision, StateStore, StoreConfig, StoreStats, StoredState, ENTITY_TYPE};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Serialises concurrent migrations from several processes (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x7065_7273_6973_7400;

/// Restores a batch of users in one round trip.
const LOAD_ROWS_SQL: &str = "SELECT persistence_id, revision, state_ser_id, state_payload \
     FROM durable_state WHERE persistence_id = ANY($1)";

const WRITE_ROWS_SQL: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])
        AS t(persistence_id, expected, revision, payload)
), inserted AS (
    INSERT INTO durable_state
        (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload)
    SELECT persistence_id, $5, revision, now(), $6, $7, payload FROM input WHERE expected = 0
    ON CONFLICT (persistence_id) DO NOTHING
    RETURNING persistence_id
), updated AS (
    UPDATE durable_state AS d
    SET revision = i.revision, db_timestamp = now(), state_ser_id = $6, state_ser_manifest = $7,
        state_payload = i.payload
    FROM input AS i
    WHERE i.expected <> 0 AND d.persistence_id = i.persistence_id AND d.revision = i.expected
    RETURNING d.persistence_id
)
SELECT persistence_id FROM inserted UNION ALL SELECT persistence_id FROM updated";

/// The production store: PostgreSQL through diesel-async's pure-Rust driver
/// and a deadpool connection pool, with group commit.
///
/// ```no_run
/// # async fn run() -> Result<(), persist_durable::StoreError> {
/// let store = persist_durable::PostgresStore::connect("postgres://postgres:postgres@localhost/persist_durable").await?;
/// # Ok(()) }
/// ```
pub struct PostgresStore {
    group_commit: GroupCommit,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The group-commit write: one statement for a batch of users, each row
    /// written only if its stored revision is the one expected (0: no row
    /// yet). It answers the persistence ids written; any other row of the
    /// batch was a conflict and is unchanged. Binds: persistence ids,
    /// expected revisions, new revisions, payloads (arrays), then entity
    /// type, serializer id, manifest.
    pub const WRITE_SQL: &'static str = WRITE_ROWS_SQL;

    /// Connects with [`StoreConfig::default`] and applies pending migrations.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        Self::connect_with(database_url, StoreConfig::default()).await
    }

    /// Connects with `config` and applies pending migrations.
    pub async fn connect_with(database_url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        let runtime = Arc::new(DbRuntime::new(
            "postgres",
            config.worker_threads,
            config.operation_timeout,
        )?);
        let url = database_url.to_owned();
        let limit = config.connect_timeout * 4;
        runtime
            .run_unbounded(async move {
                tokio::time::timeout(limit, migrate(url))
                    .await
                    .unwrap_or(Err(StoreError::Timeout(limit)))
            })
            .await?;
        let pool = Pool::builder(AsyncDieselConnectionManager::<AsyncPgConnection>::new(database_url))
            .max_size(config.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot build the connection pool: {e}")))?;
        let group_commit = GroupCommit::start(Arc::new(PgBackend { pool }), runtime, &config);
        Ok(Self { group_commit })
    }
}

async fn migrate(url: String) -> Result<(), StoreError> {
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map(drop)
        .map_err(|e| StoreError::Migration(e.to_string()));
    let mut conn = harness.into_inner();
    conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await?;
    applied
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn load(&self, key: &UserKey) -> Result<Option<StoredState>, StoreError> {
        self.group_commit.load_state(key).await
    }

    async fn write(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        state: &UserState,
    ) -> Result<Revision, StoreError> {
        self.group_commit.write_state(key, expected, revision, state).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.group_commit.ping().await
    }

    fn stats(&self) -> StoreStats {
        self.group_commit.stats()
    }
}

struct PgBackend {
    pool: Pool<AsyncPgConnection>,
}

impl PgBackend {
    async fn checkout(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = Text)]
    persistence_id: String,
}

#[async_trait]
impl SqlBackend for PgBackend {
    async fn write_rows(&self, rows: Vec<RowWrite>) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.checkout().await?;
        let (mut ids, mut expected, mut revisions, mut payloads) = (
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
        );
        for row in rows {
            ids.push(row.persistence_id);
            expected.push(row.expected);
            revisions.push(row.revision);
            payloads.push(row.payload);
        }
        let written: Vec<Written> = diesel::sql_query(WRITE_ROWS_SQL)
            .bind::<Array<Text>, _>(&ids)
            .bind::<Array<BigInt>, _>(expected)
            .bind::<Array<BigInt>, _>(revisions)
            .bind::<Array<Binary>, _>(payloads)
            .bind::<Text, _>(ENTITY_TYPE)
            .bind::<Integer, _>(JSON_SERIALIZER_ID)
            .bind::<Text, _>(STATE_MANIFEST)
            .load(&mut conn)
            .await?;
        let written: std::collections::HashSet<String> = written.into_iter().map(|w| w.persistence_id).collect();
        Ok(ids.iter().map(|id| written.contains(id)).collect())
    }

    async fn load_rows(&self, persistence_ids: Vec<String>) -> Result<HashMap<String, StateRow>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows: Vec<StateRow> = diesel::sql_query(LOAD_ROWS_SQL)
            .bind::<Array<Text>, _>(persistence_ids)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|row| (row.persistence_id.clone(), row)).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.checkout().await?.batch_execute("SELECT 1").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// BENCHMARKS.md compares the library with pgbench running this statement:
    /// the two must not drift apart.
    #[test]
    fn the_ceiling_script_runs_the_librarys_write_statement() {
        let script = include_str!("../../scripts/pg-ceiling.sh");
        let from_inserted = &WRITE_ROWS_SQL[WRITE_ROWS_SQL.find("), inserted AS (").unwrap()..];
        let with_constants = from_inserted
            .replace("$5", &format!("'{ENTITY_TYPE}'"))
            .replace("$6", &JSON_SERIALIZER_ID.to_string())
            .replace("$7", &format!("'{STATE_MANIFEST}'"));
        assert!(
            words(script).contains(&words(&with_constants)),
            "scripts/pg-ceiling.sh no longer runs PostgresStore::WRITE_SQL"
        );
    }
}
