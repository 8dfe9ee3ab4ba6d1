//! Group commit: writes from many user actors become one multi-row,
//! revision-checked statement per round trip, and restores of many users
//! one query per batch.
//!
//! A collector task on the store's runtime takes the first request, gathers
//! what arrives within [`StoreConfig::max_batch_wait`], up to a full batch,
//! and hands the batch to an executor once one of a bounded number of
//! slots is free. While every slot is busy, requests pile up, so batches grow
//! with the load: no wait is added beyond the bound, and the database sees
//! few, large statements exactly when it is busiest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use super::row::{bigint, integer, schema_version, StateRow};
use super::runtime::DbRuntime;
use super::{ChangeRow, StoreConfig, StoreStats, StoredRow, WriteRow};
use crate::entity::{PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// One row of a write batch, as a backend binds it.
#[derive(Debug, Clone)]
pub(crate) struct RowWrite {
    pub(crate) persistence_id: PersistenceId,
    pub(crate) manifest: &'static str,
    /// The revision the row must have (0: the row must not exist).
    pub(crate) expected: i64,
    pub(crate) revision: i64,
    /// `state_schema_version` of the row and of each of its changes.
    pub(crate) schema_version: i32,
    pub(crate) payload: Vec<u8>,
    /// For the change feed, when it is on: every revision this write
    /// commits, in order, with its state (the last is `revision`, `payload`).
    pub(crate) changes: Vec<(i64, Vec<u8>)>,
}

impl RowWrite {
    pub(crate) fn entity_type(&self) -> &str {
        self.persistence_id.entity_type()
    }
}

/// A change feed row as a backend read it.
pub(crate) struct FeedRow {
    pub(crate) position: i64,
    pub(crate) persistence_id: String,
    pub(crate) revision: i64,
    pub(crate) committed_at: chrono::DateTime<chrono::Utc>,
    pub(crate) state_schema_version: i32,
    pub(crate) state_payload: Vec<u8>,
}

impl FeedRow {
    fn decode(self) -> Result<ChangeRow, StoreError> {
        // Read after a position of at least 0, so never negative.
        let position = u64::try_from(self.position).unwrap_or(0);
        let key = PersistenceId::parse(&self.persistence_id).ok_or_else(|| StoreError::CorruptChange {
            position,
            key: PersistenceId::new("?", &self.persistence_id),
            source: CorruptRow::Key(crate::InvalidInput::MalformedKey {
                entity_id: self.persistence_id.clone(),
                reason: "no `|` after the entity type",
            }),
        })?;
        let corrupt = |source: CorruptRow| StoreError::CorruptChange {
            position,
            key: key.clone(),
            source,
        };
        let revision = u64::try_from(self.revision)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| corrupt(CorruptRow::Revision))?;
        let schema_version = schema_version(self.state_schema_version).map_err(corrupt)?;
        Ok(ChangeRow {
            position,
            key,
            revision: Revision(revision),
            schema_version,
            payload: self.state_payload,
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
    ///
    /// An error means nothing was committed, except
    /// [`StoreError::OutcomeUnknown`]: the statement was sent and no answer
    /// came back. The wait for a connection is bounded apart from the
    /// statement, so a slow pool never turns into an unknown outcome.
    async fn write_rows(&self, rows: &[RowWrite]) -> Result<Vec<bool>, StoreError>;

    /// The stored rows among `persistence_ids`, keyed by persistence id.
    async fn load_rows(&self, persistence_ids: Vec<String>) -> Result<HashMap<String, StateRow>, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Up to `limit` change feed rows of `entity_type` after `after`, in position order.
    async fn read_changes(&self, entity_type: String, after: i64, limit: i64) -> Result<Vec<FeedRow>, StoreError>;

    /// The position `consumer` saved.
    async fn load_offset(&self, consumer: String) -> Result<Option<i64>, StoreError>;

    /// Saves `consumer`'s position.
    async fn save_offset(&self, consumer: String, position: i64) -> Result<(), StoreError>;

    /// Up to `limit` `(persistence_id, revision)` of `entity_type` with
    /// `db_timestamp` before `written_before` and persistence id after
    /// `after`, in persistence id order.
    async fn purge_candidates(
        &self,
        entity_type: String,
        written_before: chrono::DateTime<chrono::Utc>,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError>;

    /// Deletes each row still at its given revision and still written before
    /// `written_before`, both checked by the deleting statement; with
    /// `tombstone`, records each deletion in the feed in the same
    /// transaction, as the next revision with that payload. `rows` are in
    /// byte order of persistence ids and unique. Returns the ids deleted.
    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, i64)>,
        written_before: chrono::DateTime<chrono::Utc>,
        tombstone: Option<&'static [u8]>,
    ) -> Result<Vec<String>, StoreError>;

    /// The number of rows of `entity_type`.
    async fn count_entities(&self, entity_type: String) -> Result<i64, StoreError>;

    /// Up to `limit` `(persistence_id, revision)` of `entity_type` after
    /// `after`, in persistence id order.
    async fn entity_ids(
        &self,
        entity_type: String,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError>;
}

struct WriteRequest {
    write: WriteRow,
    reply: oneshot::Sender<Result<Revision, StoreError>>,
}

struct LoadRequest {
    key: PersistenceId,
    reply: oneshot::Sender<Result<Option<StoredRow>, StoreError>>,
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

    pub(crate) async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = LoadRequest {
            key: key.clone(),
            reply,
        };
        self.loads.send(request).map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub(crate) async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        write.check()?;
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest { write, reply })
            .map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub(crate) fn keeps_change_feed(&self) -> bool {
        self.feed
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        self.runtime.run(async move { backend.ping().await }).await
    }

    pub(crate) async fn read_changes(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        self.require_feed()?;
        let (backend, entity_type) = (self.backend.clone(), entity_type.to_owned());
        let after = bigint(after)?;
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.runtime
            .run(async move {
                let rows = backend.read_changes(entity_type, after, limit).await?;
                super::good_prefix(rows.into_iter().map(FeedRow::decode))
            })
            .await
    }

    pub(crate) async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let (backend, consumer) = (self.backend.clone(), consumer.to_owned());
        let position = self
            .runtime
            .run(async move { backend.load_offset(consumer).await })
            .await?;
        Ok(position.and_then(|p| u64::try_from(p).ok()))
    }

    pub(crate) async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let (backend, consumer) = (self.backend.clone(), consumer.to_owned());
        let position = bigint(position)?;
        self.runtime
            .run(async move { backend.save_offset(consumer, position).await })
            .await
    }

    fn require_feed(&self) -> Result<(), StoreError> {
        if self.feed {
            Ok(())
        } else {
            Err(StoreError::NoChangeFeed)
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

/// Takes what is queued after `first`, then, unless the batch is already
/// full, what arrives within `wait` (zero: nothing more), up to `max`.
/// `admit` may refuse a request for this batch; refused ones go to `deferred`.
///
/// It sleeps once for the rest of the window instead of listening: a
/// listening collector is woken across threads by every request at every
/// load below the peak. The price is that a batch that fills while it
/// sleeps still waits out the window, which `wait` bounds anyway.
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
    let open = take_queued(requests, max, &mut batch, deferred, &mut admit);
    if open && batch.len() < max && !wait.is_zero() {
        tokio::time::sleep_until(deadline).await;
        take_queued(requests, max, &mut batch, deferred, &mut admit);
    }
    batch
}

/// Moves queued requests into `batch` (or `deferred`) until it holds `max`
/// or none is left; false once every sender is gone.
fn take_queued<R>(
    requests: &mut mpsc::UnboundedReceiver<R>,
    max: usize,
    batch: &mut Vec<R>,
    deferred: &mut VecDeque<R>,
    admit: &mut impl FnMut(&R) -> bool,
) -> bool {
    while batch.len() < max {
        match requests.try_recv() {
            Ok(request) if admit(&request) => batch.push(request),
            Ok(request) => deferred.push_back(request),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
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
        // At most one batch of keys: a fast hash is safe here.
        let mut ids: HashSet<_, foldhash::fast::RandomState> = HashSet::default();
        let batch = gather(
            &mut requests,
            first,
            config.max_batch_size,
            config.max_batch_wait,
            &mut deferred,
            |request: &WriteRequest| ids.insert(request.write.key.clone()),
        )
        .await;
        let (backend, counters) = (backend.clone(), counters.clone());
        let feed = config.change_feed;
        tokio::spawn(async move {
            execute_writes(backend.as_ref(), batch, feed, &counters).await;
            drop(slot);
        });
    }
}

async fn execute_writes(backend: &dyn SqlBackend, mut batch: Vec<WriteRequest>, feed: bool, counters: &Counters) {
    // Byte order of persistence ids, the order in which PostgreSQL's write
    // statement inserts and locks rows (see its `locked` step): with every
    // statement taking its locks in one global order, concurrent batches
    // from several nodes cannot deadlock, whatever the query plan.
    batch.sort_unstable_by(|a, b| a.write.key.cmp(&b.write.key));
    let mut rows = Vec::with_capacity(batch.len());
    let mut accepted = Vec::with_capacity(batch.len());
    for mut request in batch {
        match row_write(&mut request.write, feed) {
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
    let outcomes = write_isolating(backend, &rows, counters).await;
    metrics::histogram!("persist_durable_persist_seconds").record(started.elapsed().as_secs_f64());
    let rows_written = outcomes.iter().filter(|outcome| matches!(outcome, Ok(true))).count();
    let conflicts = outcomes.iter().filter(|outcome| matches!(outcome, Ok(false))).count();
    Counters::add(&counters.rows_written, rows_written);
    Counters::add(&counters.conflicts, conflicts);
    if conflicts > 0 {
        let conflicted = accepted
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, Ok(false)));
        count_by_entity(
            "persist_durable_conflicts_total",
            conflicted.map(|(request, _)| request.write.key.entity_type()),
        );
    }
    for (request, outcome) in accepted.into_iter().zip(outcomes) {
        let result = match outcome {
            Ok(true) => Ok(request.write.revision),
            Ok(false) => Err(StoreError::Conflict {
                key: request.write.key,
                expected: request.write.expected,
            }),
            Err(error) => Err(error),
        };
        let _ = request.reply.send(result);
    }
}

type Outcomes<'a> = Pin<Box<dyn Future<Output = Vec<Result<bool, StoreError>>> + Send + 'a>>;

/// Writes `rows` in one statement; if the database refuses the statement
/// because of a row in it (a constraint, a trigger, a value out of range),
/// writes each half on its own, down to the refused row alone, so that every
/// other row still commits and only the culprit gets the error. Failures of
/// the database itself (down, timed out, outcome unknown) fail every row at
/// once: trying halves would only wait longer.
fn write_isolating<'a>(backend: &'a dyn SqlBackend, rows: &'a [RowWrite], counters: &'a Counters) -> Outcomes<'a> {
    Box::pin(async move {
        Counters::add(&counters.write_statements, 1);
        match backend.write_rows(rows).await {
            Ok(written) => written.into_iter().map(Ok).collect(),
            Err(error) if rows.len() > 1 && error.is_row_refusal() => {
                debug!(rows = rows.len(), %error, "the database refused a batch; writing its halves apart");
                let (left, right) = rows.split_at(rows.len() / 2);
                let mut outcomes = write_isolating(backend, left, counters).await;
                outcomes.extend(write_isolating(backend, right, counters).await);
                outcomes
            }
            Err(error) => vec![Err(error); rows.len()],
        }
    })
}

/// The bound form of one write, taking its payloads: the row's state, and
/// with the feed on every revision's.
fn row_write(write: &mut WriteRow, feed: bool) -> Result<RowWrite, StoreError> {
    let revision = bigint(write.revision.0)?;
    let mut payloads = std::mem::take(&mut write.payloads);
    let invalid = || StoreError::InvalidWrite {
        key: write.key.clone(),
        expected: write.expected,
        revision: write.revision,
        states: 0,
    };
    let (payload, changes) = if feed {
        let payload = payloads.last().cloned().ok_or_else(invalid)?;
        let first = revision - payloads.len() as i64 + 1;
        (payload, (first..).zip(payloads).collect())
    } else {
        (payloads.pop().ok_or_else(invalid)?, Vec::new())
    };
    Ok(RowWrite {
        persistence_id: write.key.clone(),
        manifest: write.manifest,
        expected: bigint(write.expected.0)?,
        revision,
        schema_version: integer(write.schema_version)?,
        payload,
        changes,
    })
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
    let mut keys: Vec<&PersistenceId> = batch.iter().map(|r| &r.key).collect();
    keys.sort_unstable();
    keys.dedup();
    count_by_entity(
        "persist_durable_restores_total",
        keys.iter().map(|key| key.entity_type()),
    );
    let ids: Vec<String> = keys.iter().map(|key| key.as_str().to_owned()).collect();
    // Two actors of one entity may ask at once: then each gets a copy.
    let shared_rows = ids.len() < batch.len();
    Counters::add(&counters.load_statements, 1);
    Counters::add(&counters.users_loaded, ids.len());
    let outcome = tokio::time::timeout(timeout, backend.load_rows(ids))
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
    match outcome {
        Ok(mut rows) => {
            for request in batch {
                let row = if shared_rows {
                    rows.get(request.key.as_str()).cloned()
                } else {
                    rows.remove(request.key.as_str())
                };
                let result = match row {
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

/// Adds one to the counter `name` per item of `entity_types`, labelled
/// `entity` like the actors' metrics: one call per entity type of a batch,
/// not per row (a statement may carry entities of several types).
fn count_by_entity<'a>(name: &'static str, entity_types: impl Iterator<Item = &'a str>) {
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

/// Retention and admin reads: statements of their own, run on the store's
/// runtime like loads, outside the write batches.
impl GroupCommit {
    pub(crate) async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: chrono::DateTime<chrono::Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let backend = self.backend.clone();
        let (entity_type, after) = (entity_type.to_owned(), after.map(|id| id.as_str().to_owned()));
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.runtime
            .run(async move {
                let rows = backend
                    .purge_candidates(entity_type, written_before, after, limit)
                    .await?;
                rows.into_iter()
                    .map(|(id, revision)| Ok((stored_id(&id, revision)?, stored_revision(&id, revision)?)))
                    .collect()
            })
            .await
    }

    pub(crate) async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let mut rows = rows
            .into_iter()
            .map(|(id, revision)| Ok((id, bigint(revision.0)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Byte order, unique: the order every statement of the store locks rows in.
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let by_id: HashMap<String, PersistenceId> = rows
            .iter()
            .map(|(id, _)| (id.as_str().to_owned(), id.clone()))
            .collect();
        let tombstone = self.feed.then_some(super::admin::TOMBSTONE);
        let backend = self.backend.clone();
        let purged = self
            .runtime
            .run(async move { backend.purge_rows(rows, written_before, tombstone).await })
            .await?;
        Ok(purged.into_iter().filter_map(|id| by_id.get(&id).cloned()).collect())
    }

    pub(crate) async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let (backend, entity_type) = (self.backend.clone(), entity_type.to_owned());
        let count = self
            .runtime
            .run(async move { backend.count_entities(entity_type).await })
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub(crate) async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let backend = self.backend.clone();
        let (entity_type, after) = (entity_type.to_owned(), after.map(str::to_owned));
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.runtime
            .run(async move {
                let rows = backend.entity_ids(entity_type, after, limit).await?;
                rows.into_iter()
                    .map(|(id, revision)| stored_id(&id, revision))
                    .collect()
            })
            .await
    }
}

/// A stored row's persistence id, which this crate always writes as `<entity type>|<entity id>`.
fn stored_id(id: &str, revision: i64) -> Result<PersistenceId, StoreError> {
    PersistenceId::parse(id).ok_or_else(|| StoreError::Corrupt {
        key: PersistenceId::new("?", id),
        revision,
        source: CorruptRow::Key(crate::InvalidInput::MalformedKey {
            entity_id: id.to_owned(),
            reason: "no `|` after the entity type",
        }),
    })
}

/// A stored row's revision, which is at least 1.
fn stored_revision(id: &str, revision: i64) -> Result<Revision, StoreError> {
    u64::try_from(revision)
        .ok()
        .filter(|&r| r > 0)
        .map(Revision)
        .ok_or_else(|| StoreError::Corrupt {
            key: PersistenceId::parse(id).unwrap_or_else(|| PersistenceId::new("?", id)),
            revision,
            source: CorruptRow::Revision,
        })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::gather;

    const WINDOW: Duration = Duration::from_millis(1);

    /// A batch, and the channel it was taken from.
    type Gathered = (Vec<u32>, mpsc::UnboundedReceiver<u32>);

    /// Gathers a batch after `first` on a task of its own, counting how
    /// often the task is polled, that is, woken.
    fn gather_counting_polls(
        mut requests: mpsc::UnboundedReceiver<u32>,
        first: u32,
        max: usize,
    ) -> (tokio::task::JoinHandle<Gathered>, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = tokio::spawn(async move {
            let mut deferred = VecDeque::new();
            let batch = {
                let mut gathering = Box::pin(gather(&mut requests, first, max, WINDOW, &mut deferred, |_| true));
                std::future::poll_fn(|cx| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    gathering.as_mut().poll(cx)
                })
                .await
            };
            (batch, requests)
        });
        (task, polls)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_sent_within_the_window_join_the_batch_without_waking_the_collector() {
        let (sender, requests) = mpsc::unbounded_channel();
        let (task, polls) = gather_counting_polls(requests, 0, 512);
        tokio::task::yield_now().await; // the collector is now waiting
        for request in 1..=100 {
            sender.send(request).unwrap();
            tokio::task::yield_now().await;
        }
        let (batch, _) = task.await.unwrap();
        assert_eq!(
            batch,
            (0..=100).collect::<Vec<_>>(),
            "every request of the window, in order"
        );
        assert!(
            polls.load(Ordering::Relaxed) <= 3,
            "woken {} times for 100 requests: senders must not wake the collector",
            polls.load(Ordering::Relaxed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holds_at_most_its_size_and_the_rest_waits_for_the_next() {
        let (sender, requests) = mpsc::unbounded_channel();
        for request in 1..=10 {
            sender.send(request).unwrap();
        }
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 0, 4);
        let (batch, mut requests) = task.await.unwrap();
        assert_eq!(batch, [0, 1, 2, 3]);
        assert_eq!(started.elapsed(), Duration::ZERO, "a batch full at once goes at once");
        assert_eq!(requests.try_recv().unwrap(), 4, "the rest stays queued, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_waits_for_a_later_batch_ahead_of_newer_ones() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        for request in [1, 2, 1, 3] {
            sender.send(request).unwrap();
        }
        let mut deferred = VecDeque::new();
        let mut seen = std::collections::HashSet::new();
        let batch = gather(&mut requests, 0, 512, WINDOW, &mut deferred, |r| seen.insert(*r)).await;
        assert_eq!(batch, [0, 1, 2, 3], "one of each per batch");
        assert_eq!(deferred, [1], "the second 1 is kept back");

        sender.send(4).unwrap();
        let first = deferred.pop_front().unwrap();
        let mut seen = std::collections::HashSet::new();
        let next = gather(&mut requests, first, 512, WINDOW, &mut deferred, |r| seen.insert(*r)).await;
        assert_eq!(next, [1, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn once_every_sender_is_gone_a_batch_goes_without_waiting() {
        let (sender, requests) = mpsc::unbounded_channel();
        sender.send(1).unwrap();
        drop(sender);
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 0, 512);
        let (batch, _) = task.await.unwrap();
        assert_eq!(batch, [0, 1]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_window_a_batch_takes_what_is_queued_and_goes_at_once() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        sender.send(1).unwrap();
        let started = tokio::time::Instant::now();
        let batch = gather(&mut requests, 0, 512, Duration::ZERO, &mut VecDeque::new(), |_| true).await;
        assert_eq!(batch, [0, 1]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_out_when_its_window_has_passed() {
        let (_sender, requests) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 7, 512);
        let (batch, _) = task.await.unwrap();
        assert_eq!(batch, [7]);
        assert_eq!(started.elapsed(), WINDOW, "no longer than the window, and not sooner");
    }
}
