use std::sync::Arc;

use async_trait::async_trait;
use diesel::sql_types::{BigInt, Binary, Integer, Text};
use diesel::OptionalExtension;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::row::{encode, revision_column, StateRow, JSON_SERIALIZER_ID, STATE_MANIFEST};
use super::runtime::DbRuntime;
use super::{persistence_id, Revision, StateStore, StoreConfig, StoredState, ENTITY_TYPE};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Serialises concurrent migrations from several processes (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x7065_7273_6973_7400;

const LOAD: &str = "SELECT revision, state_ser_id, state_payload FROM durable_state WHERE persistence_id = $1";

const INSERT_FIRST: &str = "INSERT INTO durable_state \
     (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
     VALUES ($1, $2, 1, now(), $3, $4, $5) ON CONFLICT (persistence_id) DO NOTHING";

const UPDATE_IF_REVISION: &str = "UPDATE durable_state \
     SET revision = $1, db_timestamp = now(), state_ser_id = $2, state_ser_manifest = $3, state_payload = $4 \
     WHERE persistence_id = $5 AND revision = $6";

/// The production store: PostgreSQL through diesel-async's pure-Rust driver
/// and a deadpool connection pool.
///
/// ```no_run
/// # async fn run() -> Result<(), persist_durable::StoreError> {
/// let store = persist_durable::PostgresStore::connect("postgres://postgres:postgres@localhost/persist_durable").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool<AsyncPgConnection>,
    // Declared last: dropped after the pool whose connections live on it.
    runtime: Arc<DbRuntime>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStore {
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
        let connect_timeout = config.connect_timeout;
        runtime
            .run_unbounded(async move {
                tokio::time::timeout(connect_timeout * 4, migrate(url))
                    .await
                    .unwrap_or(Err(StoreError::Timeout(connect_timeout * 4)))
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
        Ok(Self { pool, runtime })
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

async fn checkout(pool: &Pool<AsyncPgConnection>) -> Result<Object<AsyncPgConnection>, StoreError> {
    pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn load(&self, key: &UserKey) -> Result<Option<StoredState>, StoreError> {
        let (pool, key) = (self.pool.clone(), key.clone());
        self.runtime
            .run(async move {
                let mut conn = checkout(&pool).await?;
                let row: Option<StateRow> = diesel::sql_query(LOAD)
                    .bind::<Text, _>(persistence_id(&key))
                    .get_result(&mut conn)
                    .await
                    .optional()?;
                row.map(|row| row.decode(&key)).transpose()
            })
            .await
    }

    async fn write(&self, key: &UserKey, expected: Revision, state: &UserState) -> Result<Revision, StoreError> {
        let (pool, key) = (self.pool.clone(), key.clone());
        let payload = encode(state)?;
        let revision = expected.next();
        let (new_column, expected_column) = (revision_column(revision)?, revision_column(expected)?);
        self.runtime
            .run(async move {
                let mut conn = checkout(&pool).await?;
                let id = persistence_id(&key);
                let written = if expected == Revision::NONE {
                    diesel::sql_query(INSERT_FIRST)
                        .bind::<Text, _>(id)
                        .bind::<Text, _>(ENTITY_TYPE)
                        .bind::<Integer, _>(JSON_SERIALIZER_ID)
                        .bind::<Text, _>(STATE_MANIFEST)
                        .bind::<Binary, _>(payload)
                        .execute(&mut conn)
                        .await?
                } else {
                    diesel::sql_query(UPDATE_IF_REVISION)
                        .bind::<BigInt, _>(new_column)
                        .bind::<Integer, _>(JSON_SERIALIZER_ID)
                        .bind::<Text, _>(STATE_MANIFEST)
                        .bind::<Binary, _>(payload)
                        .bind::<Text, _>(id)
                        .bind::<BigInt, _>(expected_column)
                        .execute(&mut conn)
                        .await?
                };
                if written == 1 {
                    Ok(revision)
                } else {
                    Err(StoreError::Conflict { key, expected })
                }
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        self.runtime
            .run(async move {
                let mut conn = checkout(&pool).await?;
                conn.batch_execute("SELECT 1").await?;
                Ok(())
            })
            .await
    }
}
