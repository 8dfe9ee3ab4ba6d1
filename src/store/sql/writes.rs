//! The write path of group commit: a batch of revision-checked writes
//! becomes one statement, and a row the database refuses is isolated so
//! that only its own write fails.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::debug;

use super::backend::{RowWrite, SqlBackend};
use super::batch::Request;
use super::group_commit::{count_by_entity, Counters};
use crate::entity::{PersistenceId, Revision};
use crate::error::StoreError;
use crate::store::rows::{RowOutcome, WriteRow};

pub(super) struct WriteRequest {
    pub(super) write: WriteRow,
    pub(super) reply: oneshot::Sender<Result<Revision, StoreError>>,
}

impl Request for WriteRequest {
    /// One row per entity per statement: a second write for the same entity
    /// (only possible from two actors of one entity) waits for the next batch.
    fn exclusive_key(&self) -> Option<&PersistenceId> {
        Some(&self.write.key)
    }
}

/// Who hears of what a write statement committed.
pub(super) struct Written {
    pub(super) counters: Arc<Counters>,
    /// Notified when rows were committed with the feed on.
    pub(super) feed_signal: Option<Arc<tokio::sync::Notify>>,
}

pub(super) async fn execute_writes<B: SqlBackend>(
    backend: Arc<B>,
    mut batch: Vec<WriteRequest>,
    feed: bool,
    split_for: Duration,
    Written { counters, feed_signal }: Written,
) {
    // Byte order of persistence ids, the order in which PostgreSQL's write
    // statement inserts and locks rows (see its `locked` step): with every
    // statement taking its locks in one global order, concurrent batches
    // from several nodes cannot deadlock, whatever the query plan.
    batch.sort_unstable_by(|a, b| a.write.key.cmp(&b.write.key));
    let mut rows = Vec::with_capacity(batch.len());
    let mut accepted = Vec::with_capacity(batch.len());
    for WriteRequest { write, reply } in batch {
        let (key, expected, revision) = (write.key.clone(), write.expected, write.revision);
        let epoch = write.fence.as_ref().map(|fence| fence.epoch);
        let fired = write.fired.as_ref().map(|fired| fired.name.clone());
        match RowWrite::bind(write, feed) {
            Ok(row) => {
                rows.push(row);
                accepted.push((key, expected, revision, (reply, epoch, fired)));
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    metrics::histogram!("persist_durable_batch_rows").record(rows.len() as f64);
    let started = Instant::now();
    let outcomes = write_isolating(backend.as_ref(), &rows, &counters, 0, started + split_for).await;
    metrics::histogram!("persist_durable_persist_seconds").record(started.elapsed().as_secs_f64());
    let rows_written = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Ok(RowOutcome::Written)))
        .count();
    let conflicts = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Ok(RowOutcome::Conflict)))
        .count();
    Counters::add(&counters.rows_written, rows_written);
    if let Some(signal) = feed_signal.filter(|_| rows_written > 0) {
        signal.notify_waiters();
    }
    Counters::add(&counters.conflicts, conflicts);
    if conflicts > 0 {
        let conflicted = rows
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, Ok(RowOutcome::Conflict)));
        count_by_entity(
            "persist_durable_conflicts_total",
            conflicted.map(|(row, _)| row.entity_type()),
        );
    }
    for ((key, expected, revision, answer), outcome) in accepted.into_iter().zip(outcomes) {
        let (reply, epoch, fired) = answer;
        let result = match outcome {
            Ok(RowOutcome::Written) => Ok(revision),
            Ok(RowOutcome::Conflict) => Err(StoreError::Conflict { key, expected }),
            Ok(RowOutcome::Fenced) => Err(StoreError::Fenced {
                slice: key.slice(),
                key,
                epoch: epoch.unwrap_or(0),
            }),
            Ok(RowOutcome::TimerGone) => Err(StoreError::TimerGone {
                key,
                name: fired.unwrap_or_default(),
            }),
            Err(error) => Err(error),
        };
        let _ = reply.send(result);
    }
}

type Outcomes<'a> = Pin<Box<dyn Future<Output = Vec<Result<RowOutcome, StoreError>>> + Send + 'a>>;

/// How far a refused batch is split: down to single rows of a batch of 4,096,
/// and no longer than this after the batch was first sent.
const MAX_SPLIT_DEPTH: u32 = 12;

/// Writes `rows` in one statement; if the database refuses the statement
/// for what one of its rows may hold ([`StoreError::may_be_a_row_refusal`]:
/// any refusal but the database's own failures), writes each half on its
/// own, down to the refused row alone, so that every other row still commits
/// and only the culprit gets the error, as [`StoreError::RowRefused`].
/// Failures of the database itself (down, timed out, deadlocked, out of
/// resources, outcome unknown) fail every row at once: halves would only
/// wait longer. Splitting stops at [`MAX_SPLIT_DEPTH`] or once `until` has
/// passed; the rows not yet written alone are then answered
/// [`StoreError::Unisolated`], which is worth retrying: they are likely not
/// the culprit.
fn write_isolating<'a, B: SqlBackend>(
    backend: &'a B,
    rows: &'a [RowWrite],
    counters: &'a Counters,
    depth: u32,
    until: Instant,
) -> Outcomes<'a> {
    Box::pin(async move {
        Counters::add(&counters.write_statements, 1);
        let error = match backend.write_rows(rows).await {
            Ok(written) => return written.into_iter().map(Ok).collect(),
            Err(error) => error,
        };
        if !error.may_be_a_row_refusal() {
            return vec![Err(error); rows.len()];
        }
        if let [row] = rows {
            return vec![Err(StoreError::RowRefused {
                key: row.key.clone(),
                source: Arc::new(error),
            })];
        }
        if depth >= MAX_SPLIT_DEPTH || Instant::now() >= until {
            let error = Arc::new(error);
            return rows
                .iter()
                .map(|row| {
                    Err(StoreError::Unisolated {
                        key: row.key.clone(),
                        source: error.clone(),
                    })
                })
                .collect();
        }
        debug!(rows = rows.len(), %error, "the database refused a row of a batch; writing its halves apart");
        let (left, right) = rows.split_at(rows.len() / 2);
        let mut outcomes = write_isolating(backend, left, counters, depth + 1, until).await;
        outcomes.extend(write_isolating(backend, right, counters, depth + 1, until).await);
        outcomes
    })
}
