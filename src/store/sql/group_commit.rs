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
use super::writes::{execute_writes, WriteRequest};
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
    pub(super) fn start<B: SqlBackend>(backend: Arc<B>, runtime: &DbRuntime, config: &StoreConfig) -> Self {
        let (writes, write_requests) = mpsc::unbounded_channel();
        let (loads, load_requests) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let batching = |in_flight| Batching {
            in_flight,
            max: config.max_batch_size,
            wait: config.max_batch_wait,
        };
        let (write_backend, write_counters, feed) = (backend.clone(), counters.clone(), config.change_feed);
        runtime.spawn(collect(
            write_requests,
            batching(config.max_write_batches_in_flight),
            move |batch| execute_writes(write_backend.clone(), batch, feed, write_counters.clone()),
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
        self.writes
            .send(WriteRequest { write, reply })
            .map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
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
