//! The production backend: PostgreSQL through diesel-async's pure-Rust
//! driver and a deadpool connection pool. Its set-up is here, its raw SQL in
//! `statements`, its statements behind the SQL store in `backend`.

use std::time::Duration;

use diesel::sql_types::Text;
use diesel::{ExpressionMethods, QueryDsl, QueryableByName};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations};

mod backend;
mod leases;
mod statements;
mod timers;
mod writer;

use super::backend::{self as port, Sealed};
use super::SqlStore;
use crate::entity::PersistenceId;
use crate::error::StoreError;
use crate::store::config::StoreConfig;
use crate::store::runtime::DbRuntime;
use crate::store::schema::postgres::durable_state;
#[cfg(test)]
use crate::store::JSON_SERIALIZER_ID;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Serialises concurrent migrations from several processes (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x7065_7273_6973_7400;

/// The production store: PostgreSQL through diesel-async's pure-Rust driver
/// and a deadpool connection pool, with group commit.
///
/// ```no_run
/// # async fn run() -> Result<(), persist_durable::StoreError> {
/// let store = persist_durable::PostgresStore::connect("postgres://postgres:postgres@localhost/persist_durable").await?;
/// # Ok(()) }
/// ```
pub type PostgresStore = SqlStore<PostgresBackend>;

/// The statements of PostgreSQL behind a [`PostgresStore`].
pub struct PostgresBackend {
    pool: Pool<AsyncPgConnection>,
    /// Group commit's write statements run on connections of their own,
    /// below diesel, where a failure keeps its SQLSTATE (see `writer`).
    writers: writer::WriterPool,
    /// The cluster node this process joined as, through this store.
    joined: std::sync::RwLock<Option<std::sync::Arc<dyn crate::store::JoinedNode>>>,
    feed: bool,
    /// How long a sent write may go unanswered before its outcome is
    /// reported unknown: twice the server's statement timeout, so the
    /// server always decides first when it can.
    no_answer_after: std::time::Duration,
}

impl Sealed for PostgresBackend {}

impl SqlStore<PostgresBackend> {
    /// Connects with [`StoreConfig::default`] and applies pending migrations.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        Self::connect_with(database_url, StoreConfig::default()).await
    }

    /// Connects with `config` and applies pending migrations.
    pub async fn connect_with(database_url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let runtime = DbRuntime::new("postgres", config.worker_threads, config.operation_timeout)?;
        let url = database_url.to_owned();
        let connect_timeout = config.connect_timeout;
        runtime.run_unbounded(migrate(url, connect_timeout)).await?;
        let backend = PostgresBackend {
            pool: connection_pool(database_url, &config)?,
            writers: writer::writer_pool(database_url, session_setup(&config), &config)?,
            joined: std::sync::RwLock::new(None),
            feed: config.change_feed,
            no_answer_after: config.operation_timeout * 2,
        };
        Ok(Self::start(backend, runtime, &config))
    }
}

/// The store's connections, each set up as the statements rely on.
///
/// - The server enforces the operation timeout, so that a write the client
///   gave up on is rolled back rather than committed later; the feed's
///   commit-ordered positions rely on READ COMMITTED.
/// - Every execution is planned for its own parameters
///   (`plan_cache_mode = force_custom_plan`). diesel keeps the DSL's
///   statements prepared, and after five executions PostgreSQL may switch a
///   prepared statement to a generic plan chosen from the table's size at
///   that moment and keep it for the life of the connection: restores on a
///   table that was empty or just truncated were seen sequentially scanning
///   it long after it held a hundred thousand rows. Parsing stays cached; a
///   key lookup plans in microseconds.
fn connection_pool(database_url: &str, config: &StoreConfig) -> Result<Pool<AsyncPgConnection>, StoreError> {
    let setup = session_setup(config);
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.custom_setup = Box::new(move |url| {
        let (url, setup) = (url.to_owned(), setup.clone());
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(&url).await?;
            conn.batch_execute(&setup)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        })
    });
    config.build_pool(AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        database_url,
        manager_config,
    ))
}

/// The session settings every connection of the store starts with (see
/// [`connection_pool`]).
fn session_setup(config: &StoreConfig) -> String {
    let limit_ms = config.operation_timeout.as_millis().max(1);
    format!(
        "SET statement_timeout = {limit_ms}; SET lock_timeout = {limit_ms}; \
         SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED; \
         SET plan_cache_mode = force_custom_plan;"
    )
}

/// Applies the pending migrations, one after another, each logged, then
/// rebuilds any index a failed concurrent build left INVALID.
///
/// Only the connection is bounded in time: a migration that converts or
/// indexes a large existing table may take minutes, and cutting it short
/// would only roll it back to be tried again at the next start. Indexes on
/// tables that may be large are built `CONCURRENTLY` (their migrations run
/// outside a transaction), so writers go on meanwhile.
///
/// One process migrates at a time. The others wait for it by trying the
/// migration lock again and again, never inside `pg_advisory_lock`: a
/// session waiting there holds a snapshot, which a concurrent index build of
/// the migrating session waits for, and the two would deadlock.
async fn migrate(url: String, connect_timeout: Duration) -> Result<(), StoreError> {
    let mut conn = tokio::time::timeout(connect_timeout, AsyncPgConnection::establish(&url))
        .await
        .map_err(|_| StoreError::Timeout(connect_timeout))?
        .map_err(StoreError::unavailable)?;
    take_migration_lock(&mut conn).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = super::apply_migrations(&mut harness, MIGRATIONS);
    let mut conn = harness.into_inner();
    let repaired = match applied {
        Ok(()) => match rebuild_invalid_indexes(&mut conn).await {
            Ok(()) => backfill_slices(&mut conn).await,
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    // Released with the session in any case; this only releases it sooner.
    conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await?;
    repaired
}

/// How long a process waits between two tries of the migration lock.
const MIGRATION_LOCK_RETRY: Duration = Duration::from_millis(50);

/// Takes the session's migration lock, trying until no other process holds it.
async fn take_migration_lock(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let mut waiting_since = None;
    loop {
        let Locked { locked } = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK_KEY)
            .get_result(conn)
            .await?;
        if locked {
            if let Some(since) = waiting_since {
                tracing::info!(waited = ?std::time::Instant::elapsed(&since), "took the migration lock");
            }
            return Ok(());
        }
        if waiting_since.is_none() {
            tracing::info!("another process is migrating this database; waiting for it");
            waiting_since = Some(std::time::Instant::now());
        }
        tokio::time::sleep(MIGRATION_LOCK_RETRY).await;
    }
}

/// Rebuilds, concurrently, each index of the crate's tables that a failed
/// `CREATE INDEX CONCURRENTLY` (or `REINDEX CONCURRENTLY`) left INVALID:
/// PostgreSQL keeps such an index up to date but never reads it, and
/// `CREATE INDEX ... IF NOT EXISTS` skips it. The copies a failed
/// `REINDEX CONCURRENTLY` leaves (`_ccnew`, `_ccold`) are dropped.
async fn rebuild_invalid_indexes(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    #[derive(QueryableByName)]
    struct Invalid {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let invalid: Vec<Invalid> = diesel::sql_query(
        "SELECT c.relname AS name FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid \
         WHERE NOT i.indisvalid AND t.relnamespace = current_schema()::regnamespace \
           AND t.relname = ANY($1) ORDER BY c.relname",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(CRATE_TABLES)
    .load(conn)
    .await?;
    for Invalid { name } in invalid {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let leftover = name.contains("_ccnew") || name.contains("_ccold");
        let statement = if leftover {
            format!("DROP INDEX CONCURRENTLY IF EXISTS {quoted}")
        } else {
            format!("REINDEX INDEX CONCURRENTLY {quoted}")
        };
        tracing::warn!(index = %name, %statement, "an index is INVALID (a concurrent build failed); rebuilding it");
        let started = std::time::Instant::now();
        conn.batch_execute(&statement).await?;
        tracing::info!(index = %name, took = ?started.elapsed(), "index rebuilt");
    }
    Ok(())
}

/// Rows a slice backfill updates per statement.
const BACKFILL_CHUNK: i64 = 10_000;

/// Fills in the slice of every row written before rows had one, a chunk per
/// statement (each its own transaction, so writers are never held for
/// long): the slice is Pekko's hash of the persistence id, computed here.
/// Every write sets it too, so this finds work only once per database, or
/// after rows were written by a release from before slices.
async fn backfill_slices(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    #[derive(QueryableByName)]
    struct Unsliced {
        #[diesel(sql_type = Text)]
        persistence_id: String,
    }
    let mut filled = 0;
    loop {
        let rows: Vec<Unsliced> =
            diesel::sql_query("SELECT persistence_id FROM durable_state WHERE slice IS NULL LIMIT $1")
                .bind::<diesel::sql_types::BigInt, _>(BACKFILL_CHUNK)
                .load(conn)
                .await?;
        if rows.is_empty() {
            if filled > 0 {
                tracing::info!(rows = filled, "filled in the slices of rows from before slices");
            }
            return Ok(());
        }
        let slices: Vec<i32> = rows
            .iter()
            .map(|row| i32::from(crate::entity::Slice::of(&row.persistence_id).index()))
            .collect();
        let ids: Vec<String> = rows.into_iter().map(|row| row.persistence_id).collect();
        filled += diesel::sql_query(
            "UPDATE durable_state AS d SET slice = v.slice FROM unnest($1::text[], $2::integer[]) AS v(id, slice) \
             WHERE d.persistence_id = v.id AND d.slice IS NULL",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(&ids)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(&slices)
        .execute(conn)
        .await?;
    }
}

/// The tables the crate's migrations create.
const CRATE_TABLES: &[&str] = &[
    "durable_state",
    "state_changes",
    "feed_head",
    "feed_offsets",
    "cluster_nodes",
    "cluster_slices",
    "cluster_leases",
];

impl PostgresBackend {
    /// One page of an entity type's ids and revisions in persistence id
    /// order after `after`, with `written_before` only rows last written
    /// before it: served by the `(entity_type, persistence_id)` index.
    async fn page(
        &self,
        entity_type: String,
        written_before: Option<chrono::DateTime<chrono::Utc>>,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, crate::Revision)>, StoreError> {
        let mut conn = self.checkout().await?;
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
        let rows: Vec<(String, i64)> = query.load(&mut conn).await?;
        rows.into_iter()
            .map(|(id, revision)| port::stored_key(id, revision))
            .collect()
    }

    async fn checkout(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool.get().await.map_err(StoreError::unavailable)
    }
}

/// A write sent to the server that got no answer in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the database within {0:?} of sending the write")]
struct NoAnswer(std::time::Duration);

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = Text)]
    persistence_id: String,
}

#[cfg(test)]
mod tests {
    use super::statements::WRITE_ROWS_SQL;
    use super::*;
    use crate::store::sql::backend::{RowWrite, SqlBackend};

    /// `DATABASE_URL` with every connection's `search_path` set to a schema
    /// of its own, created here (dropped by the caller); `None`, loudly, when
    /// there is no PostgreSQL to use outside CI.
    async fn scratch_schema(name: &str) -> Option<(String, AsyncPgConnection)> {
        let url = match std::env::var("DATABASE_URL") {
            Ok(url) if url.starts_with("postgres") => url,
            _ if std::env::var_os("CI").is_some() => panic!("PostgreSQL is required in CI: set DATABASE_URL"),
            _ => {
                eprintln!("\n*** SKIPPED a PostgreSQL test: DATABASE_URL is not set. ***\n");
                return None;
            }
        };
        let schema = format!("{name}_{}", std::process::id());
        let mut admin = AsyncPgConnection::establish(&url).await.expect("DATABASE_URL connects");
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
            ))
            .await
            .unwrap();
        let separator = if url.contains('?') { '&' } else { '?' };
        Some((format!("{url}{separator}options=-csearch_path%3D{schema}"), admin))
    }

    use diesel::sql_types::BigInt;

    #[derive(QueryableByName, Debug)]
    struct PlanCounts {
        #[diesel(sql_type = BigInt)]
        generic_plans: i64,
        #[diesel(sql_type = BigInt)]
        custom_plans: i64,
    }

    /// Restores and writes are parsed once per connection and planned for
    /// each batch. A generic plan is made once, from the table's size at that
    /// moment, and kept by the connection: on an empty table it can be a
    /// sequential scan that restores then run long after the table has grown.
    #[tokio::test(flavor = "multi_thread")]
    async fn statements_stay_prepared_and_are_planned_for_each_batch() {
        let Some((url, mut admin)) = scratch_schema("plans").await else {
            return;
        };
        migrate(url.clone(), Duration::from_secs(5)).await.unwrap();
        let config = StoreConfig::default().with_pool_size(1);
        let backend = PostgresBackend {
            pool: connection_pool(&url, &config).unwrap(),
            writers: writer::writer_pool(&url, session_setup(&config), &config).unwrap(),
            joined: std::sync::RwLock::new(None),
            feed: false,
            no_answer_after: config.operation_timeout,
        };
        // More executions than PostgreSQL's five custom plans before it
        // considers a generic one, on the empty table.
        for batch in 0..10 {
            let ids: Vec<_> = (0..5)
                .map(|i| crate::PersistenceId::new("UserState", &format!("m-u{batch}x{i}")))
                .collect();
            assert!(backend
                .load_rows(&ids.iter().collect::<Vec<_>>())
                .await
                .unwrap()
                .is_empty());
        }
        for revision in 1..=7 {
            let row = RowWrite {
                key: crate::PersistenceId::new("UserState", "m-u"),
                manifest: "UserState/v1",
                expected: revision - 1,
                generation: Some(7),
                revision,
                schema_version: 1,
                payload: b"{}".to_vec(),
                changes: Vec::new(),
                erases: false,
                slice: 0,
                fence: None,
                timers: Vec::new(),
                fired: None,
            };
            assert_eq!(
                backend.write_rows(&[row]).await.unwrap(),
                [crate::store::RowOutcome::Written]
            );
        }
        let plans = |pattern: &'static str| {
            let backend = &backend;
            async move {
                diesel::sql_query(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
                     WHERE statement LIKE $1 AND statement NOT LIKE '%pg_prepared_statements%'",
                )
                .bind::<Text, _>(pattern)
                .load::<PlanCounts>(&mut backend.checkout().await.unwrap())
                .await
                .unwrap()
            }
        };
        let restores = plans("%= ANY%").await;
        // The writes run on a writer connection of their own.
        let writes: Vec<PlanCounts> = backend
            .writers
            .get()
            .await
            .unwrap()
            .client()
            .query(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE 'WITH input AS%'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| PlanCounts {
                generic_plans: row.get(0),
                custom_plans: row.get(1),
            })
            .collect();
        admin
            .batch_execute(&format!("DROP SCHEMA plans_{} CASCADE", std::process::id()))
            .await
            .unwrap();
        assert_eq!(
            restores.len(),
            1,
            "the restore statement is kept prepared: {restores:?}"
        );
        assert_eq!(restores[0].generic_plans, 0, "{restores:?}");
        assert_eq!(restores[0].custom_plans, 10, "{restores:?}");
        assert_eq!(writes.len(), 1, "the write statement is kept prepared: {writes:?}");
        assert_eq!(writes[0].generic_plans, 0, "{writes:?}");
        assert_eq!(writes[0].custom_plans, 7, "{writes:?}");
    }

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// BENCHMARKS.md compares the library with pgbench running this statement:
    /// the two must not drift apart.
    #[test]
    fn the_ceiling_script_runs_the_librarys_write_statement() {
        let script = include_str!("../../../../bench/scripts/pg-ceiling.sh");
        let from_inserted = &WRITE_ROWS_SQL[WRITE_ROWS_SQL.find("), inserted AS (").unwrap()..];
        let until_redacted = &from_inserted[..from_inserted.find("), written AS (").unwrap()];
        let with_constants = until_redacted.replace("$11", &JSON_SERIALIZER_ID.to_string());
        assert!(
            words(script).contains(&words(&with_constants)),
            "bench/scripts/pg-ceiling.sh no longer runs the library's write statement"
        );
    }
}
