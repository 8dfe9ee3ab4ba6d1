//! Group commit: writes from many user actors become one multi-row,
//! revision-checked statement per round trip, and restores of many users
//! one query per batch.
//!
//! A collector task on the store's runtime takes the first request, gathers
//! more for at most [`StoreConfig::max_batch_wait`] or until the batch is
//! full, and hands the batch to an executor once one of a bounded number of
//! slots is free. While every slot is busy, requests pile up, so batches grow
//! with the load: no wait is added beyond the bound, and the database sees
//! few, large statements exactly when it is busiest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::row::{encode, revision_column, StateRow};
use super::runtime::DbRuntime;
use super::{persistence_id, Revision, StateChange, StoreConfig, StoreStats, StoredState};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

/// One row of a write batch.
#[derive(Debug)]
pub(crate) struct RowWrite {
    pub(crate) persistence_id: String,
    pub(crate) mall_id: String,
    pub(crate) user_id: String,
    /// The revision the row must have (0: the row must not exist).
    pub(crate) expected: i64,
    pub(crate) revision: i64,
    pub(crate) payload: Vec<u8>,
    /// For the change feed, when it is on: every revision this write
    /// commits, in order, with its state (the last is `revision`, `payload`).
    pub(crate) changes: Vec<(i64, Vec<u8>)>,
}

/// A change feed row as a backend read it.
pub(crate) struct ChangeRow {
    pub(crate) position: i64,
    pub(crate) mall_id: String,
    pub(crate) user_id: String,
    pub(crate) revision: i64,
    pub(crate) committed_at: chrono::DateTime<chrono::Utc>,
    pub(crate) state_payload: Vec<u8>,
}

impl ChangeRow {
    fn decode(self) -> Result<StateChange, StoreError> {
        let key = UserKey::new(self.mall_id, self.user_id)
            .map_err(|e| StoreError::Query(format!("change {} names an invalid user: {e}", self.position)))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            revision: self.revision,
            reason,
        };
        let state = serde_json::from_slice(&self.state_payload).map_err(|e| corrupt(format!("feed payload: {e}")))?;
        Ok(StateChange {
            position: u64::try_from(self.position).map_err(|_| corrupt("negative feed position".into()))?,
            revision: Revision(u64::try_from(self.revision).map_err(|_| corrupt("negative revision".into()))?),
            key,
            state,
            committed_at: self.committed_at,
        })
    }
}

/// What a SQL backend must do for the group-commit engine: the SQL, nothing else.
#[async_trait]
pub(crate) trait SqlBackend: Send + Sync + 'static {
    /// Writes every row whose stored revision is its `expected`, atomically
    /// per row; returns, in input order, whether each row was written.
    /// Persistence ids in one call are unique.
    async fn write_rows(&self, rows: Vec<RowWrite>) -> Result<Vec<bool>, StoreError>;

    /// The stored rows among `persistence_ids`, keyed by persistence id.
    async fn load_rows(&self, persistence_ids: Vec<String>) -> Result<HashMap<String, StateRow>, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Up to `limit` change feed rows after `after`, in position order.
    async fn read_changes(&self, after: i64, limit: i64) -> Result<Vec<ChangeRow>, StoreError>;

    /// The position `consumer` saved.
    async fn load_offset(&self, consumer: String) -> Result<Option<i64>, StoreError>;

    /// Saves `consumer`'s position.
    async fn save_offset(&self, consumer: String, position: i64) -> Result<(), StoreError>;
}

struct WriteRequest {
    key: UserKey,
    persistence_id: String,
    expected: Revision,
    revision: Revision,
    /// The states after each command of this write; the row keeps the last.
    states: Vec<UserState>,
    reply: oneshot::Sender<Result<Revision, StoreError>>,
}

struct LoadRequest {
    key: UserKey,
    persistence_id: String,
    reply: oneshot::Sender<Result<Option<StoredState>, StoreError>>,
}

#[derive(Default)]
struct Counters {
    write_statements: AtomicU64,
    rows_written: AtomicU64,
    conflicts: AtomicU64,
    load_statements: AtomicU64,
    users_loaded: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The batching front of a SQL store.
pub(crate) struct GroupCommit {
    counters: Arc<Counters>,
    /// Whether writes record the change feed; reading an unwritten feed is refused.
    feed: bool,
    writes: mpsc::UnboundedSender<WriteRequest>,
    loads: mpsc::UnboundedSender<LoadRequest>,
    backend: Arc<dyn SqlBackend>,
    // Declared last: the collectors run on it.
    runtime: Arc<DbRuntime>,
}

impl GroupCommit {
    pub(crate) fn start(backend: Arc<dyn SqlBackend>, runtime: Arc<DbRuntime>, config: &StoreConfig) -> Self {
        let (writes, write_requests) = mpsc::unbounded_channel();
        let (loads, load_requests) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        runtime.spawn(collect_writes(
            write_requests,
            backend.clone(),
            config.clone(),
            counters.clone(),
        ));
        runtime.spawn(collect_loads(
            load_requests,
            backend.clone(),
            config.clone(),
            counters.clone(),
        ));
        Self {
            counters,
            feed: config.change_feed,
            writes,
            loads,
            backend,
            runtime,
        }
    }

    pub(crate) async fn load_state(&self, key: &UserKey) -> Result<Option<StoredState>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = LoadRequest {
            key: key.clone(),
            persistence_id: persistence_id(key),
            reply,
        };
        self.loads.send(request).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Writes `state` as `revision`; the feed records that revision only.
    pub(crate) async fn write_state(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        state: &UserState,
    ) -> Result<Revision, StoreError> {
        self.submit(key, expected, revision, vec![state.clone()]).await
    }

    /// Writes each of `states` as the next revision.
    pub(crate) async fn write_states(
        &self,
        key: &UserKey,
        expected: Revision,
        states: &[UserState],
    ) -> Result<Revision, StoreError> {
        if states.is_empty() {
            return Err(StoreError::Setup("write_changes needs at least one state".into()));
        }
        let revision = Revision(expected.0 + states.len() as u64);
        self.submit(key, expected, revision, states.to_vec()).await
    }

    async fn submit(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        states: Vec<UserState>,
    ) -> Result<Revision, StoreError> {
        // Refused here, alone: in the batch it would fail everyone's statement.
        if revision <= expected {
            return Err(StoreError::Setup(format!(
                "a write must raise the revision: {revision} is not above {expected}"
            )));
        }
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest {
            key: key.clone(),
            persistence_id: persistence_id(key),
            expected,
            revision,
            states,
            reply,
        };
        self.writes.send(request).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        self.runtime.run(async move { backend.ping().await }).await
    }

    pub(crate) async fn read_changes(&self, after: u64, limit: usize) -> Result<Vec<StateChange>, StoreError> {
        self.require_feed()?;
        let backend = self.backend.clone();
        let after = i64::try_from(after).map_err(|_| StoreError::Setup("feed position beyond BIGINT".into()))?;
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.runtime
            .run(async move {
                let rows = backend.read_changes(after, limit).await?;
                rows.into_iter().map(ChangeRow::decode).collect()
            })
            .await
    }

    pub(crate) async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        self.require_feed()?;
        let (backend, consumer) = (self.backend.clone(), consumer.to_owned());
        let position = self
            .runtime
            .run(async move { backend.load_offset(consumer).await })
            .await?;
        Ok(position.and_then(|p| u64::try_from(p).ok()))
    }

    pub(crate) async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        self.require_feed()?;
        let (backend, consumer) = (self.backend.clone(), consumer.to_owned());
        let position = i64::try_from(position).map_err(|_| StoreError::Setup("feed position beyond BIGINT".into()))?;
        self.runtime
            .run(async move { backend.save_offset(consumer, position).await })
            .await
    }

    fn require_feed(&self) -> Result<(), StoreError> {
        if self.feed {
            Ok(())
        } else {
            Err(super::no_change_feed())
        }
    }

    pub(crate) fn stats(&self) -> StoreStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StoreStats {
            write_statements: read(&self.counters.write_statements),
            rows_written: read(&self.counters.rows_written),
            conflicts: read(&self.counters.conflicts),
            load_statements: read(&self.counters.load_statements),
            users_loaded: read(&self.counters.users_loaded),
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Setup("the store's batching task has stopped".into())
}

/// Takes requests after `first` until the batch is full or `wait` has passed.
/// `admit` may refuse a request for this batch; refused ones go to `deferred`.
async fn gather<R>(
    requests: &mut mpsc::UnboundedReceiver<R>,
    first: R,
    max: usize,
    wait: Duration,
    deferred: &mut VecDeque<R>,
    mut admit: impl FnMut(&R) -> bool,
) -> Vec<R> {
    let mut batch = Vec::with_capacity(max.min(1024));
    // The first request is admitted through the same check, so that it
    // counts against what follows (one row per user per statement).
    let admitted = admit(&first);
    debug_assert!(admitted, "the first request of a batch is always admitted");
    batch.push(first);
    // Requests deferred from the previous batch come first.
    let mut still_deferred = VecDeque::new();
    while let Some(request) = deferred.pop_front() {
        if batch.len() < max && admit(&request) {
            batch.push(request);
        } else {
            still_deferred.push_back(request);
        }
    }
    *deferred = still_deferred;
    let deadline = Instant::now() + wait;
    while batch.len() < max {
        let next = match requests.try_recv() {
            Ok(request) => Some(request),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                tokio::time::timeout_at(deadline, requests.recv()).await.ok().flatten()
            }
        };
        match next {
            Some(request) if admit(&request) => batch.push(request),
            Some(request) => deferred.push_back(request),
            None => break,
        }
    }
    batch
}

async fn collect_writes(
    mut requests: mpsc::UnboundedReceiver<WriteRequest>,
    backend: Arc<dyn SqlBackend>,
    config: StoreConfig,
    counters: Arc<Counters>,
) {
    let slots = Arc::new(Semaphore::new(config.max_write_batches_in_flight.max(1)));
    let mut deferred = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(request) => request,
            None => match requests.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // One row per user per statement: a second write for the same user
        // (only possible from two actors of one user) waits for the next batch.
        let mut ids = HashSet::new();
        let batch = gather(
            &mut requests,
            first,
            config.max_batch_size,
            config.max_batch_wait,
            &mut deferred,
            |request: &WriteRequest| ids.insert(request.persistence_id.clone()),
        )
        .await;
        let (backend, counters) = (backend.clone(), counters.clone());
        let (timeout, feed) = (config.operation_timeout, config.change_feed);
        tokio::spawn(async move {
            execute_writes(backend.as_ref(), batch, timeout, feed, &counters).await;
            drop(slot);
        });
    }
}

async fn execute_writes(
    backend: &dyn SqlBackend,
    mut batch: Vec<WriteRequest>,
    timeout: Duration,
    feed: bool,
    counters: &Counters,
) {
    // The same lock order in every statement: concurrent batches from several
    // nodes cannot deadlock.
    batch.sort_unstable_by(|a, b| a.persistence_id.cmp(&b.persistence_id));
    let mut rows = Vec::with_capacity(batch.len());
    let mut accepted = Vec::with_capacity(batch.len());
    for request in batch {
        let row = (|| {
            let last = request
                .states
                .last()
                .ok_or_else(|| StoreError::Setup("a write without a state".into()))?;
            let revision = revision_column(request.revision)?;
            let mut changes = Vec::new();
            if feed {
                let first = revision - request.states.len() as i64 + 1;
                for (i, state) in request.states.iter().enumerate() {
                    changes.push((first + i as i64, encode(state)?));
                }
            }
            Ok::<_, StoreError>(RowWrite {
                persistence_id: request.persistence_id.clone(),
                mall_id: request.key.mall_id().to_owned(),
                user_id: request.key.user_id().to_owned(),
                expected: revision_column(request.expected)?,
                revision,
                payload: encode(last)?,
                changes,
            })
        })();
        match row {
            Ok(row) => {
                rows.push(row);
                accepted.push(request);
            }
            Err(error) => {
                let _ = request.reply.send(Err(error));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    metrics::histogram!("persist_durable_batch_rows").record(rows.len() as f64);
    let started = std::time::Instant::now();
    // The database enforces `timeout` itself (PostgreSQL's statement and lock
    // timeouts, SQLite's busy timeout), so its answer says whether the write
    // committed. Waiting twice as long only guards against a connection that
    // hangs without an answer, whose outcome is unknown.
    let backstop = timeout * 2;
    let outcome = tokio::time::timeout(backstop, backend.write_rows(rows))
        .await
        .unwrap_or(Err(StoreError::Timeout(backstop)));
    metrics::histogram!("persist_durable_persist_seconds").record(started.elapsed().as_secs_f64());
    Counters::add(&counters.write_statements, 1);
    match outcome {
        Ok(written) => {
            let rows_written = written.iter().filter(|&&w| w).count();
            Counters::add(&counters.rows_written, rows_written);
            Counters::add(&counters.conflicts, written.len() - rows_written);
            metrics::counter!("persist_durable_conflicts_total").increment((written.len() - rows_written) as u64);
            for (request, written) in accepted.into_iter().zip(written) {
                let result = if written {
                    Ok(request.revision)
                } else {
                    Err(StoreError::Conflict {
                        key: request.key,
                        expected: request.expected,
                    })
                };
                let _ = request.reply.send(result);
            }
        }
        Err(error) => {
            for request in accepted {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}

async fn collect_loads(
    mut requests: mpsc::UnboundedReceiver<LoadRequest>,
    backend: Arc<dyn SqlBackend>,
    config: StoreConfig,
    counters: Arc<Counters>,
) {
    // Bounded restores in flight: a restart with many active users does not
    // storm the database.
    let slots = Arc::new(Semaphore::new(config.max_restores_in_flight.max(1)));
    let mut deferred = VecDeque::new();
    while let Some(first) = requests.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let batch = gather(
            &mut requests,
            first,
            config.max_batch_size,
            config.max_batch_wait,
            &mut deferred,
            |_| true,
        )
        .await;
        let (backend, counters) = (backend.clone(), counters.clone());
        let timeout = config.operation_timeout;
        tokio::spawn(async move {
            execute_loads(backend.as_ref(), batch, timeout, &counters).await;
            drop(slot);
        });
    }
}

async fn execute_loads(backend: &dyn SqlBackend, batch: Vec<LoadRequest>, timeout: Duration, counters: &Counters) {
    let mut ids: Vec<String> = batch.iter().map(|r| r.persistence_id.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    Counters::add(&counters.load_statements, 1);
    Counters::add(&counters.users_loaded, ids.len());
    metrics::counter!("persist_durable_restores_total").increment(ids.len() as u64);
    let outcome = tokio::time::timeout(timeout, backend.load_rows(ids))
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
    match outcome {
        Ok(rows) => {
            for request in batch {
                let result = match rows.get(&request.persistence_id) {
                    Some(row) => row.decode(&request.key).map(Some),
                    None => Ok(None),
                };
                let _ = request.reply.send(result);
            }
        }
        Err(error) => {
            for request in batch {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}
