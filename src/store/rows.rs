//! What passes through the store seam: rows of bytes as the stores keep
//! them, and the typed state a load gives back.

use chrono::{DateTime, Utc};

use crate::entity::{Durable, DurableEntity, EventId, PersistenceId, Revision, SourceOffsets};
use crate::error::StoreError;

/// An entity's state as committed, with its revision and what the machinery
/// remembers beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredState<E> {
    /// The committed revision.
    pub revision: Revision,
    /// The committed state.
    pub state: E,
    /// Ids of the most recently applied events, oldest first.
    pub recent_event_ids: Vec<EventId>,
    /// When the entity was last deleted, if ever: events that happened
    /// before it are not applied.
    pub erased_at: Option<DateTime<Utc>>,
    /// This revision is the entity's deletion (its state is the default).
    pub deleted: bool,
    /// Per source partition (`topic/partition`), the offset of the last
    /// ingested record applied to this entity, written with the state.
    pub source_offsets: SourceOffsets,
}

impl<E: DurableEntity> StoredState<E> {
    /// What an entity never seen before has: the default state at [`Revision::NONE`].
    pub fn initial() -> Self {
        Self::from_durable(Revision::NONE, Durable::default())
    }

    pub(crate) fn from_durable(revision: Revision, durable: Durable<E>) -> Self {
        Self {
            revision,
            deleted: durable.is_tombstone(),
            erased_at: durable.erased_at(),
            state: durable.state,
            recent_event_ids: durable.event_ids,
            source_offsets: durable.source_offsets.to_map(),
        }
    }
}

/// A stored row as the store holds it: entity-agnostic bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The committed revision (at least 1).
    pub revision: Revision,
    /// Which life of the row this is: set when the row is created and kept
    /// by every write, so a row purged and created again under the same id
    /// (at revision 1 again) is told apart from the one before it. 0 for
    /// rows created before generations existed.
    pub generation: u64,
    /// The schema version the state was written at (`state_schema_version`):
    /// the writing entity's [`DurableEntity::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The encoded state.
    pub payload: Vec<u8>,
}

/// One revision-checked write of one row, as the store takes it.
#[derive(Debug, Clone)]
pub struct WriteRow {
    /// The row.
    pub key: PersistenceId,
    /// `state_ser_manifest`: what the payloads are.
    pub manifest: &'static str,
    /// The revision the row must have ([`Revision::NONE`]: no row yet).
    pub expected: Revision,
    /// The row's [generation](StoredRow::generation): for a new row the one
    /// it is created with, for an existing row the one it must still have,
    /// so that a write based on a row since purged (and maybe created again
    /// at the same revision) fails as a conflict. `None`: a new row gets a
    /// fresh one, and an existing row's is not checked.
    pub generation: Option<u64>,
    /// The revision written; above `expected`.
    pub revision: Revision,
    /// `state_schema_version` of the payloads: the entity's
    /// [`DurableEntity::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The encoded states of the last `payloads.len()` revisions up to
    /// `revision`, oldest first: the row keeps the last, the change feed
    /// (when the store keeps one) gets each. Without a feed, the last alone
    /// suffices.
    pub payloads: Vec<Vec<u8>>,
    /// This write deletes the entity: the change feed's earlier rows of it
    /// are redacted in the same statement (the caller redacts the earlier
    /// payloads of this write itself).
    pub erases: bool,
    /// In cluster mode, the ownership the write is made under: it commits
    /// only while that node owns the row's slice at that epoch, with its
    /// lease unexpired; otherwise it fails with [`StoreError::Fenced`].
    pub fence: Option<Fence>,
    /// The entity's timers this write sets and cancels, committed with it.
    pub timers: Vec<TimerChange>,
    /// The timer whose fire this write commits: it commits only while that
    /// timer is still at the due time it fired for (else it fails with
    /// [`StoreError::TimerGone`]), and consumes it.
    pub fired: Option<TimerFired>,
}

/// A change of one of an entity's timers, committed with its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    /// Sets the timer `name` (or sets it anew) to fire at `due`.
    Set {
        /// Its name.
        name: String,
        /// When it fires first.
        due: DateTime<Utc>,
        /// Its schedule, encoded.
        schedule: String,
        /// The command it delivers, encoded.
        command: Vec<u8>,
        /// What it does with missed occurrences, encoded.
        missed: i32,
    },
    /// Cancels the timer `name`.
    Cancel {
        /// Its name.
        name: String,
    },
}

impl TimerChange {
    /// The timer it changes.
    pub fn name(&self) -> &str {
        match self {
            TimerChange::Set { name, .. } | TimerChange::Cancel { name } => name,
        }
    }
}

/// The timer a write commits the fire of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerFired {
    /// Its name.
    pub name: String,
    /// The due time it fired for: the write commits only if the timer is still there.
    pub due: DateTime<Utc>,
    /// When it fires next (a recurring timer), or `None`: deleted.
    pub next: Option<DateTime<Utc>>,
}

/// A pending timer as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTimer {
    /// The entity.
    pub key: PersistenceId,
    /// Its name.
    pub name: String,
    /// When it fires next.
    pub due: DateTime<Utc>,
    /// Its schedule, encoded.
    pub schedule: String,
    /// The command it delivers, encoded.
    pub command: Vec<u8>,
    /// What it does with missed occurrences, encoded.
    pub missed: i32,
}

/// The ownership a write in cluster mode is made under: the fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The writing node.
    pub node: std::sync::Arc<str>,
    /// The epoch of the row's slice this node owns: changed by every
    /// transfer of the slice.
    pub epoch: u64,
}

/// What became of one row of a batched write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    /// Committed.
    Written,
    /// The stored row was not at the expected revision (or generation).
    Conflict,
    /// Its fence did not hold: the node no longer owns the row's slice at
    /// that epoch, or its lease has expired.
    Fenced,
    /// It committed a timer's fire, and the timer is no longer at the due
    /// time it fired for (fired already, moved or cancelled).
    TimerGone,
}

/// A generation for a new row: 63 random bits, never 0 (the generation of
/// rows from before generations). std's `RandomState` is keyed from the
/// operating system's randomness, so two processes draw apart.
pub(crate) fn fresh_generation() -> u64 {
    use std::hash::BuildHasher;
    let drawn = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    (drawn >> 1).max(1)
}

impl WriteRow {
    /// Refuses writes that cannot be right, before they reach a batch where
    /// they would fail everyone's statement.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        let revisions = self.revision.0.saturating_sub(self.expected.0);
        if revisions == 0 || self.payloads.is_empty() || self.payloads.len() as u64 > revisions {
            return Err(StoreError::InvalidWrite {
                key: self.key.clone(),
                expected: self.expected,
                revision: self.revision,
                states: self.payloads.len(),
            });
        }
        Ok(())
    }

    /// Every revision this write commits with its payload, oldest first: the
    /// last `payloads.len()` revisions up to [`revision`](Self::revision).
    pub(crate) fn changes(&self) -> impl Iterator<Item = (Revision, &[u8])> {
        let first = self.revision.0 + 1 - self.payloads.len() as u64;
        (first..).map(Revision).zip(self.payloads.iter().map(Vec::as_slice))
    }

    /// The state the row keeps: the last payload.
    pub(crate) fn last_payload(&self) -> &[u8] {
        self.payloads.last().map_or(&[], Vec::as_slice)
    }
}

/// A change feed entry as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// Where the change stands in the feed of all entity types: in commit order.
    pub position: u64,
    /// The entity.
    pub key: PersistenceId,
    /// The revision committed.
    pub revision: Revision,
    /// The schema version the state was written at.
    pub schema_version: u32,
    /// The encoded state at that revision.
    pub payload: Vec<u8>,
    /// When the writing transaction ran, by the database's clock.
    pub committed_at: DateTime<Utc>,
}

/// Where a change feed stands; see [`ChangeLog::feed_bounds`](super::ChangeLog::feed_bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedBounds {
    /// The last position given out (0: none yet).
    pub head: u64,
    /// The lowest position a feed consumer saved, if any consumer did.
    pub slowest_consumer: Option<u64>,
}

/// How long the change feed keeps its changes: trimmed by
/// [`ChangeLogExt::trim_feed`](super::ChangeLogExt::trim_feed), and every
/// [`every`](Self::every) by a manager started with
/// [`Config::with_feed_retention`](crate::Config::with_feed_retention).
///
/// A change is removed once it is older than [`keep_for`](Self::keep_for)
/// (if set) and more than [`keep_last`](Self::keep_last) positions behind
/// the head (if set), and, unless [`beyond_consumers`](Self::beyond_consumers),
/// only once every feed consumer has saved a position past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedRetention {
    /// Keep every change committed within this long.
    pub keep_for: Option<std::time::Duration>,
    /// Keep the last this many positions.
    pub keep_last: Option<u64>,
    /// Trim even what a consumer has not read yet.
    pub beyond_consumers: bool,
    /// Changes removed per statement at most.
    pub chunk_size: usize,
    /// How often a manager trims.
    pub every: std::time::Duration,
}

impl FeedRetention {
    /// Keeps the changes committed within `age`, and every change a
    /// consumer has not read yet; trims hourly, 1,000 rows per statement.
    pub fn keep_for(age: std::time::Duration) -> Self {
        Self {
            keep_for: Some(age),
            ..Self::keep_last(0)
        }
    }

    /// Keeps the last `positions` changes, and every change a consumer has
    /// not read yet; trims hourly, 1,000 rows per statement.
    pub fn keep_last(positions: u64) -> Self {
        Self {
            keep_for: None,
            keep_last: Some(positions),
            beyond_consumers: false,
            chunk_size: 1_000,
            every: std::time::Duration::from_secs(60 * 60),
        }
    }

    /// Also keeps the last `positions` changes.
    pub fn and_keep_last(mut self, positions: u64) -> Self {
        self.keep_last = Some(positions);
        self
    }

    /// Trims what consumers have not read yet too: for a consumer that was
    /// abandoned, whose saved position would otherwise keep the feed forever.
    pub fn beyond_consumers(mut self) -> Self {
        self.beyond_consumers = true;
        self
    }

    /// Sets [`chunk_size`](Self::chunk_size); at least 1.
    pub fn with_chunk_size(mut self, rows: usize) -> Self {
        self.chunk_size = rows.max(1);
        self
    }

    /// Sets [`every`](Self::every); at least a millisecond.
    pub fn every(mut self, interval: std::time::Duration) -> Self {
        self.every = interval.max(std::time::Duration::from_millis(1));
        self
    }
}

/// Counters of a store: how well group commit and bulk restore are batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Write statements (batches) executed.
    pub write_statements: u64,
    /// Rows those statements wrote (conflicts excluded).
    pub rows_written: u64,
    /// Rows refused because their revision had moved on.
    pub conflicts: u64,
    /// Load statements (batches) executed.
    pub load_statements: u64,
    /// Entities those statements looked up.
    pub entities_loaded: u64,
}

/// The rows before the first that failed to decode; the failure itself when
/// it is the first. A change feed read thus delivers every change before a
/// corrupt one and then stops at it, never passing over it.
pub(crate) fn good_prefix<T>(rows: impl IntoIterator<Item = Result<T, StoreError>>) -> Result<Vec<T>, StoreError> {
    let mut good = Vec::new();
    for row in rows {
        match row {
            Ok(row) => good.push(row),
            Err(error) if good.is_empty() => return Err(error),
            Err(_) => break,
        }
    }
    Ok(good)
}
