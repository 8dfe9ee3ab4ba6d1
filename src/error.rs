//! The errors of the two boundaries below the caller: what the database did
//! ([`StoreError`]) and what a command's sender gets back ([`CommandError`]).
//! What a caller gave us and we refused is [`InvalidInput`](crate::InvalidInput).

use std::sync::Arc;
use std::time::Duration;

use crate::entity::{DurableEntity, InvalidInput, PersistenceId, Revision};

/// The cause of a failure, shared: one failed batch fails each of its writes
/// with the same error.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// A failure of the state store. Cloneable: one failed batch fails each of
/// the writes in it with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stored revision was not the one the write expected: someone else
    /// wrote this entity since it was loaded. Nothing was overwritten.
    #[error("write conflict for {key}: expected stored revision {expected}, found another")]
    Conflict {
        /// The entity (compares equal to its typed key).
        key: PersistenceId,
        /// The revision the write was based on.
        expected: Revision,
    },
    /// In cluster mode: the write's fence did not hold (this node no longer
    /// owns the entity's slice at the epoch the write carried, or its lease
    /// has expired). Nothing was written; the entity's new owner takes it.
    #[error("the write of {key} was fenced off: this node no longer owns slice {slice} at epoch {epoch}")]
    Fenced {
        /// The entity.
        key: PersistenceId,
        /// Its slice.
        slice: crate::entity::Slice,
        /// The epoch the write carried.
        epoch: u64,
    },
    /// The write committed a timer's fire, and the timer is no longer at
    /// the due time it fired for: it fired already (on another node, or
    /// twice here), or was moved or cancelled meanwhile. Nothing was written.
    #[error("timer {name} of {key} is no longer due as it fired")]
    TimerGone {
        /// The entity.
        key: PersistenceId,
        /// The timer.
        name: String,
    },
    /// In cluster mode: the named lease the save was made under (a change
    /// feed consumer's) has moved to another node; nothing was saved. That
    /// node goes on from the last position saved.
    #[error("the named lease {lease} has moved to another node; nothing was saved")]
    LeaseLost {
        /// The lease's name.
        lease: String,
    },
    /// In cluster mode: the entity's owner, another node, answered its
    /// forwarded command with this failure of its own store (its kind and
    /// message, as the owner gave them).
    #[error("node {node} answered: {message}")]
    Remote {
        /// The node's address.
        node: String,
        /// The failure's [`CommandError::kind`] there.
        kind: String,
        /// What the node said.
        message: String,
    },
    /// The stored row cannot be decoded; only this entity is affected.
    #[error("the stored state of {key} is corrupt")]
    Corrupt {
        /// The entity.
        key: PersistenceId,
        /// The revision found in the row, when it is one (at least 1) and was read.
        revision: Option<Revision>,
        /// What is wrong with it.
        #[source]
        source: CorruptRow,
    },
    /// No connection could be had: the database is down, refusing, or the pool timed out.
    #[error("the database is unavailable")]
    Unavailable(#[source] Cause),
    /// The database answered with an error.
    #[error("database error")]
    Query(#[source] Arc<diesel::result::Error>),
    /// The database refused a statement with an error of its own, whose
    /// SQLSTATE says what it was: nothing of the statement was committed.
    #[error("the database refused the statement (SQLSTATE {sqlstate})")]
    Refused {
        /// The five-character SQLSTATE: `P0001` for a trigger's `RAISE
        /// EXCEPTION`, `23514` for a check violation, `40P01` for a deadlock.
        sqlstate: String,
        /// The driver's error.
        #[source]
        source: Cause,
    },
    /// The database refused this row's write for what it holds (a
    /// constraint, a trigger, a value out of range), found by writing it
    /// apart from the rest of its batch, which committed: writing it again
    /// fails again.
    #[error("the database refused the row of {key}")]
    RowRefused {
        /// The entity.
        key: PersistenceId,
        /// What the database said.
        #[source]
        source: Arc<StoreError>,
    },
    /// The database refused a batch of writes because of what one of its
    /// rows holds, and splitting the batch did not get down to this row
    /// within its bounds: it was not committed, and may well not be the
    /// culprit. Retry.
    #[error("the write of {key} was refused with its batch, for another row's sake as far as is known")]
    Unisolated {
        /// The entity.
        key: PersistenceId,
        /// What the database said of the batch.
        #[source]
        source: Arc<StoreError>,
    },
    /// A load took longer than the configured limit. (A write that the
    /// database may have committed is [`OutcomeUnknown`](Self::OutcomeUnknown).)
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    /// A write was sent and no answer came back (the connection broke, or the
    /// database did not answer within twice the operation timeout): it may or
    /// may not be committed. Retry with the same event id.
    #[error("the write was sent but its outcome is unknown")]
    OutcomeUnknown(#[source] Cause),
    /// The schema migrations could not be applied.
    #[error("applying the schema migrations failed")]
    Migration(#[source] Cause),
    /// A setting of [`StoreConfig`](crate::StoreConfig) or the database
    /// location cannot work; fix the configuration.
    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),
    /// A state could not be encoded; nothing was written.
    #[error("the state of {key} cannot be encoded")]
    Encode {
        /// The entity.
        key: PersistenceId,
        /// The encoder's error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// A write that does not raise the revision, or names no state: a bug in
    /// the caller; nothing was written.
    #[error("invalid write for {key}: from revision {expected} to {revision} with {states} states")]
    InvalidWrite {
        /// The entity.
        key: PersistenceId,
        /// The revision the write was based on.
        expected: Revision,
        /// The revision it would have written.
        revision: Revision,
        /// The states it carried.
        states: usize,
    },
    /// The store's runtime or batching task has stopped (the store is being
    /// dropped); open the store again.
    #[error("the store has stopped")]
    Stopped,
    /// A database task panicked or was cancelled; its outcome is unknown.
    #[error("a database task failed")]
    TaskFailed(#[source] Arc<tokio::task::JoinError>),
    /// The change feed was asked for on a store opened without it.
    #[error("this store keeps no change feed; open it with StoreConfig::with_change_feed(true)")]
    NoChangeFeed,
    /// The change at feed `position` cannot be decoded. The feed stopped at
    /// it: every change before it was delivered, none after it is, and the
    /// feed's position is still the last change delivered. Repair the row,
    /// or skip this one change deliberately with
    /// [`EntityFeed::skip_corrupt`](crate::EntityFeed::skip_corrupt).
    #[error(
        "the change at feed position {position} ({key}) cannot be decoded; \
         repair it, or skip it deliberately with EntityFeed::skip_corrupt({position})"
    )]
    CorruptChange {
        /// Where the change stands in the feed.
        position: u64,
        /// The entity it is a change of.
        key: PersistenceId,
        /// What is wrong with it.
        #[source]
        source: CorruptRow,
    },
    /// A feed position or revision beyond what the database column holds
    /// (`BIGINT`), or a schema version beyond `INTEGER`'s.
    #[error("{0} exceeds the range of its database column")]
    OutOfRange(u64),
    /// The key does not encode to an entity id that reads back as it; nothing
    /// reached the database.
    #[error("the key {key} does not read back from its entity id")]
    InvalidKey {
        /// The persistence id the key encodes to.
        key: PersistenceId,
        /// What decoding its entity id said.
        #[source]
        source: InvalidInput,
    },
    /// Code run for the store panicked: an entity's serde or `upgrade`
    /// while a state was encoded or decoded, or a store's own code.
    #[error("a panic while {during}: {message}")]
    Panicked {
        /// What was being done.
        during: &'static str,
        /// What the panic said.
        message: String,
    },
}

impl From<diesel::result::Error> for StoreError {
    fn from(error: diesel::result::Error) -> Self {
        StoreError::Query(Arc::new(error))
    }
}

impl StoreError {
    /// Whether the database may have refused the statement for what one of
    /// its rows holds (a refusal that writing the row again would repeat),
    /// as opposed to failing itself (down, busy, timed out, deadlocked, out
    /// of resources): only then is a batch worth writing in parts.
    ///
    /// Decided by the SQLSTATE where the driver keeps it (the PostgreSQL
    /// writer), else by what diesel classifies: a constraint violation is a
    /// row's, a serialization failure or a lost connection the database's.
    /// SQLite's other errors come with its own fixed English messages, which
    /// tell a busy or broken database apart from a trigger's `RAISE(ABORT)`.
    pub(crate) fn may_be_a_row_refusal(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            StoreError::Refused { sqlstate, .. } => !is_transient_sqlstate(sqlstate),
            StoreError::Query(error) => match error.as_ref() {
                Error::DatabaseError(
                    DatabaseErrorKind::UniqueViolation
                    | DatabaseErrorKind::ForeignKeyViolation
                    | DatabaseErrorKind::NotNullViolation
                    | DatabaseErrorKind::CheckViolation
                    | DatabaseErrorKind::RestrictViolation
                    | DatabaseErrorKind::ExclusionViolation,
                    _,
                ) => true,
                Error::DatabaseError(DatabaseErrorKind::Unknown, info) => !is_transient_sqlite_message(info.message()),
                _ => false,
            },
            _ => false,
        }
    }

    pub(crate) fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Unavailable(Arc::new(error))
    }
}

/// SQLSTATE classes and codes of failures of the database or the session,
/// not of what a statement writes: a connection exception (08), a
/// transaction rollback (40: serialization failure, deadlock), insufficient
/// resources (53), operator intervention (57: statement timeout, shutdown),
/// system errors (58), snapshot too old (72), configuration (F0), internal
/// errors (XX), an invalid transaction state (25: a read-only standby after
/// a fail-over), and a lock not available or an object in use (55P03,
/// 55006: the lock timeout).
fn is_transient_sqlstate(sqlstate: &str) -> bool {
    const CLASSES: [&str; 9] = ["08", "40", "53", "57", "58", "72", "F0", "XX", "25"];
    CLASSES.iter().any(|class| sqlstate.starts_with(class)) || matches!(sqlstate, "55P03" | "55006" | "55000")
}

/// SQLite's own messages for a database that is busy, locked, full, broken
/// or interrupted (SQLite does not translate them).
fn is_transient_sqlite_message(message: &str) -> bool {
    const TRANSIENT: [&str; 8] = [
        "database is locked",
        "database table is locked",
        "disk I/O error",
        "database or disk is full",
        "out of memory",
        "interrupted",
        "unable to open database file",
        "database schema has changed",
    ];
    TRANSIENT.iter().any(|transient| message.starts_with(transient))
}

/// The entities' manager is no longer running: its actor system stopped, or
/// [`Entities::stop`](crate::Entities::stop) was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the entities' manager is not running")]
pub struct ManagerStopped;

/// What is wrong with a stored row, in a [`StoreError::Corrupt`] or a
/// change-feed row, in a [`StoreError::CorruptChange`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptRow {
    /// Revisions start at 1.
    #[error("the revision is not positive")]
    Revision,
    /// The serializer id is not one this version writes.
    #[error("unknown serializer id {0}")]
    SerializerId(i32),
    /// The payload is not the entity's state.
    #[error("the payload does not decode")]
    Payload(#[source] Arc<serde_json::Error>),
    /// The feed row's persistence id does not decode to a key.
    #[error("the persistence id does not decode to a key")]
    Key(#[source] InvalidInput),
    /// The feed row's timestamp does not parse.
    #[error("the commit timestamp does not parse")]
    Timestamp(#[source] chrono::ParseError),
    /// The row was written at a schema version this code does not know (a
    /// newer release wrote it); it is refused, never read in part.
    #[error("the state is at schema version {stored}, newer than this code's {known}")]
    NewerSchema {
        /// The row's `state_schema_version`.
        stored: u32,
        /// The entity's [`SCHEMA_VERSION`](crate::DurableEntity::SCHEMA_VERSION).
        known: u32,
    },
    /// The entity's [`upgrade`](crate::DurableEntity::upgrade) refused the
    /// step from schema version `from` to the next.
    #[error("upgrading the state from schema version {from} failed: {reason}")]
    Upgrade {
        /// The version the failed step started from.
        from: u32,
        /// The upgrade function's error.
        reason: String,
    },
    /// The row's schema version is negative.
    #[error("the schema version {0} is negative")]
    SchemaVersion(i32),
    /// A stored timer's schedule is not a form this version reads.
    #[error("the timer's schedule {0:?} does not read")]
    Schedule(String),
}

/// Why a command was not applied. The entity's stored state is unchanged by
/// it, and the actor that answered it keeps serving. For users it is
/// [`UserCommandError`](crate::UserCommandError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: DurableEntity> {
    /// Another writer changed this entity first (another node, or a stale
    /// actor). The actor reloads the stored state; sending the command again
    /// applies it on top of that.
    #[error("{key} was changed concurrently (this write expected revision {expected}); retry the command")]
    Conflict {
        /// The entity.
        key: E::Key,
        /// The revision the failed write was based on.
        expected: Revision,
    },
    /// The entity's stored state cannot be decoded; an operator must repair
    /// or delete the row. Other entities are not affected.
    #[error("the stored state of {key} is corrupt: {source}")]
    CorruptState {
        /// The entity.
        key: E::Key,
        /// The decoding failure.
        #[source]
        source: StoreError,
    },
    /// The database could not be read or written, and nothing was committed;
    /// retry later.
    #[error("the state of {key} could not be read or written; retry later: {source}")]
    StoreUnavailable {
        /// The entity.
        key: E::Key,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The write was sent to the database and no answer came back: it may or
    /// may not be committed. Send the command again with the same event id
    /// (redelivery is recognised, so it is not applied twice); the actor
    /// reloads the stored state before its next command.
    #[error("the outcome of the command for {key} is unknown; retry it with the same event id: {source}")]
    OutcomeUnknown {
        /// The entity.
        key: E::Key,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Too much is already queued (for this entity, or in total); the command
    /// was refused, not applied. Retry later, more slowly.
    #[error("the command for {key} was refused: {reason}")]
    Overloaded {
        /// The entity.
        key: E::Key,
        /// Which limit was reached.
        reason: String,
    },
    /// The command never reached the entity's actor (it was stopped by its
    /// system); it was not applied.
    #[error("the command for {key} was not delivered: {reason}")]
    NotDelivered {
        /// The entity.
        key: E::Key,
        /// Why.
        reason: String,
    },
    /// The entity's domain refused the command (an empty cart's checkout);
    /// nothing was written. Sending it again is refused again.
    #[error("the command for {key} was refused by the domain: {reason}")]
    Rejected {
        /// The entity.
        key: E::Key,
        /// The domain's typed reason.
        #[source]
        reason: E::Rejection,
    },
    /// The entity's stored state was written by a newer release of the
    /// application, at a schema version this code does not know: a rolling
    /// deploy or a rollback is under way. Nothing was changed; retry once
    /// this node runs the newer release.
    #[error("the stored state of {key} is at schema version {stored}, newer than this release's {known}; retry later")]
    NewerSchema {
        /// The entity.
        key: E::Key,
        /// The row's `state_schema_version`.
        stored: u32,
        /// This release's [`SCHEMA_VERSION`](crate::DurableEntity::SCHEMA_VERSION).
        known: u32,
    },
    /// The state after the command cannot be stored: it does not encode
    /// (its serde refused it), or a revision or schema version exceeds its
    /// database column, or the write was malformed. Nothing of this command
    /// was committed (commands before it were); sending it again fails again.
    #[error("the state of {key} after the command cannot be stored: {source}")]
    Unstorable {
        /// The entity.
        key: E::Key,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The entity's own code panicked on this command (its `apply`, its
    /// serde, its `upgrade`), or the store did. Nothing of the command was
    /// committed; the entity restarts from its stored state for the next
    /// one, and other entities never notice. Sending it again is likely to
    /// panic again.
    #[error("the command for {key} panicked: {message}")]
    Panicked {
        /// The entity.
        key: E::Key,
        /// What the panic said.
        message: String,
    },
    /// In cluster mode: another node owns this entity (its slice), or the
    /// slice moved while the command was on its way; nothing was applied
    /// here. Send it to `owner` (the handle does, unless started
    /// [`without_forwarding`](crate::Config::without_forwarding)).
    #[error("{key} is owned by another node ({})", .owner.as_deref().unwrap_or("not known yet"))]
    NotOwner {
        /// The entity.
        key: E::Key,
        /// The owner's address, when known.
        owner: Option<String>,
    },
    /// The state after the command wants a timer that cannot be stored (a
    /// due time out of range, a cron expression that does not parse, a
    /// command that does not encode): nothing of the command was stored.
    /// An ingested record failing so is settled all the same, noted as refused.
    #[error("the state after the command for {key} wants a timer that cannot be stored: {source}")]
    InvalidTimer {
        /// The entity.
        key: E::Key,
        /// What is wrong with the timer.
        #[source]
        source: crate::timers::TimerError,
    },
    /// An ingested record this entity refused when it was first read, read
    /// again: it was not applied then and is not now. It belongs in the
    /// dead-letter topic (the ingest sends it there; after a crash that is
    /// the second copy at most).
    #[error("the record for {key} was refused when it was first read: {reason}")]
    RefusedBefore {
        /// The entity.
        key: E::Key,
        /// Why it was refused then.
        reason: String,
    },
    /// The key does not encode to an entity id that reads back as it (an
    /// empty id, one too long or with a control character): refused before
    /// anything reached the store.
    #[error("the key {key} is not a valid entity id: {source}")]
    InvalidKey {
        /// The key.
        key: E::Key,
        /// What is wrong with its id.
        #[source]
        source: InvalidInput,
    },
}

impl<E: DurableEntity> CommandError<E> {
    /// Classifies a store failure for the sender of a command.
    pub(crate) fn from_store(key: &E::Key, error: StoreError) -> Self {
        match error {
            StoreError::Conflict { expected, .. } => CommandError::Conflict {
                key: key.clone(),
                expected,
            },
            StoreError::Corrupt {
                source: CorruptRow::NewerSchema { stored, known },
                ..
            } => CommandError::NewerSchema {
                key: key.clone(),
                stored,
                known,
            },
            corrupt @ StoreError::Corrupt { .. } => CommandError::CorruptState {
                key: key.clone(),
                source: corrupt,
            },
            // Sent (or running) when it failed: it may have committed.
            unknown @ (StoreError::OutcomeUnknown(_) | StoreError::TaskFailed(_)) => CommandError::OutcomeUnknown {
                key: key.clone(),
                source: unknown,
            },
            // No retry can cure these.
            unstorable @ (StoreError::Encode { .. } | StoreError::InvalidWrite { .. } | StoreError::OutOfRange(_)) => {
                CommandError::Unstorable {
                    key: key.clone(),
                    source: unstorable,
                }
            }
            StoreError::TimerGone { name, .. } => CommandError::NotDelivered {
                key: key.clone(),
                reason: format!("the timer {name} fired already, or was moved or cancelled"),
            },
            StoreError::Fenced { .. } => CommandError::NotOwner {
                key: key.clone(),
                owner: None,
            },
            StoreError::InvalidKey { source, .. } => CommandError::InvalidKey {
                key: key.clone(),
                source,
            },
            refused @ StoreError::RowRefused { .. } => CommandError::Unstorable {
                key: key.clone(),
                source: refused,
            },
            StoreError::Panicked { during, message } => CommandError::Panicked {
                key: key.clone(),
                message: format!("{message} (while {during})"),
            },
            other => CommandError::StoreUnavailable {
                key: key.clone(),
                source: other,
            },
        }
    }

    /// The entity the failed command was for.
    pub fn key(&self) -> &E::Key {
        match self {
            CommandError::Conflict { key, .. }
            | CommandError::CorruptState { key, .. }
            | CommandError::StoreUnavailable { key, .. }
            | CommandError::OutcomeUnknown { key, .. }
            | CommandError::Overloaded { key, .. }
            | CommandError::NotDelivered { key, .. }
            | CommandError::Rejected { key, .. }
            | CommandError::NewerSchema { key, .. }
            | CommandError::Unstorable { key, .. }
            | CommandError::Panicked { key, .. }
            | CommandError::RefusedBefore { key, .. }
            | CommandError::NotOwner { key, .. }
            | CommandError::InvalidTimer { key, .. }
            | CommandError::InvalidKey { key, .. } => key,
        }
    }

    /// A short, stable name of the failure, for metrics, logs and the HTTP
    /// body's `kind`: `conflict`, `corrupt_state`, `store_unavailable`,
    /// `outcome_unknown`, `overloaded`, `not_delivered`, `rejected`,
    /// `newer_schema`, `unstorable`, `panicked`, `refused_before`, `not_owner`, `invalid_key`.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Conflict { .. } => "conflict",
            CommandError::CorruptState { .. } => "corrupt_state",
            CommandError::StoreUnavailable { .. } => "store_unavailable",
            CommandError::OutcomeUnknown { .. } => "outcome_unknown",
            CommandError::Overloaded { .. } => "overloaded",
            CommandError::NotDelivered { .. } => "not_delivered",
            CommandError::Rejected { .. } => "rejected",
            CommandError::NewerSchema { .. } => "newer_schema",
            CommandError::Unstorable { .. } => "unstorable",
            CommandError::Panicked { .. } => "panicked",
            CommandError::RefusedBefore { .. } => "refused_before",
            CommandError::NotOwner { .. } => "not_owner",
            CommandError::InvalidKey { .. } => "invalid_key",
            CommandError::InvalidTimer { .. } => "invalid_timer",
        }
    }

    /// Whether sending the same command again may succeed: true for a
    /// conflict, an unavailable or overloaded store, an undelivered command,
    /// a newer schema, another owner and an unknown outcome (with the same
    /// event id); false
    /// for a corrupt row, a domain refusal, an unstorable state, a panic, a
    /// record refused before, an invalid key and an invalid timer, which fail
    /// the same way again.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            CommandError::CorruptState { .. }
                | CommandError::Rejected { .. }
                | CommandError::Unstorable { .. }
                | CommandError::Panicked { .. }
                | CommandError::RefusedBefore { .. }
                | CommandError::InvalidKey { .. }
                | CommandError::InvalidTimer { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{UserKey, UserState};

    /// A database task that panicked or was cancelled may have committed.
    #[tokio::test]
    async fn a_failed_database_task_is_an_unknown_outcome_not_an_unavailable_store() {
        let failed = tokio::spawn(async { panic!("the task died") }).await.unwrap_err();
        let key = UserKey::new("m", "u").unwrap();

        let error = CommandError::<UserState>::from_store(&key, StoreError::TaskFailed(Arc::new(failed)));

        assert!(matches!(error, CommandError::OutcomeUnknown { .. }), "{error:?}");
        assert!(error.is_retryable());
    }

    #[test]
    fn failures_no_retry_can_cure_are_not_retryable() {
        let key = UserKey::new("m", "u").unwrap();
        let id = PersistenceId::new("UserState", "m-u");
        for unstorable in [
            StoreError::OutOfRange(u64::MAX),
            StoreError::InvalidWrite {
                key: id.clone(),
                expected: Revision(2),
                revision: Revision(1),
                states: 1,
            },
        ] {
            let error = CommandError::<UserState>::from_store(&key, unstorable);
            assert!(matches!(error, CommandError::Unstorable { .. }), "{error:?}");
            assert!(!error.is_retryable());
        }
    }
}
