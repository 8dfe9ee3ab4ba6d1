//! The port between the SQL store and a database: [`SqlBackend`], the
//! statements of one database, and the forms rows take where SQL binds and
//! reads them. Revisions, positions and sizes are the crate's own types up
//! to here, and become `BIGINT`s and `INTEGER`s only in this module.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::entity::{InvalidInput, PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};
use crate::store::rows::{fresh_generation, ChangeRow, RowOutcome, StoredRow, StoredTimer, TimerChange, WriteRow};
use crate::store::JSON_SERIALIZER_ID;

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// The batch statements of one database (PostgreSQL or SQLite) behind a
/// [`SqlStore`](super::SqlStore): what group commit sends. Implemented by the
/// crate's backends only; each also implements the other capabilities for
/// its own store.
#[async_trait]
pub trait SqlBackend: Sealed + Send + Sync + 'static {
    /// The store's name, as its `Debug` shows it (`PostgresStore`).
    const STORE_NAME: &'static str;

    /// Writes every row whose stored revision is its expected one (and
    /// whose fence holds), atomically per row; returns, in input order, what
    /// became of each. Persistence ids in one call are unique, and fenced
    /// rows all carry one node's fence.
    ///
    /// An error means nothing was committed, except
    /// [`StoreError::OutcomeUnknown`]: the statement was sent and no answer
    /// came back. The wait for a connection is bounded apart from the
    /// statement, so a slow pool never turns into an unknown outcome.
    async fn write_rows(&self, rows: &[RowWrite]) -> Result<Vec<RowOutcome>, StoreError>;

    /// The stored rows among `keys`, keyed by persistence id.
    async fn load_rows(&self, keys: &[&PersistenceId]) -> Result<HashMap<String, StateRow>, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The store's cluster statements, if its database holds them.
    fn leases(store: &super::SqlStore<Self>) -> Option<&dyn crate::store::Leases>
    where
        Self: Sized,
    {
        let _ = store;
        None
    }
}

/// One row of a write batch, with every value already checked to fit its
/// column: binding it cannot fail, so one row's values never fail a batch.
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub(crate) key: PersistenceId,
    pub(crate) manifest: &'static str,
    /// The revision the row must have (0: the row must not exist).
    pub(crate) expected: i64,
    /// The generation a new row is created with, or the one an existing row
    /// must have (`None`: any).
    pub(crate) generation: Option<i64>,
    pub(crate) revision: i64,
    /// `state_schema_version` of the row and of each of its changes.
    pub(crate) schema_version: i32,
    pub(crate) payload: Vec<u8>,
    /// For the change feed, when it is on: every revision this write
    /// commits, in order, with its state (the last is `revision`, `payload`).
    pub(crate) changes: Vec<(i64, Vec<u8>)>,
    /// It deletes the entity: its earlier feed rows are redacted.
    pub(crate) erases: bool,
    /// The row's slice.
    pub(crate) slice: i32,
    /// In cluster mode, the writing node and the epoch of the slice it owns.
    pub(crate) fence: Option<(std::sync::Arc<str>, i64)>,
    /// The timers it sets and cancels (none when it erases: an erasure
    /// deletes them all).
    pub(crate) timers: Vec<TimerChange>,
    /// The timer whose fire it commits.
    pub(crate) fired: Option<BoundFire>,
}

/// The fire a row's write commits: the row is written only while the timer
/// `name` is at `due`.
#[derive(Debug, Clone)]
pub(crate) struct BoundFire {
    pub(crate) name: String,
    pub(crate) due: DateTime<Utc>,
    /// What the write does to the timer: `Some(None)` deletes it,
    /// `Some(Some(next))` moves it to its next occurrence, `None` leaves it
    /// to the write's own change of it (its state set it anew or cancelled
    /// it, or the write erases the entity): one statement changes a row once.
    pub(crate) consume: Option<Option<DateTime<Utc>>>,
}

impl RowWrite {
    /// The bound form of `write`, taking its payloads: the row's state, and
    /// with the feed on every revision's.
    pub(crate) fn bind(mut write: WriteRow, feed: bool) -> Result<Self, StoreError> {
        let expected = bigint(write.expected.0)?;
        let generation = match (write.expected, write.generation) {
            (Revision::NONE, None) => Some(fresh_generation()),
            (_, generation) => generation,
        }
        .map(bigint)
        .transpose()?;
        let revision = bigint(write.revision.0)?;
        let schema_version = integer(write.schema_version)?;
        let changes = if feed {
            write
                .changes()
                .map(|(r, payload)| (r.0 as i64, payload.to_vec()))
                .collect()
        } else {
            Vec::new()
        };
        let payload = write.payloads.pop().unwrap_or_default();
        let fence = match write.fence {
            Some(fence) => Some((fence.node, bigint(fence.epoch)?)),
            None => None,
        };
        let timers = if write.erases { Vec::new() } else { write.timers };
        let fired = write.fired.map(|fired| {
            let changed_here = write.erases || timers.iter().any(|change| change.name() == fired.name);
            BoundFire {
                consume: (!changed_here).then_some(fired.next),
                name: fired.name,
                due: fired.due,
            }
        });
        Ok(Self {
            timers,
            fired,
            slice: i32::from(write.key.slice().index()),
            fence,
            erases: write.erases,
            key: write.key,
            manifest: write.manifest,
            expected,
            generation,
            revision,
            schema_version,
            payload,
            changes,
        })
    }

    pub(crate) fn entity_type(&self) -> &str {
        self.key.entity_type()
    }
}

/// The columns a load reads, in the order the backends select them:
/// `(persistence_id, revision, generation, state_ser_id, state_schema_version, state_payload)`.
#[derive(Debug, Clone, diesel::Queryable)]
pub struct StateRow {
    pub(crate) persistence_id: String,
    pub(crate) revision: i64,
    pub(crate) generation: i64,
    pub(crate) state_ser_id: i32,
    pub(crate) state_schema_version: i32,
    pub(crate) state_payload: Vec<u8>,
}

impl StateRow {
    /// Checks what the store itself can check of a row, failing with
    /// [`StoreError::Corrupt`] (naming the entity) for anything this version
    /// cannot read.
    pub(crate) fn decode(self, key: &PersistenceId) -> Result<StoredRow, StoreError> {
        let revision = stored_revision(self.revision);
        let corrupt = |source: CorruptRow| StoreError::Corrupt {
            key: key.clone(),
            revision,
            source,
        };
        let revision = revision.ok_or_else(|| corrupt(CorruptRow::Revision))?;
        if self.state_ser_id != JSON_SERIALIZER_ID {
            return Err(corrupt(CorruptRow::SerializerId(self.state_ser_id)));
        }
        let schema_version = schema_version(self.state_schema_version).map_err(corrupt)?;
        Ok(StoredRow {
            revision,
            // Written from a positive `i64`, or 0 before generations.
            generation: u64::try_from(self.generation).unwrap_or(0),
            schema_version,
            payload: self.state_payload,
        })
    }
}

/// A timer row as a backend reads it, its due time in the database's form
/// (`DateTime` on PostgreSQL, `TEXT` on SQLite):
/// `(persistence_id, name, due, schedule, command, missed)`.
#[derive(Debug, Clone, diesel::Queryable)]
pub(crate) struct TimerRow<Due> {
    pub(crate) persistence_id: String,
    pub(crate) name: String,
    pub(crate) due: Due,
    pub(crate) schedule: String,
    pub(crate) command: Vec<u8>,
    pub(crate) missed: i32,
}

impl<Due> TimerRow<Due> {
    /// The stored timer, its due time read by `due`.
    pub(crate) fn decode(
        self,
        due: impl FnOnce(Due) -> Result<DateTime<Utc>, CorruptRow>,
    ) -> Result<StoredTimer, StoreError> {
        let key = parse_id(&self.persistence_id).map_err(|source| StoreError::Corrupt {
            key: PersistenceId::new("?", &self.persistence_id),
            revision: None,
            source,
        })?;
        let due = due(self.due).map_err(|source| StoreError::Corrupt {
            key: key.clone(),
            revision: None,
            source,
        })?;
        Ok(StoredTimer {
            key,
            name: self.name,
            due,
            schedule: self.schedule,
            command: self.command,
            missed: self.missed,
        })
    }
}

/// A change feed row as a backend read it.
pub(crate) struct FeedRow {
    pub(crate) position: i64,
    pub(crate) persistence_id: String,
    pub(crate) revision: i64,
    pub(crate) committed_at: DateTime<Utc>,
    pub(crate) state_schema_version: i32,
    pub(crate) state_payload: Vec<u8>,
}

impl FeedRow {
    pub(crate) fn decode(self) -> Result<ChangeRow, StoreError> {
        // Read after a position of at least 0, so never negative.
        let position = u64::try_from(self.position).unwrap_or(0);
        let key = parse_id(&self.persistence_id).map_err(|source| StoreError::CorruptChange {
            position,
            key: PersistenceId::new("?", &self.persistence_id),
            source,
        })?;
        let corrupt = |source: CorruptRow| StoreError::CorruptChange {
            position,
            key: key.clone(),
            source,
        };
        let revision = stored_revision(self.revision).ok_or_else(|| corrupt(CorruptRow::Revision))?;
        let schema_version = schema_version(self.state_schema_version).map_err(corrupt)?;
        Ok(ChangeRow {
            position,
            key,
            revision,
            schema_version,
            payload: self.state_payload,
            committed_at: self.committed_at,
        })
    }
}

/// A stored row's `(persistence_id, revision)`, which this crate always
/// writes as `<entity type>|<entity id>` and a revision of at least 1.
pub(crate) fn stored_key(id: String, revision: i64) -> Result<(PersistenceId, Revision), StoreError> {
    let corrupt = |key: PersistenceId, source| StoreError::Corrupt {
        key,
        revision: stored_revision(revision),
        source,
    };
    let key = parse_id(&id).map_err(|source| corrupt(PersistenceId::new("?", &id), source))?;
    match stored_revision(revision) {
        Some(revision) => Ok((key, revision)),
        None => Err(corrupt(key, CorruptRow::Revision)),
    }
}

fn parse_id(id: &str) -> Result<PersistenceId, CorruptRow> {
    PersistenceId::parse(id).ok_or_else(|| {
        CorruptRow::Key(InvalidInput::MalformedKey {
            entity_id: id.to_owned(),
            reason: "no `|` after the entity type",
        })
    })
}

/// A stored revision, which is at least 1.
fn stored_revision(stored: i64) -> Option<Revision> {
    u64::try_from(stored).ok().filter(|&r| r > 0).map(Revision)
}

/// A stored `state_schema_version`, which is never negative.
fn schema_version(stored: i32) -> Result<u32, CorruptRow> {
    u32::try_from(stored).map_err(|_| CorruptRow::SchemaVersion(stored))
}

/// A schema version as the `INTEGER` column holds it.
fn integer(version: u32) -> Result<i32, StoreError> {
    i32::try_from(version).map_err(|_| StoreError::OutOfRange(version.into()))
}

/// A revision or position as a `BIGINT` column holds it.
pub(crate) fn bigint(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange(value))
}

/// A count or limit as a `BIGINT` bind: at least 1, saturating.
pub(crate) fn limit(value: usize) -> i64 {
    i64::try_from(value.max(1)).unwrap_or(i64::MAX)
}

/// A count read from the database, which is never negative.
pub(crate) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
