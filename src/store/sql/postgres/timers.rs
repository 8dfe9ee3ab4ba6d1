//! The durable timers' statements on PostgreSQL: what a scheduler reads
//! and what an application lists and cancels. Timers are set and consumed
//! by the write statements (`statements`), with their entity's state.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::RunQueryDsl;

use super::PostgresStore;
use crate::entity::{PersistenceId, Slice};
use crate::error::StoreError;
use crate::store::schema::postgres::entity_timers;
use crate::store::sql::backend::{self as port, TimerRow};
use crate::store::{StoredTimer, Timers};

#[async_trait]
impl Timers for PostgresStore {
    async fn due_timers(
        &self,
        entity_type: &str,
        before: DateTime<Utc>,
        slices: Option<&[Slice]>,
        limit: usize,
    ) -> Result<Vec<StoredTimer>, StoreError> {
        let entity_type = entity_type.to_owned();
        let slices: Option<Vec<i32>> = slices.map(|slices| slices.iter().map(|s| i32::from(s.index())).collect());
        self.run(move |backend| async move {
            let mut query = entity_timers::table
                .filter(entity_timers::entity_type.eq(entity_type))
                .filter(entity_timers::due.lt(before))
                .into_boxed();
            if let Some(slices) = slices {
                query = query.filter(entity_timers::slice.eq_any(slices));
            }
            let rows: Vec<TimerRow<DateTime<Utc>>> = query
                .order((entity_timers::due, entity_timers::persistence_id, entity_timers::name))
                .limit(port::limit(limit))
                .select(TIMER_COLUMNS)
                .load(&mut backend.checkout().await?)
                .await?;
            rows.into_iter().map(|row| row.decode(Ok)).collect()
        })
        .await
    }

    async fn timers_of(&self, key: &PersistenceId) -> Result<Vec<StoredTimer>, StoreError> {
        let id = key.as_str().to_owned();
        self.run(move |backend| async move {
            let rows: Vec<TimerRow<DateTime<Utc>>> = entity_timers::table
                .filter(entity_timers::persistence_id.eq(id))
                .order(entity_timers::name)
                .select(TIMER_COLUMNS)
                .load(&mut backend.checkout().await?)
                .await?;
            rows.into_iter().map(|row| row.decode(Ok)).collect()
        })
        .await
    }

    async fn cancel_timer(&self, key: &PersistenceId, name: &str) -> Result<bool, StoreError> {
        let (id, name) = (key.as_str().to_owned(), name.to_owned());
        self.run_write(move |backend| async move {
            let deleted = diesel::delete(
                entity_timers::table
                    .filter(entity_timers::persistence_id.eq(id))
                    .filter(entity_timers::name.eq(name)),
            )
            .execute(&mut backend.checkout().await?)
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
