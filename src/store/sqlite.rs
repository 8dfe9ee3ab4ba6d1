use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use diesel::sql_types::{BigInt, Binary, Integer, Text};
use diesel::{Connection, OptionalExtension, SqliteConnection};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::row::{encode, revision_column, StateRow, JSON_SERIALIZER_ID, STATE_MANIFEST};
use super::runtime::DbRuntime;
use super::{persistence_id, Revision, StateStore, StoreConfig, StoredState, ENTITY_TYPE};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

type SqliteAsync = SyncConnectionWrapper<SqliteConnection>;

const LOAD: &str = "SELECT revision, state_ser_id, state_payload FROM durable_state WHERE persistence_id = ?";

const INSERT_FIRST: &str = "INSERT INTO durable_state \
     (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
     VALUES (?, ?, 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?, ?, ?) ON CONFLICT (persistence_id) DO NOTHING";

const UPDATE_IF_REVISION: &str = "UPDATE durable_state \
     SET revision = ?, db_timestamp = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), state_ser_id = ?, \
         state_ser_manifest = ?, state_payload = ? \
     WHERE persistence_id = ? AND revision = ?";

/// The embedded default: a SQLite file, no server needed.
///
/// Uses diesel-async's sync-connection wrapper over a bundled libsqlite3, in
/// WAL mode with `synchronous = FULL`, so an acknowledged write survives a
/// crash of the process or the machine.
///
/// ```no_run
/// # async fn run() -> Result<(), persist_durable::StoreError> {
/// let store = persist_durable::SqliteStore::open("user-state.db").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: Pool<SqliteAsync>,
    // Declared last: dropped after the pool whose connections live on it.
    runtime: Arc<DbRuntime>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` with
    /// [`StoreConfig::default`], and applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StoreConfig::default().with_pool_size(4)).await
    }

    /// Opens the database file at `path` with `config`.
    pub async fn open_with(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreError> {
        let path = path
            .as_ref()
            .to_str()
            .ok_or_else(|| StoreError::Setup("the SQLite path is not valid UTF-8".into()))?
            .to_owned();
        let runtime = Arc::new(DbRuntime::new(
            "sqlite",
            config.worker_threads,
            config.operation_timeout,
        )?);
        let migrate_path = path.clone();
        let busy_ms = config.sqlite_busy_timeout.as_millis();
        runtime
            .run_unbounded(async move {
                tokio::task::spawn_blocking(move || migrate(&migrate_path, busy_ms))
                    .await
                    .map_err(|e| StoreError::Migration(e.to_string()))?
            })
            .await?;

        let mut manager_config = ManagerConfig::<SqliteAsync>::default();
        manager_config.custom_setup = Box::new(move |url| {
            let url = url.to_owned();
            Box::pin(async move {
                let mut conn = SqliteAsync::establish(&url).await?;
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {busy_ms}; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
                ))
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            })
        });
        let pool = Pool::builder(AsyncDieselConnectionManager::<SqliteAsync>::new_with_config(
            path,
            manager_config,
        ))
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

/// Migrations with a plain synchronous connection: this runs on a blocking
/// thread, and diesel's harness needs no async wrapper for SQLite. Several
/// processes may open the same file at once, so it waits for their locks.
fn migrate(path: &str, busy_ms: u128) -> Result<(), StoreError> {
    let mut conn = SqliteConnection::establish(path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        &format!("PRAGMA busy_timeout = {busy_ms}; PRAGMA journal_mode = WAL;"),
    )
    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    // Another process may apply the same migration between our check and our
    // write; the second attempt then finds nothing pending.
    if conn.run_pending_migrations(MIGRATIONS).is_ok() {
        return Ok(());
    }
    conn.run_pending_migrations(MIGRATIONS)
        .map(drop)
        .map_err(|e| StoreError::Migration(e.to_string()))
}

async fn checkout(pool: &Pool<SqliteAsync>) -> Result<Object<SqliteAsync>, StoreError> {
    pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))
}

#[async_trait]
impl StateStore for SqliteStore {
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
