//! The SQL store: one implementation of the store traits for every SQL
//! database, generic over the database's statements ([`SqlBackend`]), with
//! group commit as the layer its writes and loads go through.
//!
//! - [`SqlStore`] (this file): the rows ([`StateStore`]), implemented once
//!   over group commit; each database implements the other capabilities
//!   for its own store, with its own statements;
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
use super::capability::StateStore;
use super::config::StoreConfig;
use super::rows::{StoreStats, StoredRow, WriteRow};
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
    /// Notified when changes are committed to the feed (with the feed on).
    feed_signal: Option<Arc<tokio::sync::Notify>>,
    /// How long a statement that may commit is waited for before its
    /// outcome is reported unknown: the wait for a connection and twice the
    /// operation timeout, so the database always decides first when it can.
    write_bound: std::time::Duration,
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
        let feed_signal = config.change_feed.then(|| Arc::new(tokio::sync::Notify::new()));
        Self {
            group_commit: GroupCommit::start(backend.clone(), &runtime, config, feed_signal.clone()),
            backend,
            feed: config.change_feed,
            feed_signal,
            write_bound: config.connect_timeout + config.operation_timeout * 2,
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

    /// Runs one statement that may commit on the store's runtime: never
    /// answered "failed" while it may still commit, `OutcomeUnknown` past
    /// its bound (see [`DbRuntime::run_write`]).
    fn run_write<T, F, Fut>(&self, statement: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Arc<B>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.runtime
            .run_write(self.write_bound, statement(self.backend.clone()))
    }

    /// Wakes the feed's followers in this process: changes were committed.
    fn signal_feed(&self) {
        if let Some(signal) = &self.feed_signal {
            signal.notify_waiters();
        }
    }

    /// Refuses to read a change feed this store does not write.
    fn require_feed(&self) -> Result<(), StoreError> {
        if self.feed {
            Ok(())
        } else {
            Err(StoreError::NoChangeFeed)
        }
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

    fn leases(&self) -> Option<&dyn crate::store::Leases> {
        B::leases(self)
    }
}

/// Applies `migrations` that are pending, one by one, logging each with the
/// time it took: a long one on a large table shows how far the upgrade is.
fn apply_migrations<DB: diesel::backend::Backend>(
    harness: &mut impl diesel_migrations::MigrationHarness<DB>,
    migrations: diesel_migrations::EmbeddedMigrations,
) -> Result<(), StoreError> {
    let failed = |e| StoreError::Migration(Arc::from(e));
    let pending = harness.pending_migrations(migrations).map_err(failed)?;
    for migration in pending {
        let name = migration.name().to_string();
        tracing::info!(migration = %name, "applying a schema migration");
        let started = std::time::Instant::now();
        harness.run_migration(&*migration).map_err(failed)?;
        tracing::info!(migration = %name, took = ?started.elapsed(), "schema migration applied");
    }
    Ok(())
}

/// `rows` in byte order of persistence ids, each once: the order every
/// statement of the store locks rows in.
fn sorted_unique(mut rows: Vec<(PersistenceId, Revision)>) -> Vec<(PersistenceId, Revision)> {
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|a, b| a.0 == b.0);
    rows
}
