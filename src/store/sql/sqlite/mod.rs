//! The embedded backend: SQLite through diesel's synchronous driver on
//! blocking threads. Its set-up and statements are here, its timers' in
//! `timers`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::dsl::min;
use diesel::sql_types::{Integer, Text};
use diesel::upsert::excluded;
use diesel::{
    Connection, ExpressionMethods, IntoSql, OptionalExtension, QueryDsl, RunQueryDsl, SqliteConnection,
    TextExpressionMethods,
};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations};

use chrono::{DateTime, Utc};

use super::backend::{self as port, FeedRow, RowWrite, Sealed, SqlBackend, StateRow};
use super::{sorted_unique, SqlStore};
use crate::entity::{PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};
use crate::store::config::StoreConfig;
use crate::store::payload::{REDACTED, TOMBSTONE};
use crate::store::rows::{good_prefix, ChangeRow, RowOutcome};
use crate::store::runtime::{DbRuntime, NoAnswer};
use crate::store::schema::sqlite::{durable_state, feed_offsets, state_changes};
use crate::store::JSON_SERIALIZER_ID;
use crate::store::{ChangeLog, FeedBounds, Maintenance, Offsets, KAFKA_POSITIONS};

mod timers;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

type SqliteAsync = SyncConnectionWrapper<SqliteConnection>;

// Every query of this backend (all but the `PRAGMA`s that set a connection
// up) is written with diesel's query DSL against `schema::sqlite`: SQLite
// runs one writer at a time, so a batch is one transaction of single-row
// statements, which the DSL expresses.

diesel::define_sql_function! {
    /// SQLite's `strftime`: with [`ISO_8601_MILLIS`] and `'now'`, the
    /// database's clock as the ISO-8601 text the timestamp columns hold.
    fn strftime(format: Text, time: Text) -> Text;
}

diesel::define_sql_function! {
    /// SQLite's `substr`: `length` characters of `text` from `start` (1
    /// the first), to match a name's prefix exactly (`LIKE` would take `_`
    /// and `%` in it for patterns, and ignore case).
    fn substr(text: Text, start: Integer, length: Integer) -> Text;
}

/// The characters of a name prefix, as `substr` counts them.
fn prefix_length(prefix: &str) -> i32 {
    // Longer than any name stored: matches none, as it should.
    i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX)
}

/// `strftime`'s format for the `TEXT` timestamp columns, e.g. `2026-11-20T09:00:00.123Z`.
const ISO_8601_MILLIS: &str = "%Y-%m-%dT%H:%M:%fZ";

/// Ids per load statement: `eq_any` binds one parameter per id, and a batch
/// ([`StoreConfig::max_batch_size`]) may be larger than SQLite's limit on
/// parameters.
const LOAD_CHUNK: usize = 512;

/// A change feed row, as `read_change_rows` selects it.
#[derive(diesel::Queryable)]
struct SqliteChange {
    position: i64,
    persistence_id: String,
    revision: i64,
    committed_at: String,
    state_schema_version: i32,
    state_payload: Vec<u8>,
}

impl SqliteChange {
    /// The change, once its `TEXT` timestamp parses.
    fn decode(self) -> Result<ChangeRow, StoreError> {
        let committed_at = DateTime::parse_from_rfc3339(&self.committed_at)
            .map_err(|e| StoreError::CorruptChange {
                position: u64::try_from(self.position).unwrap_or(0),
                key: PersistenceId::parse(&self.persistence_id)
                    .unwrap_or_else(|| PersistenceId::new("?", &self.persistence_id)),
                source: CorruptRow::Timestamp(e),
            })?
            .with_timezone(&Utc);
        FeedRow {
            position: self.position,
            persistence_id: self.persistence_id,
            revision: self.revision,
            committed_at,
            state_schema_version: self.state_schema_version,
            state_payload: self.state_payload,
        }
        .decode()
    }
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
/// use persist_durable::{Revision, SharedStore, SqliteStore, StateStoreExt, UserKey, UserState};
/// let dir = tempfile::tempdir()?;
/// let store: SharedStore = std::sync::Arc::new(SqliteStore::open(dir.path().join("user-state.db")).await?);
/// let key = UserKey::new("mall001", "user001")?;
/// store.write(&key, Revision::NONE, Revision(1), &UserState::default()).await?;
/// assert_eq!(store.load(&key).await?.unwrap().revision, Revision(1));
/// # Ok(()) }
/// ```
pub type SqliteStore = SqlStore<SqliteBackend>;

/// The statements of SQLite behind a [`SqliteStore`].
pub struct SqliteBackend {
    pool: Pool<SqliteAsync>,
    feed: bool,
    /// How long a sent write may go unanswered before its outcome is
    /// reported unknown: twice the operation timeout.
    no_answer_after: std::time::Duration,
}

impl Sealed for SqliteBackend {}

impl SqlStore<SqliteBackend> {
    /// Opens (creating if needed) the database file at `path` with
    /// [`StoreConfig::default`], and applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StoreConfig::default().with_pool_size(4)).await
    }

    /// Opens the database file at `path` with `config`.
    pub async fn open_with(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        if config.sqlite_busy_timeout > config.operation_timeout {
            return Err(StoreError::InvalidConfig(format!(
                "the SQLite busy timeout ({:?}) must not exceed the operation timeout ({:?}): a write \
                 still waiting for a lock after its operation timed out could commit after being \
                 reported failed",
                config.sqlite_busy_timeout, config.operation_timeout
            )));
        }
        let path = path
            .as_ref()
            .to_str()
            .ok_or_else(|| StoreError::InvalidConfig("the SQLite path is not valid UTF-8".into()))?
            .to_owned();
        let runtime = DbRuntime::new("sqlite", config.worker_threads, config.operation_timeout)?;
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
        let backend = SqliteBackend {
            pool,
            feed: config.change_feed,
            no_answer_after: config.operation_timeout * 2,
        };
        Ok(Self::start(backend, runtime, &config))
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
    // write, or hold the database's write lock longer than the busy timeout
    // (several processes starting at once): a later attempt finds what is
    // still pending.
    let give_up_at = std::time::Instant::now() + MIGRATION_PATIENCE;
    loop {
        match super::apply_migrations(&mut conn, MIGRATIONS).and_then(|()| backfill_slices(&mut conn)) {
            Ok(()) => return Ok(()),
            Err(error) if std::time::Instant::now() >= give_up_at => return Err(error),
            Err(error) => tracing::debug!(%error, "migrating failed, maybe for another process's lock; trying again"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Fills in the slice of every row written before rows had one, a chunk of
/// 10,000 per transaction (see the PostgreSQL store's backfill).
fn backfill_slices(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    loop {
        let ids: Vec<String> = durable_state::table
            .filter(durable_state::slice.is_null())
            .select(durable_state::persistence_id)
            .limit(10_000)
            .load(conn)?;
        if ids.is_empty() {
            return Ok(());
        }
        conn.immediate_transaction(|conn| {
            for id in &ids {
                let slice = i32::from(crate::entity::Slice::of(id).index());
                diesel::update(durable_state::table.filter(durable_state::persistence_id.eq(id)))
                    .set(durable_state::slice.eq(slice))
                    .execute(conn)?;
            }
            diesel::QueryResult::Ok(())
        })?;
    }
}

/// How long a process keeps trying to migrate a database other processes
/// are migrating too.
const MIGRATION_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

impl SqliteBackend {
    /// One page of an entity type's ids and revisions in persistence id
    /// order after `after`, with `written_before` (as the `TEXT` timestamps
    /// hold it) only rows last written before it: served by the
    /// `(entity_type, persistence_id)` index.
    async fn page(
        &self,
        entity_type: String,
        written_before: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows: Vec<(String, i64)> = conn
            .spawn_blocking(move |conn| {
                let mut query = durable_state::table
                    .filter(durable_state::entity_type.eq(entity_type))
                    .order(durable_state::persistence_id)
                    .limit(port::limit(limit))
                    .select((durable_state::persistence_id, durable_state::revision))
                    .into_boxed();
                if let Some(written_before) = written_before {
                    query = query.filter(durable_state::db_timestamp.lt(written_before));
                }
                if let Some(after) = after {
                    query = query.filter(durable_state::persistence_id.gt(after));
                }
                query.load(conn)
            })
            .await?;
        rows.into_iter()
            .map(|(id, revision)| port::stored_key(id, revision))
            .collect()
    }

    async fn checkout(&self) -> Result<Object<SqliteAsync>, StoreError> {
        self.pool.get().await.map_err(StoreError::unavailable)
    }

    /// Runs `statement` on a connection of the pool, on a blocking thread.
    async fn blocking<T, F>(&self, statement: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteConnection) -> diesel::QueryResult<T> + Send + 'static,
    {
        Ok(self.checkout().await?.spawn_blocking(statement).await?)
    }
}

/// Erases the data of the feed's rows of `persistence_id` so far, keeping
/// their places: what a delete or a purge does in its own transaction.
fn redact(conn: &mut SqliteConnection, persistence_id: &str) -> diesel::QueryResult<usize> {
    diesel::update(state_changes::table.filter(state_changes::persistence_id.eq(persistence_id)))
        .set(state_changes::state_payload.eq(REDACTED))
        .execute(conn)
}

/// Writes one row if its revision is the expected one, and then its changes
/// to the feed: SQLite runs one writer at a time, so the feed's
/// AUTOINCREMENT positions follow commit order. A fenced row is never
/// written: SQLite serves one node, and cluster mode refuses it.
fn write_row(conn: &mut SqliteConnection, row: &RowWrite) -> diesel::QueryResult<RowOutcome> {
    if row.fence.is_some() {
        return Ok(RowOutcome::Fenced);
    }
    if let Some(fired) = &row.fired {
        if !timers::still_due(conn, row.key.as_str(), &fired.name, fired.due)? {
            return Ok(RowOutcome::TimerGone);
        }
    }
    let entity_type = row.entity_type().to_owned();
    let id = row.key.as_str();
    let written = if row.expected == 0 {
        diesel::insert_into(durable_state::table)
            .values((
                durable_state::persistence_id.eq(id),
                durable_state::entity_type.eq(&entity_type),
                durable_state::revision.eq(row.revision),
                durable_state::db_timestamp.eq(strftime(ISO_8601_MILLIS, "now")),
                durable_state::state_ser_id.eq(JSON_SERIALIZER_ID),
                durable_state::state_ser_manifest.eq(row.manifest),
                durable_state::state_payload.eq(&row.payload),
                durable_state::state_schema_version.eq(row.schema_version),
                durable_state::generation.eq(row.generation.unwrap_or(0)),
                durable_state::slice.eq(row.slice),
            ))
            .on_conflict(durable_state::persistence_id)
            .do_nothing()
            .execute(conn)?
    } else {
        let mut update = diesel::update(durable_state::table)
            .filter(durable_state::persistence_id.eq(id))
            .filter(durable_state::revision.eq(row.expected))
            .into_boxed();
        if let Some(generation) = row.generation {
            update = update.filter(durable_state::generation.eq(generation));
        }
        update
            .set((
                durable_state::revision.eq(row.revision),
                durable_state::db_timestamp.eq(strftime(ISO_8601_MILLIS, "now")),
                durable_state::state_ser_id.eq(JSON_SERIALIZER_ID),
                durable_state::state_ser_manifest.eq(row.manifest),
                durable_state::state_payload.eq(&row.payload),
                durable_state::state_schema_version.eq(row.schema_version),
                durable_state::slice.eq(row.slice),
            ))
            .execute(conn)?
    };
    if written != 1 {
        return Ok(RowOutcome::Conflict);
    }
    // An erasure erases the feed too, whether or not this store writes it:
    // another node's may.
    if row.erases {
        redact(conn, id)?;
        timers::delete_all(conn, id)?;
    }
    timers::write(conn, row)?;
    for (revision, payload) in &row.changes {
        diesel::insert_into(state_changes::table)
            .values((
                state_changes::entity_type.eq(&entity_type),
                state_changes::persistence_id.eq(id),
                state_changes::revision.eq(*revision),
                state_changes::committed_at.eq(strftime(ISO_8601_MILLIS, "now")),
                state_changes::state_payload.eq(payload),
                state_changes::state_schema_version.eq(row.schema_version),
            ))
            .execute(conn)?;
    }
    Ok(RowOutcome::Written)
}

#[async_trait]
impl SqlBackend for SqliteBackend {
    const STORE_NAME: &'static str = "SqliteStore";

    async fn write_rows(&self, rows: &[RowWrite]) -> Result<Vec<RowOutcome>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows = rows.to_vec();
        // One immediate transaction for the batch: one commit, one fsync.
        // The busy timeout, at most the operation timeout
        // (StoreConfig::validate), bounds the wait for a lock, and an error
        // from SQLite means the transaction rolled back. A blocking SQLite
        // call cannot be cancelled (nor its future dropped: diesel-async's
        // cancel guard would block), so it runs in a task of its own that
        // goes on to the end; past twice the operation timeout (a disk that
        // stalls), the answer is that the outcome is unknown.
        let transaction = tokio::spawn(async move {
            conn.spawn_blocking(move |conn| {
                conn.immediate_transaction(|conn| rows.iter().map(|row| write_row(conn, row)).collect())
            })
            .await
        });
        match tokio::time::timeout(self.no_answer_after, transaction).await {
            Ok(Ok(written)) => Ok(written?),
            Ok(Err(failed)) => Err(StoreError::OutcomeUnknown(Arc::new(failed))),
            Err(_) => Err(StoreError::OutcomeUnknown(Arc::new(NoAnswer(self.no_answer_after)))),
        }
    }

    async fn load_rows(&self, keys: &[&PersistenceId]) -> Result<HashMap<String, StateRow>, StoreError> {
        let persistence_ids: Vec<String> = keys.iter().map(|key| key.as_str().to_owned()).collect();
        let mut conn = self.checkout().await?;
        let rows = conn
            .spawn_blocking(move |conn| {
                // One read transaction: every chunk sees the same snapshot.
                conn.transaction(|conn| {
                    let mut rows = HashMap::with_capacity(persistence_ids.len());
                    for ids in persistence_ids.chunks(LOAD_CHUNK) {
                        let chunk: Vec<StateRow> = durable_state::table
                            .filter(durable_state::persistence_id.eq_any(ids))
                            .select((
                                durable_state::persistence_id,
                                durable_state::revision,
                                durable_state::generation,
                                durable_state::state_ser_id,
                                durable_state::state_schema_version,
                                durable_state::state_payload,
                            ))
                            .load(conn)?;
                        rows.extend(chunk.into_iter().map(|row| (row.persistence_id.clone(), row)));
                    }
                    Ok(rows)
                })
            })
            .await?;
        Ok(rows)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.checkout()
            .await?
            .spawn_blocking(|conn| diesel::select(1.into_sql::<Integer>()).execute(conn))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Offsets for SqliteStore {
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let consumer = consumer.to_owned();
        self.run(|backend| async move {
            let position: Option<i64> = backend
                .blocking(move |conn| {
                    feed_offsets::table
                        .filter(feed_offsets::consumer.eq(consumer))
                        .select(feed_offsets::position)
                        .get_result(conn)
                        .optional()
                })
                .await?;
            Ok(position.map(port::count))
        })
        .await
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let (consumer, position) = (consumer.to_owned(), port::bigint(position)?);
        self.run_write(move |backend| async move {
            backend
                .blocking(move |conn| {
                    diesel::insert_into(feed_offsets::table)
                        .values((
                            feed_offsets::consumer.eq(consumer),
                            feed_offsets::position.eq(position),
                            feed_offsets::updated_at.eq(strftime(ISO_8601_MILLIS, "now")),
                        ))
                        .on_conflict(feed_offsets::consumer)
                        .do_update()
                        .set((
                            feed_offsets::position.eq(excluded(feed_offsets::position)),
                            feed_offsets::updated_at.eq(excluded(feed_offsets::updated_at)),
                        ))
                        .execute(conn)
                })
                .await
                .map(drop)
        })
        .await
    }

    async fn offsets_under(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let (prefix, length) = (prefix.to_owned(), prefix_length(prefix));
        self.run(move |backend| async move {
            let rows: Vec<(String, i64)> = backend
                .blocking(move |conn| {
                    feed_offsets::table
                        .filter(substr(feed_offsets::consumer, 1, length).eq(prefix))
                        .select((feed_offsets::consumer, feed_offsets::position))
                        .load(conn)
                })
                .await?;
            Ok(rows
                .into_iter()
                .map(|(name, position)| (name, port::count(position)))
                .collect())
        })
        .await
    }

    async fn remove_offsets_below(&self, prefix: &str, below: u64) -> Result<u64, StoreError> {
        let (prefix, length, below) = (prefix.to_owned(), prefix_length(prefix), port::bigint(below)?);
        self.run_write(move |backend| async move {
            let removed = backend
                .blocking(move |conn| {
                    diesel::delete(
                        feed_offsets::table
                            .filter(substr(feed_offsets::consumer, 1, length).eq(prefix))
                            .filter(feed_offsets::position.lt(below)),
                    )
                    .execute(conn)
                })
                .await?;
            Ok(removed as u64)
        })
        .await
    }
}

#[async_trait]
impl ChangeLog for SqliteStore {
    fn feed_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.feed_signal.clone()
    }

    async fn read_change_rows(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        self.require_feed()?;
        let (entity_type, after, limit) = (entity_type.to_owned(), port::bigint(after)?, port::limit(limit));
        self.run(move |backend| async move {
            let rows: Vec<SqliteChange> = backend
                .blocking(move |conn| {
                    state_changes::table
                        .filter(state_changes::entity_type.eq(entity_type))
                        .filter(state_changes::position.gt(after))
                        .order(state_changes::position)
                        .limit(limit)
                        .select((
                            state_changes::position,
                            state_changes::persistence_id,
                            state_changes::revision,
                            state_changes::committed_at,
                            state_changes::state_schema_version,
                            state_changes::state_payload,
                        ))
                        .load(conn)
                })
                .await?;
            // Up to the first row that does not decode: see `good_prefix`.
            good_prefix(rows.into_iter().map(SqliteChange::decode))
        })
        .await
    }

    async fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        self.require_feed()?;
        self.run(|backend| async move {
            let (head, slowest): (Option<i64>, Option<i64>) = backend
                .blocking(|conn| {
                    // AUTOINCREMENT's counter: the last position given out,
                    // even once its row is trimmed.
                    let head =
                        diesel::sql_query("SELECT seq AS position FROM sqlite_sequence WHERE name = 'state_changes'")
                            .get_result::<Head>(conn)
                            .optional()?
                            .map(|head| head.position);
                    let slowest = feed_offsets::table
                        .filter(feed_offsets::consumer.not_like(format!("{KAFKA_POSITIONS}%")))
                        .select(min(feed_offsets::position))
                        .get_result(conn)?;
                    Ok((head, slowest))
                })
                .await?;
            Ok(FeedBounds {
                head: head.map_or(0, port::count),
                slowest_consumer: slowest.map(port::count),
            })
        })
        .await
    }

    async fn trim_changes(
        &self,
        through: u64,
        committed_before: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.require_feed()?;
        let (through, limit) = (port::bigint(through)?, port::limit(limit));
        let before = committed_before.map(iso_8601_millis);
        self.run_write(move |backend| async move {
            backend
                .blocking(move |conn| {
                    let mut oldest = state_changes::table
                        .filter(state_changes::position.le(through))
                        .order(state_changes::position)
                        .limit(limit)
                        .select(state_changes::position)
                        .into_boxed();
                    if let Some(before) = before {
                        oldest = oldest.filter(state_changes::committed_at.lt(before));
                    }
                    diesel::delete(state_changes::table.filter(state_changes::position.eq_any(oldest))).execute(conn)
                })
                .await
                .map(|removed| removed as u64)
        })
        .await
    }
}

/// `sqlite_sequence`'s counter of a table.
#[derive(diesel::QueryableByName)]
struct Head {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
}

#[async_trait]
impl Maintenance for SqliteStore {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let (entity_type, after) = (entity_type.to_owned(), after.map(|id| id.as_str().to_owned()));
        let written_before = iso_8601_millis(written_before);
        self.run(move |backend| async move { backend.page(entity_type, Some(written_before), after, limit).await })
            .await
    }

    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let bound = sorted_unique(rows)
            .into_iter()
            .map(|(id, revision)| Ok((id, port::bigint(revision.0)?)))
            .collect::<Result<Vec<(PersistenceId, i64)>, StoreError>>()?;
        let written_before = iso_8601_millis(written_before);
        let purged: Vec<PersistenceId> = self
            .run_write(move |backend| async move {
                let feed = backend.feed;
                // One immediate transaction: the checks and the deletes see no other
                // writer, and the feed's AUTOINCREMENT positions follow commit order.
                backend
                    .blocking(move |conn| {
                        conn.immediate_transaction(|conn| {
                            let mut purged = Vec::new();
                            for (id, revision) in bound {
                                let deleted = diesel::delete(
                                    durable_state::table
                                        .filter(durable_state::persistence_id.eq(id.as_str()))
                                        .filter(durable_state::revision.eq(revision))
                                        .filter(durable_state::db_timestamp.lt(&written_before)),
                                )
                                .execute(conn)?;
                                if deleted != 1 {
                                    continue;
                                }
                                redact(conn, id.as_str())?;
                                timers::delete_all(conn, id.as_str())?;
                                if feed {
                                    diesel::insert_into(state_changes::table)
                                        .values((
                                            state_changes::entity_type.eq(id.entity_type()),
                                            state_changes::persistence_id.eq(id.as_str()),
                                            state_changes::revision.eq(revision + 1),
                                            state_changes::committed_at.eq(strftime(ISO_8601_MILLIS, "now")),
                                            state_changes::state_payload.eq(TOMBSTONE),
                                        ))
                                        .execute(conn)?;
                                }
                                purged.push(id);
                            }
                            diesel::QueryResult::Ok(purged)
                        })
                    })
                    .await
            })
            .await?;
        if !purged.is_empty() {
            // Tombstones in the feed, with it on.
            self.signal_feed();
        }
        Ok(purged)
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let entity_type = entity_type.to_owned();
        self.run(|backend| async move {
            let count: i64 = backend
                .blocking(move |conn| {
                    durable_state::table
                        .filter(durable_state::entity_type.eq(entity_type))
                        .count()
                        .get_result(conn)
                })
                .await?;
            Ok(port::count(count))
        })
        .await
    }

    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let (entity_type, after) = (entity_type.to_owned(), after.map(str::to_owned));
        self.run(move |backend| async move {
            let page = backend.page(entity_type, None, after, limit).await?;
            Ok(page.into_iter().map(|(id, _)| id).collect())
        })
        .await
    }
}

/// `time` as the `TEXT` timestamp columns hold it ([`ISO_8601_MILLIS`]):
/// fixed width, so text order is time order and a bound compares with `<`.
pub(super) fn iso_8601_millis(time: chrono::DateTime<chrono::Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::ext::StateStoreExt;
    use crate::{UserKey, UserState};

    /// A restore batch larger than one load statement's chunk of ids is
    /// still one batch, and finds every stored row.
    #[tokio::test]
    async fn a_load_batch_of_more_ids_than_a_chunk_finds_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig::default()
            .with_max_batch_size(2 * LOAD_CHUNK + 100)
            .with_max_batch_wait(Duration::from_millis(250));
        let store = SqliteStore::open_with(dir.path().join("state.db"), config)
            .await
            .unwrap();
        let users: Vec<UserKey> = (0..2 * LOAD_CHUNK + 100)
            .map(|i| UserKey::new("mall001", format!("user{i}")).unwrap())
            .collect();
        let stored = &users[..LOAD_CHUNK + 50];
        let state = UserState::default();
        let writes = stored
            .iter()
            .map(|user| store.write(user, Revision::NONE, Revision(1), &state));
        for written in futures_util::future::join_all(writes).await {
            written.unwrap();
        }

        let before = crate::store::StateStore::stats(&store);
        let loaded = futures_util::future::join_all(users.iter().map(|user| store.load(user))).await;
        let stats = crate::store::StateStore::stats(&store);
        assert_eq!(stats.load_statements - before.load_statements, 1, "{stats:?}");
        let found: Vec<bool> = loaded.into_iter().map(|row| row.unwrap().is_some()).collect();
        let expected: Vec<bool> = (0..users.len()).map(|i| i < stored.len()).collect();
        assert_eq!(found, expected);
    }
}
