use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use diesel::dsl::now;
use diesel::sql_types::{Array, BigInt, Binary, Integer, Text};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods, IntoSql, OptionalExtension, QueryDsl, QueryableByName};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

mod prepared_sql;

use self::prepared_sql::PreparedSql;
use super::group_commit::{FeedRow, GroupCommit, RowWrite, SqlBackend};
use super::row::StateRow;
use super::runtime::DbRuntime;
use super::schema::postgres::{durable_state, feed_offsets, state_changes};
use super::{StoreConfig, JSON_SERIALIZER_ID};
use crate::error::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Serialises concurrent migrations from several processes (an arbitrary, fixed key).
const MIGRATION_LOCK_KEY: i64 = 0x7065_7273_6973_7400;

// The two write statements below are the only raw SQL queries of this
// backend (besides session commands: the `SET`s of a new connection and the
// migration lock); every other statement is written with diesel's query DSL
// against `schema::postgres`. The DSL cannot express them: they read the batch from
// `unnest` of array binds (one bind per column, so a batch of any size is one
// statement with a fixed text, prepared once) and chain data-modifying CTEs
// (`INSERT ... ON CONFLICT DO NOTHING RETURNING`, `UPDATE ... FROM ...
// RETURNING`, then the `feed_head` update and the feed insert, which number
// the changes after the rows actually written) whose results the final
// SELECT returns. diesel 2.3 has no `WITH`, no set-returning function as a
// FROM source, no `UPDATE ... FROM`, and cannot use an `INSERT`/`UPDATE ...
// RETURNING` as a subquery. tests/raw_statements.rs runs both on a fresh
// database: new rows, a row at its expected revision and two conflicts in
// one batch, with the feed's rows checked.
// The retention purge's two statements (`PURGE_ROWS_SQL`,
// `PURGE_ROWS_WITH_FEED_SQL`, after the writes) are raw SQL for the same
// reasons: `unnest` of (id, revision) pairs, a locking CTE, `DELETE ...
// USING ... RETURNING` feeding the `feed_head` update and the feed insert.

/// The revision-checked writes of a batch, shared by both write statements.
///
/// Lock order: two statements that take row locks in opposite orders can
/// deadlock, and an `UPDATE ... FROM` takes its locks in an order its plan
/// picks (a nested loop over `input` in the batch's order, a hash join that
/// probes with a scan of `durable_state` in the table's physical order), so
/// sorting the batch is not enough. The statement works in three phases, each
/// in persistence id order whatever the plan (`COLLATE "C"`: byte order, the
/// order the batch is already sorted in, so the sorts are one pass):
/// 1. `inserted` inserts the new rows in order. It can wait only for another
///    transaction's uncommitted insert or update of the same id.
/// 2. `locked` locks the rows to update: `FOR UPDATE` with `ORDER BY` puts
///    the LockRows node above the Sort, so rows are locked one by one in
///    order, whatever the join below. It first reads `inserted` to the end
///    (the `count(*)`, evaluated below the Sort), so every insert is done
///    before the first lock. A row at another revision is not returned.
/// 3. `updated` updates only rows that `locked` returned, whose locks this
///    transaction already holds, so it waits for nobody (it may update a row
///    before `locked` has locked the next). It finds each by the `ctid` of
///    the version `locked` locked, a TID scan instead of a second index
///    lookup: a locked, live row version keeps its `ctid` until this
///    transaction ends. With the feed, `head` takes the
///    `feed_head` lock after all of this, and its holder waits for nobody.
///
/// No cycle of waits is possible. Place a waiting statement at (phase, id):
/// one waiting in phase 1 at `k` waits for a transaction that inserted `k`
/// (so it is in phase 1 past `k`, or later) or updated it (phase 2 or
/// later); one waiting in phase 2 at `k` waits for a holder of `k`'s row
/// lock (in phase 2 past `k`, or later; an uncommitted insert is invisible to
/// `locked`, which never waits for it). Every wait is for a statement
/// strictly further along, so waits cannot go round in a circle. Each write
/// statement is its own transaction, and no other statement of this backend
/// locks rows of `durable_state` but the purge ([`purge_ctes`]), which takes
/// its locks as phase 2 does and `feed_head`'s after them.
/// tests/deadlock.rs runs two stores whose plans took the old statement's
/// locks in opposite orders.
macro_rules! write_ctes {
    () => {
        "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[], $6::text[], $7::integer[])
        AS t(persistence_id, expected, revision, payload, entity_type, manifest, schema_version)
), inserted AS (
    INSERT INTO durable_state
        (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload,
         state_schema_version)
    SELECT persistence_id, entity_type, revision, now(), $8, manifest, payload, schema_version
    FROM input WHERE expected = 0
    ORDER BY persistence_id COLLATE \"C\"
    ON CONFLICT (persistence_id) DO NOTHING
    RETURNING persistence_id
), locked AS (
    SELECT d.ctid AS row_id, i.persistence_id, i.expected, i.revision, i.payload, i.manifest, i.schema_version
    FROM input AS i JOIN durable_state AS d ON d.persistence_id = i.persistence_id AND d.revision = i.expected
    WHERE i.expected <> 0 AND (SELECT count(*) FROM inserted) >= 0
    ORDER BY d.persistence_id COLLATE \"C\"
    FOR UPDATE OF d
), updated AS (
    UPDATE durable_state AS d
    SET revision = l.revision, db_timestamp = now(), state_ser_id = $8, state_ser_manifest = l.manifest,
        state_payload = l.payload, state_schema_version = l.schema_version
    FROM locked AS l
    WHERE d.ctid = l.row_id AND d.revision = l.expected
    RETURNING d.persistence_id
)"
    };
}

/// Raw SQL (see above): the batched, revision-checked write without the feed.
const WRITE_ROWS_SQL: &str = concat!(
    write_ctes!(),
    "
SELECT persistence_id FROM inserted UNION ALL SELECT persistence_id FROM updated"
);

/// Raw SQL (see above): the same write, plus one change feed row per committed revision
/// (binds 9 to 12: persistence ids, entity types, revisions, payloads; each
/// change has its row's schema version).
/// Positions come from `feed_head`, whose row lock is held until commit: feed
/// writers commit one after another, so positions appear gapless and in
/// commit order, and a rolled-back statement rolls its positions back.
const WRITE_ROWS_WITH_FEED_SQL: &str = concat!(
    write_ctes!(),
    ", written AS (
    SELECT persistence_id FROM inserted UNION ALL SELECT persistence_id FROM updated
), changes AS (
    SELECT c.persistence_id, c.entity_type, c.revision, c.payload, i.schema_version, c.ord
    FROM unnest($9::text[], $10::text[], $11::bigint[], $12::bytea[])
        WITH ORDINALITY AS c(persistence_id, entity_type, revision, payload, ord)
    JOIN input AS i ON i.persistence_id = c.persistence_id
    WHERE c.persistence_id IN (SELECT persistence_id FROM written)
), head AS (
    UPDATE feed_head SET position = position + (SELECT count(*) FROM changes) WHERE id = 1
    RETURNING position - (SELECT count(*) FROM changes) AS base
), feed AS (
    INSERT INTO state_changes
        (position, entity_type, persistence_id, revision, committed_at, state_payload, state_schema_version)
    SELECT head.base + row_number() OVER (ORDER BY changes.ord), changes.entity_type, changes.persistence_id,
           changes.revision, now(), changes.payload, changes.schema_version
    FROM changes CROSS JOIN head
)
SELECT persistence_id FROM written"
);

/// The retention purge's deletes, shared by both purge statements (raw SQL:
/// see above). Binds: `$1` persistence ids (unique), `$2` the revision each
/// was found at, `$3` the cutoff. A row is deleted only if it still has that
/// revision and was still last written before the cutoff, so a row written
/// meanwhile by any node is kept.
///
/// `locked` locks the rows one by one in persistence id order, the order of
/// a write's phase 2 (see [`write_ctes`]), so a purge and writes never wait
/// for each other in a circle; `MATERIALIZED` keeps the locking step, and its
/// order, a step of its own whatever the planner does. A row a concurrent
/// write changed is re-checked once its lock is had (READ COMMITTED reads
/// the newest version then) and, at another revision, not returned.
macro_rules! purge_ctes {
    () => {
        "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[]) AS t(persistence_id, revision)
), locked AS MATERIALIZED (
    SELECT d.persistence_id, d.revision
    FROM input AS i JOIN durable_state AS d ON d.persistence_id = i.persistence_id AND d.revision = i.revision
    WHERE d.db_timestamp < $3
    ORDER BY d.persistence_id COLLATE \"C\"
    FOR UPDATE OF d
), purged AS (
    DELETE FROM durable_state AS d USING locked AS l
    WHERE d.persistence_id = l.persistence_id AND d.revision = l.revision AND d.db_timestamp < $3
    RETURNING d.persistence_id, d.entity_type, d.revision
)"
    };
}

/// Raw SQL (see above): the retention purge without the feed.
const PURGE_ROWS_SQL: &str = concat!(
    purge_ctes!(),
    "
SELECT persistence_id FROM purged"
);

/// Raw SQL (see above): the purge, plus one feed row per purged entity: the
/// next revision, with the tombstone payload `$4`, so a consumer sees the
/// entity deleted. Positions come from `feed_head`, as for writes: gapless
/// and in commit order.
const PURGE_ROWS_WITH_FEED_SQL: &str = concat!(
    purge_ctes!(),
    ", head AS (
    UPDATE feed_head SET position = position + (SELECT count(*) FROM purged) WHERE id = 1
    RETURNING position - (SELECT count(*) FROM purged) AS base
), feed AS (
    INSERT INTO state_changes (position, entity_type, persistence_id, revision, committed_at, state_payload)
    SELECT head.base + row_number() OVER (ORDER BY purged.persistence_id COLLATE \"C\"), purged.entity_type,
           purged.persistence_id, purged.revision + 1, now(), $4
    FROM purged CROSS JOIN head
)
SELECT persistence_id FROM purged"
);

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
    /// Connects with [`StoreConfig::default`] and applies pending migrations.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        Self::connect_with(database_url, StoreConfig::default()).await
    }

    /// Connects with `config` and applies pending migrations.
    pub async fn connect_with(database_url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
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
        let pool = connection_pool(database_url, &config)?;
        let backend = PgBackend {
            pool,
            feed: config.change_feed,
            no_answer_after: config.operation_timeout * 2,
        };
        let group_commit = GroupCommit::start(Arc::new(backend), runtime, &config);
        Ok(Self { group_commit })
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
    let limit_ms = config.operation_timeout.as_millis().max(1);
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(&url).await?;
            conn.batch_execute(&format!(
                "SET statement_timeout = {limit_ms}; SET lock_timeout = {limit_ms}; \
                 SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED; \
                 SET plan_cache_mode = force_custom_plan;"
            ))
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

async fn migrate(url: String) -> Result<(), StoreError> {
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .map_err(StoreError::unavailable)?;
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map(drop)
        .map_err(|e| StoreError::Migration(std::sync::Arc::from(e)));
    let mut conn = harness.into_inner();
    conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await?;
    applied
}

super::delegate_to_group_commit!(PostgresStore);
super::typed_access!(PostgresStore);

struct PgBackend {
    pool: Pool<AsyncPgConnection>,
    feed: bool,
    /// How long a sent write may go unanswered before its outcome is
    /// reported unknown: twice the server's statement timeout, so the
    /// server always decides first when it can.
    no_answer_after: std::time::Duration,
}

impl PgBackend {
    /// One page of an entity type's ids and revisions in persistence id
    /// order after `after`, with `written_before` only rows last written
    /// before it: served by the `(entity_type, persistence_id)` index.
    async fn page(
        &self,
        entity_type: String,
        written_before: Option<chrono::DateTime<chrono::Utc>>,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut conn = self.checkout().await?;
        let mut query = durable_state::table
            .filter(durable_state::entity_type.eq(entity_type))
            .order(durable_state::persistence_id)
            .limit(limit)
            .select((durable_state::persistence_id, durable_state::revision))
            .into_boxed();
        if let Some(written_before) = written_before {
            query = query.filter(durable_state::db_timestamp.lt(written_before));
        }
        if let Some(after) = after {
            query = query.filter(durable_state::persistence_id.gt(after));
        }
        Ok(query.load(&mut conn).await?)
    }

    async fn checkout(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool.get().await.map_err(StoreError::unavailable)
    }
}

/// A write sent to the server that got no answer in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the database within {0:?} of sending the write")]
struct NoAnswer(std::time::Duration);

/// Classifies the failure of a write statement that was sent. An error the
/// server reported (it has a SQLSTATE) means the statement rolled back; one
/// without (the connection broke) leaves the outcome unknown.
fn sent_write_error(error: diesel::result::Error) -> StoreError {
    use diesel::result::{DatabaseErrorKind, Error};
    match error {
        Error::DatabaseError(DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection, _) => {
            StoreError::OutcomeUnknown(Arc::new(error))
        }
        Error::DatabaseError(..) => error.into(),
        // The statement ran, its answer could not be read.
        other => StoreError::OutcomeUnknown(Arc::new(other)),
    }
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = Text)]
    persistence_id: String,
}

/// A change feed row, as `read_changes` selects it.
#[derive(diesel::Queryable)]
struct PgChange {
    position: i64,
    persistence_id: String,
    revision: i64,
    committed_at: chrono::DateTime<chrono::Utc>,
    state_schema_version: i32,
    state_payload: Vec<u8>,
}

#[async_trait]
impl SqlBackend for PgBackend {
    async fn write_rows(&self, rows: &[RowWrite]) -> Result<Vec<bool>, StoreError> {
        // Bounded by the pool's wait timeout, apart from the statement:
        // nothing is sent until a connection is had.
        let mut conn = self.checkout().await?;
        // Every array is bound borrowed from the rows: no per-row copies.
        let ids: Vec<&str> = rows.iter().map(|row| row.persistence_id.as_str()).collect();
        let write = PreparedSql::new(if self.feed {
            WRITE_ROWS_WITH_FEED_SQL
        } else {
            WRITE_ROWS_SQL
        })
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(rows.iter().map(|row| row.expected).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(rows.iter().map(|row| row.revision).collect::<Vec<_>>())
        .bind::<Array<Binary>, _>(rows.iter().map(|row| row.payload.as_slice()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(rows.iter().map(|row| row.entity_type()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(rows.iter().map(|row| row.manifest).collect::<Vec<_>>())
        .bind::<Array<Integer>, _>(rows.iter().map(|row| row.schema_version).collect::<Vec<_>>())
        .bind::<Integer, _>(JSON_SERIALIZER_ID);
        let write = if self.feed {
            let changes = || {
                rows.iter()
                    .flat_map(|row| row.changes.iter().map(move |change| (row, change)))
            };
            write
                .bind::<Array<Text>, _>(
                    changes()
                        .map(|(row, _)| row.persistence_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind::<Array<Text>, _>(changes().map(|(row, _)| row.entity_type()).collect::<Vec<_>>())
                .bind::<Array<BigInt>, _>(changes().map(|(_, (revision, _))| *revision).collect::<Vec<_>>())
                .bind::<Array<Binary>, _>(
                    changes()
                        .map(|(_, (_, payload))| payload.as_slice())
                        .collect::<Vec<_>>(),
                )
        } else {
            write
        };
        let written: Vec<Written> = match tokio::time::timeout(self.no_answer_after, write.load(&mut conn)).await {
            Ok(answer) => answer.map_err(sent_write_error)?,
            Err(_) => return Err(StoreError::OutcomeUnknown(Arc::new(NoAnswer(self.no_answer_after)))),
        };
        let written: std::collections::HashSet<String> = written.into_iter().map(|w| w.persistence_id).collect();
        Ok(ids.iter().map(|id| written.contains(*id)).collect())
    }

    async fn load_rows(&self, persistence_ids: Vec<String>) -> Result<HashMap<String, StateRow>, StoreError> {
        let mut conn = self.checkout().await?;
        // `eq_any` of a `Vec` is `= ANY($1)` on PostgreSQL: one array bind,
        // one round trip for the whole batch.
        let rows: Vec<StateRow> = durable_state::table
            .filter(durable_state::persistence_id.eq_any(persistence_ids))
            .select((
                durable_state::persistence_id,
                durable_state::revision,
                durable_state::state_ser_id,
                durable_state::state_schema_version,
                durable_state::state_payload,
            ))
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|row| (row.persistence_id.clone(), row)).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        diesel::select(1.into_sql::<Integer>())
            .execute(&mut self.checkout().await?)
            .await?;
        Ok(())
    }

    async fn read_changes(&self, entity_type: String, after: i64, limit: i64) -> Result<Vec<FeedRow>, StoreError> {
        let mut conn = self.checkout().await?;
        let rows: Vec<PgChange> = state_changes::table
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
            .load(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| FeedRow {
                position: r.position,
                persistence_id: r.persistence_id,
                revision: r.revision,
                committed_at: r.committed_at,
                state_schema_version: r.state_schema_version,
                state_payload: r.state_payload,
            })
            .collect())
    }

    async fn load_offset(&self, consumer: String) -> Result<Option<i64>, StoreError> {
        let mut conn = self.checkout().await?;
        let position = feed_offsets::table
            .filter(feed_offsets::consumer.eq(consumer))
            .select(feed_offsets::position)
            .get_result(&mut conn)
            .await
            .optional()?;
        Ok(position)
    }

    async fn save_offset(&self, consumer: String, position: i64) -> Result<(), StoreError> {
        let mut conn = self.checkout().await?;
        // `now` is the server's CURRENT_TIMESTAMP (the same as `now()`).
        diesel::insert_into(feed_offsets::table)
            .values((
                feed_offsets::consumer.eq(consumer),
                feed_offsets::position.eq(position),
                feed_offsets::updated_at.eq(now),
            ))
            .on_conflict(feed_offsets::consumer)
            .do_update()
            .set((
                feed_offsets::position.eq(excluded(feed_offsets::position)),
                feed_offsets::updated_at.eq(now),
            ))
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    async fn purge_candidates(
        &self,
        entity_type: String,
        written_before: chrono::DateTime<chrono::Utc>,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.page(entity_type, Some(written_before), after, limit).await
    }

    async fn purge_rows(
        &self,
        rows: Vec<(crate::PersistenceId, i64)>,
        written_before: chrono::DateTime<chrono::Utc>,
        tombstone: Option<&'static [u8]>,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.checkout().await?;
        let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
        let revisions: Vec<i64> = rows.iter().map(|(_, revision)| *revision).collect();
        let purge = diesel::sql_query(if tombstone.is_some() {
            PURGE_ROWS_WITH_FEED_SQL
        } else {
            PURGE_ROWS_SQL
        })
        .into_boxed()
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&revisions)
        .bind::<diesel::sql_types::Timestamptz, _>(written_before);
        let purge = match tombstone {
            Some(payload) => purge.bind::<Binary, _>(payload),
            None => purge,
        };
        let purged: Vec<Written> = purge.load(&mut conn).await?;
        Ok(purged.into_iter().map(|row| row.persistence_id).collect())
    }

    async fn count_entities(&self, entity_type: String) -> Result<i64, StoreError> {
        let mut conn = self.checkout().await?;
        Ok(durable_state::table
            .filter(durable_state::entity_type.eq(entity_type))
            .count()
            .get_result(&mut conn)
            .await?)
    }

    async fn entity_ids(
        &self,
        entity_type: String,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.page(entity_type, None, after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        migrate(url.clone()).await.unwrap();
        let config = StoreConfig::default().with_pool_size(1);
        let backend = PgBackend {
            pool: connection_pool(&url, &config).unwrap(),
            feed: false,
            no_answer_after: config.operation_timeout,
        };
        // More executions than PostgreSQL's five custom plans before it
        // considers a generic one, on the empty table.
        for batch in 0..10 {
            let ids = (0..5).map(|i| format!("UserState|m-u{batch}x{i}")).collect();
            assert!(backend.load_rows(ids).await.unwrap().is_empty());
        }
        for revision in 1..=7 {
            let row = RowWrite {
                persistence_id: crate::PersistenceId::new("UserState", "m-u"),
                manifest: "UserState/v1",
                expected: revision - 1,
                revision,
                schema_version: 1,
                payload: b"{}".to_vec(),
                changes: Vec::new(),
            };
            assert_eq!(backend.write_rows(&[row]).await.unwrap(), [true]);
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
        let (restores, writes) = (plans("%= ANY%").await, plans("WITH input AS%").await);
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
        let script = include_str!("../../scripts/pg-ceiling.sh");
        let from_inserted = &WRITE_ROWS_SQL[WRITE_ROWS_SQL.find("), inserted AS (").unwrap()..];
        let with_constants = from_inserted.replace("$8", &JSON_SERIALIZER_ID.to_string());
        assert!(
            words(script).contains(&words(&with_constants)),
            "scripts/pg-ceiling.sh no longer runs the library's write statement"
        );
    }
}
