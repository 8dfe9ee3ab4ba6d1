//! The PostgreSQL statements: the batches group commit sends, and every
//! other capability of a [`PostgresStore`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use diesel::dsl::min;
use diesel::dsl::now;
use diesel::sql_types::{Array, BigInt, Binary, Integer, Text};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods, IntoSql, OptionalExtension, QueryDsl, TextExpressionMethods};
use diesel_async::RunQueryDsl;
use tokio_postgres::types::ToSql;

use super::statements::{PURGE_ROWS_SQL, PURGE_ROWS_WITH_FEED_SQL, WRITE_ROWS_SQL, WRITE_ROWS_WITH_FEED_SQL};
use super::writer::sent_write_error;
use super::{NoAnswer, PostgresBackend, PostgresStore, Written};
use crate::entity::{PersistenceId, Revision};
use crate::error::StoreError;
use crate::store::payload::TOMBSTONE;
use crate::store::rows::{good_prefix, ChangeRow, RowOutcome, TimerChange};
use crate::store::schema::postgres::{durable_state, feed_head, feed_offsets, state_changes};
use crate::store::sql::backend::{self as port, FeedRow, RowWrite, SqlBackend, StateRow};
use crate::store::JSON_SERIALIZER_ID;
use crate::store::{ChangeLog, Maintenance, Offsets};
use crate::store::{FeedBounds, KAFKA_POSITIONS};

diesel::define_sql_function! {
    /// PostgreSQL's `substr`: `length` characters of `text` from `start` (1
    /// the first), to match a name's prefix exactly (`LIKE` would take `_`
    /// and `%` in it for patterns).
    fn substr(text: Text, start: Integer, length: Integer) -> Text;
}

/// The characters of a name prefix, as `substr` counts them.
fn prefix_length(prefix: &str) -> i32 {
    // Longer than any name stored: matches none, as it should.
    i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX)
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
impl SqlBackend for PostgresBackend {
    const STORE_NAME: &'static str = "PostgresStore";

    async fn write_rows(&self, rows: &[RowWrite]) -> Result<Vec<RowOutcome>, StoreError> {
        // Bounded by the pool's wait timeout, apart from the statement:
        // nothing is sent until a connection is had.
        let mut conn = self.writers.get().await.map_err(StoreError::unavailable)?;
        let sql = if self.feed {
            WRITE_ROWS_WITH_FEED_SQL
        } else {
            WRITE_ROWS_SQL
        };
        let statement = conn.statement(sql).await.map_err(sent_write_error)?;
        // Every array is bound borrowed from the rows: no per-row copies.
        let ids: Vec<&str> = rows.iter().map(|row| row.key.as_str()).collect();
        let expected: Vec<i64> = rows.iter().map(|row| row.expected).collect();
        let revisions: Vec<i64> = rows.iter().map(|row| row.revision).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|row| row.payload.as_slice()).collect();
        let entity_types: Vec<&str> = rows.iter().map(RowWrite::entity_type).collect();
        let manifests: Vec<&str> = rows.iter().map(|row| row.manifest).collect();
        let schema_versions: Vec<i32> = rows.iter().map(|row| row.schema_version).collect();
        let generations: Vec<Option<i64>> = rows.iter().map(|row| row.generation).collect();
        let slices: Vec<i32> = rows.iter().map(|row| row.slice).collect();
        let fence_epochs: Vec<Option<i64>> = rows
            .iter()
            .map(|row| row.fence.as_ref().map(|(_, epoch)| *epoch))
            .collect();
        let node: Option<&str> = rows.iter().find_map(|row| row.fence.as_ref().map(|(node, _)| &**node));
        let erasing: Vec<&str> = rows
            .iter()
            .filter(|row| row.erases)
            .map(|row| row.key.as_str())
            .collect();
        let changes = || {
            rows.iter()
                .flat_map(|row| row.changes.iter().map(move |change| (row, change)))
        };
        let change_ids: Vec<&str> = changes().map(|(row, _)| row.key.as_str()).collect();
        let change_types: Vec<&str> = changes().map(|(row, _)| row.entity_type()).collect();
        let change_revisions: Vec<i64> = changes().map(|(_, (revision, _))| *revision).collect();
        let change_payloads: Vec<&[u8]> = changes().map(|(_, (_, payload))| payload.as_slice()).collect();
        let fire_names: Vec<Option<&str>> = rows
            .iter()
            .map(|row| row.fired.as_ref().map(|f| f.name.as_str()))
            .collect();
        let fire_dues: Vec<Option<DateTime<Utc>>> = rows.iter().map(|row| row.fired.as_ref().map(|f| f.due)).collect();
        // NULL: delete the timer; a time: move it there; NULL and not consumed: leave it to the write's own change.
        let fire_nexts: Vec<Option<DateTime<Utc>>> = rows
            .iter()
            .map(|row| row.fired.as_ref().and_then(|f| f.consume.flatten()))
            .collect();
        let fire_consumes: Vec<Option<bool>> = rows
            .iter()
            .map(|row| row.fired.as_ref().map(|f| f.consume.is_some()))
            .collect();
        let timers = || {
            rows.iter()
                .flat_map(|row| row.timers.iter().map(move |change| (row, change)))
        };
        let set = || {
            timers().filter_map(|(row, change)| match change {
                TimerChange::Set {
                    name,
                    due,
                    schedule,
                    command,
                    missed,
                } => Some((
                    row.key.as_str(),
                    name.as_str(),
                    *due,
                    schedule.as_str(),
                    command.as_slice(),
                    *missed,
                )),
                TimerChange::Cancel { .. } => None,
            })
        };
        let set_ids: Vec<&str> = set().map(|t| t.0).collect();
        let set_names: Vec<&str> = set().map(|t| t.1).collect();
        let set_dues: Vec<DateTime<Utc>> = set().map(|t| t.2).collect();
        let set_schedules: Vec<&str> = set().map(|t| t.3).collect();
        let set_commands: Vec<&[u8]> = set().map(|t| t.4).collect();
        let set_missed: Vec<i32> = set().map(|t| t.5).collect();
        let cancelled = || {
            timers().filter_map(|(row, change)| match change {
                TimerChange::Cancel { name } => Some((row.key.as_str(), name.as_str())),
                TimerChange::Set { .. } => None,
            })
        };
        let cancel_ids: Vec<&str> = cancelled().map(|t| t.0).collect();
        let cancel_names: Vec<&str> = cancelled().map(|t| t.1).collect();
        let mut binds: Vec<&(dyn ToSql + Sync)> = vec![
            &ids,
            &expected,
            &revisions,
            &payloads,
            &entity_types,
            &manifests,
            &schema_versions,
            &generations,
            &slices,
            &fence_epochs,
            &JSON_SERIALIZER_ID,
            &erasing,
            &node,
            &fire_names,
            &fire_dues,
            &fire_nexts,
            &set_ids,
            &set_names,
            &set_dues,
            &set_schedules,
            &set_commands,
            &set_missed,
            &cancel_ids,
            &cancel_names,
            &fire_consumes,
        ];
        if self.feed {
            binds.extend([
                &change_ids as &(dyn ToSql + Sync),
                &change_types,
                &change_revisions,
                &change_payloads,
            ]);
        }
        let answer = tokio::time::timeout(self.no_answer_after, conn.client().query(&statement, &binds));
        let written = match answer.await {
            Ok(answer) => answer.map_err(sent_write_error)?,
            Err(_) => return Err(StoreError::OutcomeUnknown(Arc::new(NoAnswer(self.no_answer_after)))),
        };
        // Each row written, fenced, or whose fire found its timer gone; the others conflicted.
        let outcomes: HashMap<&str, &str> = written.iter().map(|row| (row.get(0), row.get(1))).collect();
        Ok(ids
            .iter()
            .map(|id| match outcomes.get(id) {
                Some(&"w") => RowOutcome::Written,
                Some(&"f") => RowOutcome::Fenced,
                Some(_) => RowOutcome::TimerGone,
                None => RowOutcome::Conflict,
            })
            .collect())
    }

    async fn load_rows(&self, keys: &[&PersistenceId]) -> Result<HashMap<String, StateRow>, StoreError> {
        let mut conn = self.checkout().await?;
        let ids: Vec<&str> = keys.iter().map(|key| key.as_str()).collect();
        // `eq_any` of a `Vec` is `= ANY($1)` on PostgreSQL: one array bind,
        // one round trip for the whole batch.
        let rows: Vec<StateRow> = durable_state::table
            .filter(durable_state::persistence_id.eq_any(ids))
            .select((
                durable_state::persistence_id,
                durable_state::revision,
                durable_state::generation,
                durable_state::state_ser_id,
                durable_state::state_schema_version,
                durable_state::state_payload,
            ))
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|row| (row.persistence_id.clone(), row)).collect())
    }

    fn leases(store: &PostgresStore) -> Option<&dyn crate::store::Leases> {
        Some(store)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        diesel::select(1.into_sql::<Integer>())
            .execute(&mut self.checkout().await?)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Offsets for PostgresStore {
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let consumer = consumer.to_owned();
        self.run(|backend| async move {
            let position: Option<i64> = feed_offsets::table
                .filter(feed_offsets::consumer.eq(consumer))
                .select(feed_offsets::position)
                .get_result(&mut backend.checkout().await?)
                .await
                .optional()?;
            Ok(position.map(port::count))
        })
        .await
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let (consumer, position) = (consumer.to_owned(), port::bigint(position)?);
        self.run_write(move |backend| async move {
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
                .execute(&mut backend.checkout().await?)
                .await?;
            Ok(())
        })
        .await
    }

    async fn offsets_under(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let (prefix, length) = (prefix.to_owned(), prefix_length(prefix));
        self.run(move |backend| async move {
            let rows: Vec<(String, i64)> = feed_offsets::table
                .filter(substr(feed_offsets::consumer, 1, length).eq(prefix))
                .select((feed_offsets::consumer, feed_offsets::position))
                .load(&mut backend.checkout().await?)
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
            let removed = diesel::delete(
                feed_offsets::table
                    .filter(substr(feed_offsets::consumer, 1, length).eq(prefix))
                    .filter(feed_offsets::position.lt(below)),
            )
            .execute(&mut backend.checkout().await?)
            .await?;
            Ok(removed as u64)
        })
        .await
    }
}

#[async_trait]
impl ChangeLog for PostgresStore {
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
        let (entity_type, after) = (entity_type.to_owned(), port::bigint(after)?);
        self.run(move |backend| async move {
            let rows: Vec<PgChange> = state_changes::table
                .filter(state_changes::entity_type.eq(entity_type))
                .filter(state_changes::position.gt(after))
                .order(state_changes::position)
                .limit(port::limit(limit))
                .select((
                    state_changes::position,
                    state_changes::persistence_id,
                    state_changes::revision,
                    state_changes::committed_at,
                    state_changes::state_schema_version,
                    state_changes::state_payload,
                ))
                .load(&mut backend.checkout().await?)
                .await?;
            good_prefix(rows.into_iter().map(|r| {
                FeedRow {
                    position: r.position,
                    persistence_id: r.persistence_id,
                    revision: r.revision,
                    committed_at: r.committed_at,
                    state_schema_version: r.state_schema_version,
                    state_payload: r.state_payload,
                }
                .decode()
            }))
        })
        .await
    }

    async fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        self.require_feed()?;
        self.run(|backend| async move {
            let mut conn = backend.checkout().await?;
            let head: i64 = feed_head::table
                .filter(feed_head::id.eq(1))
                .select(feed_head::position)
                .get_result(&mut conn)
                .await?;
            let slowest: Option<i64> = feed_offsets::table
                .filter(feed_offsets::consumer.not_like(format!("{KAFKA_POSITIONS}%")))
                .select(min(feed_offsets::position))
                .get_result(&mut conn)
                .await?;
            Ok(FeedBounds {
                head: port::count(head),
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
        let through = port::bigint(through)?;
        self.run_write(move |backend| async move {
            let mut oldest = state_changes::table
                .filter(state_changes::position.le(through))
                .order(state_changes::position)
                .limit(port::limit(limit))
                .select(state_changes::position)
                .into_boxed();
            if let Some(before) = committed_before {
                oldest = oldest.filter(state_changes::committed_at.lt(before));
            }
            let removed = diesel::delete(state_changes::table.filter(state_changes::position.eq_any(oldest)))
                .execute(&mut backend.checkout().await?)
                .await?;
            Ok(removed as u64)
        })
        .await
    }
}

#[async_trait]
impl Maintenance for PostgresStore {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let (entity_type, after) = (entity_type.to_owned(), after.map(|id| id.as_str().to_owned()));
        self.run(move |backend| async move { backend.page(entity_type, Some(written_before), after, limit).await })
            .await
    }

    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let rows = rows.into_iter().map(|(id, revision)| (id, revision, None)).collect();
        self.purge(rows, written_before).await
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let entity_type = entity_type.to_owned();
        self.run(|backend| async move {
            let count: i64 = durable_state::table
                .filter(durable_state::entity_type.eq(entity_type))
                .count()
                .get_result(&mut backend.checkout().await?)
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

impl PostgresStore {
    /// Deletes each of `rows` still at its revision and still old, and in
    /// cluster mode only while its fence holds (see the purge statements).
    pub(super) async fn purge(
        &self,
        rows: Vec<(PersistenceId, Revision, Option<crate::store::Fence>)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let mut rows = rows;
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let revisions = rows
            .iter()
            .map(|(_, revision, _)| port::bigint(revision.0))
            .collect::<Result<Vec<i64>, _>>()?;
        let fence_epochs = rows
            .iter()
            .map(|(_, _, fence)| fence.as_ref().map(|fence| port::bigint(fence.epoch)).transpose())
            .collect::<Result<Vec<Option<i64>>, _>>()?;
        let node: Option<String> = rows
            .iter()
            .find_map(|(_, _, fence)| Some(fence.as_ref()?.node.to_string()));
        let purged: Vec<PersistenceId> = self
            .run_write(move |backend| async move {
                let ids: Vec<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
                let slices: Vec<i32> = rows.iter().map(|(id, _, _)| i32::from(id.slice().index())).collect();
                let purge = diesel::sql_query(if backend.feed {
                    PURGE_ROWS_WITH_FEED_SQL
                } else {
                    PURGE_ROWS_SQL
                })
                .into_boxed()
                .bind::<Array<Text>, _>(&ids)
                .bind::<Array<BigInt>, _>(&revisions)
                .bind::<diesel::sql_types::Timestamptz, _>(written_before)
                .bind::<Array<Integer>, _>(&slices)
                .bind::<Array<diesel::sql_types::Nullable<BigInt>>, _>(&fence_epochs)
                .bind::<diesel::sql_types::Nullable<Text>, _>(&node);
                let purge = if backend.feed {
                    purge.bind::<Binary, _>(TOMBSTONE)
                } else {
                    purge
                };
                let purged: Vec<Written> = purge.load(&mut backend.checkout().await?).await?;
                let purged: HashSet<String> = purged.into_iter().map(|row| row.persistence_id).collect();
                Ok(rows
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .filter(|id| purged.contains(id.as_str()))
                    .collect())
            })
            .await?;
        if !purged.is_empty() {
            // Tombstones in the feed, with it on.
            self.signal_feed();
        }
        Ok(purged)
    }
}
