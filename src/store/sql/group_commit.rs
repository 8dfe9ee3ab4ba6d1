//! Group commit's front: writes from many entity actors become one
//! multi-row, revision-checked statement per round trip, and restores of
//! many entities one query per batch. Callers queue a request and await its
//! answer here; collectors on the store's runtime batch the requests
//! ([`batch`](super::batch)) and execute them ([`writes`](super::writes),
//! [`loads`](super::loads)).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::backend::SqlBackend;
use super::batch::{collect, Batching};
use super::loads::{execute_loads, LoadRequest};
use super::writes::{execute_writes, WriteRequest, Written};
use crate::entity::{PersistenceId, Revision};
use crate::error::StoreError;
use crate::store::config::StoreConfig;
use crate::store::rows::{StoreStats, StoredRow, WriteRow};
use crate::store::runtime::DbRuntime;

/// What group commit has done, shared by the collectors and the front.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) write_statements: AtomicU64,
    pub(super) rows_written: AtomicU64,
    pub(super) conflicts: AtomicU64,
    pub(super) load_statements: AtomicU64,
    pub(super) entities_loaded: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The batching front of a SQL store.
pub(super) struct GroupCommit {
    counters: Arc<Counters>,
    writes: mpsc::UnboundedSender<WriteRequest>,
    loads: mpsc::UnboundedSender<LoadRequest>,
}

impl GroupCommit {
    /// Starts the write and load collectors of `backend` on `runtime`.
    /// `feed_signal` is notified after each statement that committed rows
    /// with the feed on.
    pub(super) fn start<B: SqlBackend>(
        backend: Arc<B>,
        runtime: &DbRuntime,
        config: &StoreConfig,
        feed_signal: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        let (writes, write_requests) = mpsc::unbounded_channel();
        let (loads, load_requests) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let batching = |in_flight| Batching {
            in_flight,
            max: config.max_batch_size,
            wait: config.max_batch_wait,
        };
        let (write_backend, write_counters, feed) = (backend.clone(), counters.clone(), config.change_feed);
        let split_for = config.operation_timeout;
        runtime.spawn(collect(
            write_requests,
            batching(config.max_write_batches_in_flight),
            move |batch| {
                let written = Written {
                    counters: write_counters.clone(),
                    feed_signal: feed_signal.clone(),
                };
                execute_writes(write_backend.clone(), batch, feed, split_for, written)
            },
        ));
        let (load_counters, timeout) = (counters.clone(), config.operation_timeout);
        // Bounded restores in flight: a restart with many active entities
        // does not storm the database.
        runtime.spawn(collect(
            load_requests,
            batching(config.max_restores_in_flight),
            move |batch| execute_loads(backend.clone(), batch, timeout, load_counters.clone()),
        ));
        Self {
            counters,
            writes,
            loads,
        }
    }

    pub(super) async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = LoadRequest {
            key: key.clone(),
            reply,
        };
        self.loads.send(request).map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub(super) async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        write.check()?;
        let (reply, answer) = oneshot::channel();
        // Refused before it was queued: nothing was sent.
        self.writes
            .send(WriteRequest { write, reply })
            .map_err(|_| StoreError::Stopped)?;
        // Queued, then dropped unanswered (the store shut down, or its
        // executor died): the statement may have been sent and committed.
        answer
            .await
            .map_err(|_| StoreError::OutcomeUnknown(Arc::new(Unanswered)))?
    }

    pub(super) fn stats(&self) -> StoreStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StoreStats {
            write_statements: read(&self.counters.write_statements),
            rows_written: read(&self.counters.rows_written),
            conflicts: read(&self.counters.conflicts),
            load_statements: read(&self.counters.load_statements),
            entities_loaded: read(&self.counters.entities_loaded),
        }
    }
}

/// A write queued for a statement that ended without answering it.
#[derive(Debug, thiserror::Error)]
#[error("the store stopped, or its statement failed, without answering a write queued for it")]
struct Unanswered;

/// Adds one to the counter `name` per item of `entity_types`, labelled
/// `entity` like the actors' metrics: one call per entity type of a batch,
/// not per row (a statement may carry entities of several types).
pub(super) fn count_by_entity<'a>(name: &'static str, entity_types: impl Iterator<Item = &'a str>) {
    let mut counts: Vec<(&str, u64)> = Vec::new();
    for entity in entity_types {
        match counts.iter_mut().find(|(counted, _)| *counted == entity) {
            Some((_, count)) => *count += 1,
            None => counts.push((entity, 1)),
        }
    }
    for (entity, count) in counts {
        metrics::counter!(name, "entity" => entity.to_owned()).increment(count);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::store::sql::backend::{RowWrite, Sealed, StateRow};

    /// A backend whose write statement dies mid-flight.
    struct DyingBackend;

    impl Sealed for DyingBackend {}

    #[async_trait]
    impl SqlBackend for DyingBackend {
        const STORE_NAME: &'static str = "DyingStore";

        async fn write_rows(&self, _rows: &[RowWrite]) -> Result<Vec<crate::store::RowOutcome>, StoreError> {
            panic!("the driver died mid-statement")
        }

        async fn load_rows(&self, _keys: &[&PersistenceId]) -> Result<HashMap<String, StateRow>, StoreError> {
            Ok(HashMap::new())
        }

        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// Before, the dropped reply read as `Stopped`, which a command's sender
    /// hears as "not committed": but the statement had been sent.
    #[tokio::test]
    async fn a_queued_write_whose_statement_ends_without_an_answer_has_an_unknown_outcome() {
        let runtime = DbRuntime::new("test", 1, Duration::from_secs(1)).unwrap();
        let group_commit = GroupCommit::start(Arc::new(DyingBackend), &runtime, &StoreConfig::default(), None);
        let write = WriteRow {
            key: PersistenceId::new("UserState", "m-u"),
            manifest: "UserState/v1",
            expected: Revision::NONE,
            generation: None,
            revision: Revision(1),
            schema_version: 1,
            payloads: vec![b"{}".to_vec()],
            erases: false,
            fence: None,
            timers: Vec::new(),
            fired: None,
        };

        let answer = group_commit.write_row(write).await;

        assert!(matches!(answer, Err(StoreError::OutcomeUnknown(_))), "{answer:?}");
    }
}
