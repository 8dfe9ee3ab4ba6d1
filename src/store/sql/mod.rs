//! The SQL store: one implementation of the store traits for every SQL
//! database, generic over the database's statements ([`SqlBackend`]), with
//! group commit as the layer its writes and loads go through.
//!
//! - [`SqlStore`] (this file): the store traits, implemented once;
//! - `group_commit`, `batch`, `writes`, `loads`: the batching layer, split by
//!   role as tower splits its buffer into service, worker and message;
//! - `backend`: the port to a database, and where values become columns;
//! - `postgres`, `sqlite`: the two databases' statements and set-up.
//!
//! Every database call runs on the store's own runtime ([`DbRuntime`]), not
//! the caller's. That keeps diesel-async's blocking calls off actix's
//! single-threaded runtime, lets a write in flight finish even if the actor
//! that asked for it stops, and keeps database timeouts on real time even
//! when a test pauses tokio's clock.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

mod backend;
mod batch;
mod group_commit;
mod loads;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
mod writes;

pub use backend::SqlBackend;

use self::group_commit::GroupCommit;
use super::capability::{ChangeLog, Maintenance, Offsets, StateStore};
use super::config::StoreConfig;
use super::rows::{ChangeRow, StoreStats, StoredRow, WriteRow};
use super::runtime::DbRuntime;
use crate::entity::{PersistenceId, Revision};
use crate::error::StoreError;

/// A store on a SQL database, with group commit: [`PostgresStore`](crate::PostgresStore)
/// and [`SqliteStore`](crate::SqliteStore) are its two instances.
pub struct SqlStore<B: SqlBackend> {
    group_commit: GroupCommit,
    backend: Arc<B>,
    /// Whether writes record the change feed; reading an unwritten feed is refused.
    feed: bool,
    // Declared last: the collectors run on it.
    runtime: DbRuntime,
}

impl<B: SqlBackend> fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(B::STORE_NAME)
            .field("change_feed", &self.feed)
            .finish_non_exhaustive()
    }
}

impl<B: SqlBackend> SqlStore<B> {
    /// The store over `backend`, its queries running on `runtime`.
    fn start(backend: B, runtime: DbRuntime, config: &StoreConfig) -> Self {
        let backend = Arc::new(backend);
        Self {
            group_commit: GroupCommit::start(backend.clone(), &runtime, config),
            backend,
            feed: config.change_feed,
            runtime,
        }
    }

    /// Runs one statement of the backend on the store's runtime, bounded by
    /// the operation timeout: every call that is not batched.
    fn run<T, F, Fut>(&self, statement: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Arc<B>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.runtime.run(statement(self.backend.clone()))
    }
}

#[async_trait]
impl<B: SqlBackend> StateStore for SqlStore<B> {
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        self.group_commit.load_row(key).await
    }

    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        self.group_commit.write_row(write).await
    }

    fn keeps_change_feed(&self) -> bool {
        self.feed
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|backend| async move { backend.ping().await }).await
    }

    fn stats(&self) -> StoreStats {
        self.group_commit.stats()
    }
}

#[async_trait]
impl<B: SqlBackend> Offsets for SqlStore<B> {
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let consumer = consumer.to_owned();
        self.run(|backend| async move { backend.load_offset(consumer).await })
            .await
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let consumer = consumer.to_owned();
        self.run(move |backend| async move { backend.save_offset(consumer, position).await })
            .await
    }
}

#[async_trait]
impl<B: SqlBackend> ChangeLog for SqlStore<B> {
    async fn read_change_rows(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        if !self.feed {
            return Err(StoreError::NoChangeFeed);
        }
        let entity_type = entity_type.to_owned();
        self.run(move |backend| async move { backend.read_changes(entity_type, after, limit).await })
            .await
    }
}

#[async_trait]
impl<B: SqlBackend> Maintenance for SqlStore<B> {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let (entity_type, after) = (entity_type.to_owned(), after.cloned());
        self.run(move |backend| async move {
            backend
                .purge_candidates(entity_type, written_before, after, limit)
                .await
        })
        .await
    }

    async fn purge_rows(
        &self,
        mut rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        // Byte order, unique: the order every statement of the store locks rows in.
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.run(move |backend| async move { backend.purge_rows(rows, written_before).await })
            .await
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let entity_type = entity_type.to_owned();
        self.run(|backend| async move { backend.count_entities(entity_type).await })
            .await
    }

    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let (entity_type, after) = (entity_type.to_owned(), after.map(str::to_owned));
        self.run(move |backend| async move { backend.entity_ids(entity_type, after, limit).await })
            .await
    }
}
