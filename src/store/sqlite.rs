use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Binary, Integer, Text};
use diesel::{Connection, OptionalExtension, RunQueryDsl, SqliteConnection};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::group_commit::{FeedRow, GroupCommit, RowWrite, SqlBackend};
use super::row::StateRow;
use super::runtime::DbRuntime;
use super::{StoreConfig, JSON_SERIALIZER_ID};
use crate::error::CorruptRow;
use crate::error::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

type SqliteAsync = SyncConnectionWrapper<SqliteConnection>;

const LOAD_ROW: &str =
    "SELECT persistence_id, revision, state_ser_id, state_payload FROM durable_state WHERE persistence_id = ?";

const INSERT_FIRST: &str = "INSERT INTO durable_state \
     (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
     VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?, ?, ?) ON CONFLICT (persistence_id) DO NOTHING";

const UPDATE_IF_REVISION: &str = "UPDATE durable_state \
     SET revision = ?, db_timestamp = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), state_ser_id = ?, \
         state_ser_manifest = ?, state_payload = ? \
     WHERE persistence_id = ? AND revision = ?";

const INSERT_CHANGE: &str = "INSERT INTO state_changes \
     (entity_type, persistence_id, revision, committed_at, state_payload) \
     VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?)";

const READ_CHANGES: &str = "SELECT position, persistence_id, revision, committed_at, state_payload \
     FROM state_changes WHERE entity_type = ? AND position > ? ORDER BY position LIMIT ?";

const LOAD_OFFSET: &str = "SELECT position FROM feed_offsets WHERE consumer = ?";

const SAVE_OFFSET: &str = "INSERT INTO feed_offsets (consumer, position, updated_at) \
     VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
     ON CONFLICT (consumer) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at";

#[derive(diesel::QueryableByName)]
struct SqliteChange {
    #[diesel(sql_type = BigInt)]
    position: i64,
    #[diesel(sql_type = Text)]
    persistence_id: String,
    #[diesel(sql_type = BigInt)]
    revision: i64,
    #[diesel(sql_type = Text)]
    committed_at: String,
    #[diesel(sql_type = Binary)]
    state_payload: Vec<u8>,
}

#[derive(diesel::QueryableByName)]
struct Offset {
    #[diesel(sql_type = BigInt)]
    position: i64,
}

/// The embedded default: a SQLite file, no server needed.
///
/// Uses diesel-async's sync-connection wrapper over a bundled libsqlite3, in
/// WAL mode with `synchronous = FULL`, so an acknowledged write survives a
/// crash of the process or the machine. A batch of writes is one transaction:
/// one fsync for many users.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use persist_durable::{Revision, SharedStore, SqliteStore, UserKey, UserState};
/// let dir = tempfile::tempdir()?;
/// let store: SharedStore = std::sync::Arc::new(SqliteStore::open(dir.path().join("user-state.db")).await?);
/// let key = UserKey::new("mall001", "user001")?;
/// store.write(&key, Revision::NONE, Revision(1), &UserState::default()).await?;
/// assert_eq!(store.load(&key).await?.unwrap().revision, Revision(1));
/// # Ok(()) }
/// ```
pub struct SqliteStore {
    group_commit: GroupCommit,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
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
            .ok_or_else(|| StoreError::InvalidConfig("the SQLite path is not valid UTF-8".into()))?
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
                    .map_err(|e| StoreError::TaskFailed(Arc::new(e)))?
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
        let pool = config.build_pool(AsyncDieselConnectionManager::<SqliteAsync>::new_with_config(
            path,
            manager_config,
        ))?;
        let group_commit = GroupCommit::start(Arc::new(SqliteBackend { pool }), runtime, &config);
        Ok(Self { group_commit })
    }
}

/// Migrations with a plain synchronous connection: this runs on a blocking
/// thread, and diesel's harness needs no async wrapper for SQLite. Several
/// processes may open the same file at once, so it waits for their locks.
fn migrate(path: &str, busy_ms: u128) -> Result<(), StoreError> {
    let mut conn = SqliteConnection::establish(path).map_err(StoreError::unavailable)?;
    conn.batch_execute(&format!("PRAGMA busy_timeout = {busy_ms}; PRAGMA journal_mode = WAL;"))
        .map_err(StoreError::unavailable)?;
    // Another process may apply the same migration between our check and our
    // write; the second attempt then finds nothing pending.
    if conn.run_pending_migrations(MIGRATIONS).is_ok() {
        return Ok(());
    }
    conn.run_pending_migrations(MIGRATIONS)
        .map(drop)
        .map_err(|e| StoreError::Migration(Arc::from(e)))
}

super::delegate_to_group_commit!(SqliteStore);
super::typed_access!(SqliteStore);

struct SqliteBackend {
    pool: Pool<SqliteAsync>,
}

impl SqliteBackend {
    async fn checkout(&self) -> Result<Object<SqliteAsync>, StoreError> {
        self.pool.get().await.map_err(StoreError::unavailable)
    }
}

/// Writes one row if its revision is the expected one, and then its changes
/// to the feed: SQLite runs one writer at a time, so the feed's
/// AUTOINCREMENT positions follow commit order.
fn write_row(conn: &mut SqliteConnection, row: RowWrite) -> diesel::QueryResult<bool> {
    let entity_type = row.entity_type().to_owned();
    let id = row.persistence_id.as_str();
    let written = if row.expected == 0 {
        diesel::sql_query(INSERT_FIRST)
            .bind::<Text, _>(id)
            .bind::<Text, _>(&entity_type)
            .bind::<BigInt, _>(row.revision)
            .bind::<Integer, _>(JSON_SERIALIZER_ID)
            .bind::<Text, _>(row.manifest)
            .bind::<Binary, _>(&row.payload)
            .execute(conn)?
    } else {
        diesel::sql_query(UPDATE_IF_REVISION)
            .bind::<BigInt, _>(row.revision)
            .bind::<Integer, _>(JSON_SERIALIZER_ID)
            .bind::<Text, _>(row.manifest)
            .bind::<Binary, _>(&row.payload)
            .bind::<Text, _>(id)
            .bind::<BigInt, _>(row.expected)
            .execute(conn)?
    };
    if written != 1 {
        return Ok(false);
    }
    for (revision, payload) in &row.changes {
        diesel::sql_query(INSERT_CHANGE)
            .bind::<Text, _>(&entity_type)
            .bind::<Text, _>(id)
            .bind::<BigInt, _>(*revision)
            .bind::<Binary, _>(payload)
            .execute(conn)?;
    }
    Ok(true)
}

#[async_trait]
impl SqlBackend for SqliteBackend {
    async fn write_rows(&self, rows: Vec<RowWrite>) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.checkout().await?;
        // One immediate transaction for the batch: one commit, one fsync.
        let written = conn
            .spawn_blocking(move |conn| {
                conn.immediate_transaction(|conn| rows.into_iter().map(|row| write_row(conn, row)).collect())
            })
            .await?;
        Ok(written)
    }

    async fn load_rows(&self, persistence_ids: Vec<String>) -> Result<HashMap<String, StateRow>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows = conn
            .spawn_blocking(move |conn| {
                conn.transaction(|conn| {
                    let mut rows = HashMap::with_capacity(persistence_ids.len());
                    for id in persistence_ids {
                        let row: Option<StateRow> = diesel::sql_query(LOAD_ROW)
                            .bind::<Text, _>(&id)
                            .get_result(conn)
                            .optional()?;
                        if let Some(row) = row {
                            rows.insert(id, row);
                        }
                    }
                    Ok(rows)
                })
            })
            .await?;
        Ok(rows)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.checkout().await?.batch_execute("SELECT 1").await?;
        Ok(())
    }

    async fn read_changes(&self, entity_type: String, after: i64, limit: i64) -> Result<Vec<FeedRow>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows: Vec<SqliteChange> = conn
            .spawn_blocking(move |conn| {
                diesel::sql_query(READ_CHANGES)
                    .bind::<Text, _>(entity_type)
                    .bind::<BigInt, _>(after)
                    .bind::<BigInt, _>(limit)
                    .load(conn)
            })
            .await?;
        rows.into_iter()
            .map(|r| {
                let committed_at = chrono::DateTime::parse_from_rfc3339(&r.committed_at)
                    .map_err(|e| StoreError::Corrupt {
                        key: crate::PersistenceId::parse(&r.persistence_id)
                            .unwrap_or_else(|| crate::PersistenceId::new("?", &r.persistence_id)),
                        revision: r.revision,
                        source: CorruptRow::Timestamp(e),
                    })?
                    .with_timezone(&chrono::Utc);
                Ok(FeedRow {
                    position: r.position,
                    persistence_id: r.persistence_id,
                    revision: r.revision,
                    committed_at,
                    state_payload: r.state_payload,
                })
            })
            .collect()
    }

    async fn load_offset(&self, consumer: String) -> Result<Option<i64>, StoreError> {
        let mut conn = self.checkout().await?;
        let offset: Option<Offset> = conn
            .spawn_blocking(move |conn| {
                diesel::sql_query(LOAD_OFFSET)
                    .bind::<Text, _>(consumer)
                    .get_result(conn)
                    .optional()
            })
            .await?;
        Ok(offset.map(|o| o.position))
    }

    async fn save_offset(&self, consumer: String, position: i64) -> Result<(), StoreError> {
        let mut conn = self.checkout().await?;
        conn.spawn_blocking(move |conn| {
            diesel::sql_query(SAVE_OFFSET)
                .bind::<Text, _>(consumer)
                .bind::<BigInt, _>(position)
                .execute(conn)
        })
        .await?;
        Ok(())
    }
}
