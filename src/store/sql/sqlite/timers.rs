//! The durable timers on SQLite: what the write of a row does to its
//! entity's timers, in the batch's transaction, and what a scheduler reads
//! and an application lists and cancels.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods, QueryDsl, RunQueryDsl, SqliteConnection};

use super::{iso_8601_millis, SqliteStore};
use crate::entity::{PersistenceId, Slice};
use crate::error::{CorruptRow, StoreError};
use crate::store::schema::sqlite::entity_timers;
use crate::store::sql::backend::{self as port, RowWrite, TimerRow};
use crate::store::{StoredTimer, TimerChange, Timers};

/// Whether the entity's timer `name` is still at `due`: a fire commits only then.
pub(super) fn still_due(
    conn: &mut SqliteConnection,
    persistence_id: &str,
    name: &str,
    due: DateTime<Utc>,
) -> diesel::QueryResult<bool> {
    let found: i64 = entity_timers::table
        .filter(entity_timers::persistence_id.eq(persistence_id))
        .filter(entity_timers::name.eq(name))
        .filter(entity_timers::due.eq(iso_8601_millis(due)))
        .count()
        .get_result(conn)?;
    Ok(found > 0)
}

/// Deletes every timer of the entity: it was erased or purged.
pub(super) fn delete_all(conn: &mut SqliteConnection, persistence_id: &str) -> diesel::QueryResult<usize> {
    diesel::delete(entity_timers::table.filter(entity_timers::persistence_id.eq(persistence_id))).execute(conn)
}

/// What a written row does to its entity's timers: the ones its state set
/// and cancelled, and the one whose fire it commits.
pub(super) fn write(conn: &mut SqliteConnection, row: &RowWrite) -> diesel::QueryResult<()> {
    let id = row.key.as_str();
    for change in &row.timers {
        match change {
            TimerChange::Set {
                name,
                due,
                schedule,
                command,
                missed,
            } => {
                diesel::insert_into(entity_timers::table)
                    .values((
                        entity_timers::persistence_id.eq(id),
                        entity_timers::name.eq(name),
                        entity_timers::entity_type.eq(row.entity_type()),
                        entity_timers::slice.eq(row.slice),
                        entity_timers::due.eq(iso_8601_millis(*due)),
                        entity_timers::schedule.eq(schedule),
                        entity_timers::command.eq(command),
                        entity_timers::missed.eq(missed),
                    ))
                    .on_conflict((entity_timers::persistence_id, entity_timers::name))
                    .do_update()
                    .set((
                        entity_timers::due.eq(excluded(entity_timers::due)),
                        entity_timers::schedule.eq(excluded(entity_timers::schedule)),
                        entity_timers::command.eq(excluded(entity_timers::command)),
                        entity_timers::missed.eq(excluded(entity_timers::missed)),
                    ))
                    .execute(conn)?;
            }
            TimerChange::Cancel { name } => {
                diesel::delete(
                    entity_timers::table
                        .filter(entity_timers::persistence_id.eq(id))
                        .filter(entity_timers::name.eq(name)),
                )
                .execute(conn)?;
            }
        }
    }
    if let Some(fired) = &row.fired {
        let timer = entity_timers::table
            .filter(entity_timers::persistence_id.eq(id))
            .filter(entity_timers::name.eq(&fired.name))
            .filter(entity_timers::due.eq(iso_8601_millis(fired.due)));
        match fired.consume {
            None => {}
            Some(None) => {
                diesel::delete(timer).execute(conn)?;
            }
            Some(Some(next)) => {
                diesel::update(timer)
                    .set(entity_timers::due.eq(iso_8601_millis(next)))
                    .execute(conn)?;
            }
        }
    }
    Ok(())
}

/// A `TEXT` due time read back.
fn parse_due(due: String) -> Result<DateTime<Utc>, CorruptRow> {
    DateTime::parse_from_rfc3339(&due)
        .map(|due| due.to_utc())
        .map_err(CorruptRow::Timestamp)
}

#[async_trait]
impl Timers for SqliteStore {
    async fn due_timers(
        &self,
        entity_type: &str,
        before: DateTime<Utc>,
        slices: Option<&[Slice]>,
        limit: usize,
    ) -> Result<Vec<StoredTimer>, StoreError> {
        let entity_type = entity_type.to_owned();
        let slices: Option<Vec<i32>> = slices.map(|slices| slices.iter().map(|s| i32::from(s.index())).collect());
        let before = iso_8601_millis(before);
        self.run(move |backend| async move {
            let rows: Vec<TimerRow<String>> = backend
                .blocking(move |conn| {
                    let mut query = entity_timers::table
                        .filter(entity_timers::entity_type.eq(entity_type))
                        .filter(entity_timers::due.lt(before))
                        .into_boxed();
                    if let Some(slices) = slices {
                        query = query.filter(entity_timers::slice.eq_any(slices));
                    }
                    query
                        .order((entity_timers::due, entity_timers::persistence_id, entity_timers::name))
                        .limit(port::limit(limit))
                        .select(TIMER_COLUMNS)
                        .load(conn)
                })
                .await?;
            rows.into_iter().map(|row| row.decode(parse_due)).collect()
        })
        .await
    }

    async fn timers_of(&self, key: &PersistenceId) -> Result<Vec<StoredTimer>, StoreError> {
        let id = key.as_str().to_owned();
        self.run(move |backend| async move {
            let rows: Vec<TimerRow<String>> = backend
                .blocking(move |conn| {
                    entity_timers::table
                        .filter(entity_timers::persistence_id.eq(id))
                        .order(entity_timers::name)
                        .select(TIMER_COLUMNS)
                        .load(conn)
                })
                .await?;
            rows.into_iter().map(|row| row.decode(parse_due)).collect()
        })
        .await
    }

    async fn cancel_timer(&self, key: &PersistenceId, name: &str) -> Result<bool, StoreError> {
        let (id, name) = (key.as_str().to_owned(), name.to_owned());
        self.run_write(move |backend| async move {
            let deleted = backend
                .blocking(move |conn| {
                    diesel::delete(
                        entity_timers::table
                            .filter(entity_timers::persistence_id.eq(id))
                            .filter(entity_timers::name.eq(name)),
                    )
                    .execute(conn)
                })
                .await?;
            Ok(deleted > 0)
        })
        .await
    }
}

/// The columns a [`TimerRow`] reads, in its order.
const TIMER_COLUMNS: (
    entity_timers::persistence_id,
    entity_timers::name,
    entity_timers::due,
    entity_timers::schedule,
    entity_timers::command,
    entity_timers::missed,
) = (
    entity_timers::persistence_id,
    entity_timers::name,
    entity_timers::due,
    entity_timers::schedule,
    entity_timers::command,
    entity_timers::missed,
);
