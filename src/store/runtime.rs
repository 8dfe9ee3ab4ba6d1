use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::error::StoreError;

/// A multi-threaded tokio runtime owned by one store, on which all its
/// database work runs to completion.
///
/// Why not the caller's runtime: diesel-async's migration harness and its
/// SQLite wrapper call `block_in_place`, which panics on actix's
/// current-thread runtime; a query future dropped there (because its actor
/// stopped) would be cancelled mid-write; and timeouts must keep real time
/// when a test pauses the caller's clock.
#[derive(Debug)]
pub(crate) struct DbRuntime {
    runtime: Option<Runtime>,
    operation_timeout: Duration,
}

impl DbRuntime {
    pub(crate) fn new(name: &str, worker_threads: usize, operation_timeout: Duration) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name(format!("persist-durable-{name}"))
            .enable_all()
            .build()
            .map_err(StoreError::unavailable)?;
        Ok(Self {
            runtime: Some(runtime),
            operation_timeout,
        })
    }

    /// Runs `work` on the store's runtime, bounded by the operation timeout.
    ///
    /// The work is spawned before this returns, so it runs to completion even
    /// if the returned future is dropped.
    pub(crate) fn run<T, F>(&self, work: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let limit = self.operation_timeout;
        let spawned = self.runtime.as_ref().map(|runtime| {
            runtime.spawn(async move {
                tokio::time::timeout(limit, work)
                    .await
                    .unwrap_or(Err(StoreError::Timeout(limit)))
            })
        });
        async move {
            match spawned {
                Some(handle) => handle.await.map_err(|e| StoreError::TaskFailed(Arc::new(e)))?,
                None => Err(StoreError::Stopped),
            }
        }
    }

    /// Runs a statement that may commit (a purge, a position save) on the
    /// store's runtime. It is never answered "failed" while it may still
    /// commit: the database bounds it (PostgreSQL's `statement_timeout`,
    /// SQLite's busy timeout), and the client gives up only after `bound`,
    /// which callers make longer than the wait for a connection plus twice
    /// the statement's own bound, and then says the outcome is unknown.
    pub(crate) fn run_write<T, F>(
        &self,
        bound: Duration,
        work: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let spawned = self.runtime.as_ref().map(|runtime| runtime.spawn(work));
        async move {
            let Some(handle) = spawned else {
                return Err(StoreError::Stopped);
            };
            match tokio::time::timeout(bound, handle).await {
                Ok(Ok(done)) => done,
                Ok(Err(failed)) => Err(StoreError::TaskFailed(Arc::new(failed))),
                // The task goes on; whether it commits is not known here.
                Err(_) => Err(StoreError::OutcomeUnknown(Arc::new(NoAnswer(bound)))),
            }
        }
    }

    /// Starts a long-running task (a batch collector) on the store's runtime.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(task);
        }
    }

    /// Runs `work` on the store's runtime without a timeout (migrations).
    pub(crate) async fn run_unbounded<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or(StoreError::Stopped)?;
        runtime
            .spawn(work)
            .await
            .map_err(|e| StoreError::TaskFailed(Arc::new(e)))?
    }
}

impl Drop for DbRuntime {
    /// A store may be dropped inside an async context (the last actor holding
    /// it stops), where dropping a runtime normally panics.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A statement that may commit got no answer within its bound.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}: the statement may still commit")]
pub(crate) struct NoAnswer(pub(crate) Duration);
