//! One error type per boundary: what a caller gave us ([`InvalidInput`]),
//! what the database did ([`StoreError`]), and what a command's sender gets
//! back ([`CommandError`]).

use std::fmt;
use std::time::Duration;

use crate::domain::UserKey;
use crate::store::Revision;

/// Which id an [`InvalidInput`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    /// The mall id of a [`UserKey`].
    MallId,
    /// The user id of a [`UserKey`].
    UserId,
    /// The product id of a [`ViewProduct`](crate::Command::ViewProduct).
    ProductId,
    /// The id of an [`Event`](crate::Event).
    EventId,
}

impl fmt::Display for IdField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdField::MallId => "mall id",
            IdField::UserId => "user id",
            IdField::ProductId => "product id",
            IdField::EventId => "event id",
        })
    }
}

/// Input rejected before it reaches an actor; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// An id was empty.
    #[error("the {field} is empty")]
    EmptyId {
        /// Which id.
        field: IdField,
    },
    /// An id was longer than [`MAX_ID_BYTES`](crate::MAX_ID_BYTES).
    #[error("the {field} is {len} bytes long; at most {max} are allowed")]
    IdTooLong {
        /// Which id.
        field: IdField,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An id contained a control character (a newline, NUL, DEL...).
    #[error("the {field} contains a control character at character {position}")]
    ControlCharacter {
        /// Which id.
        field: IdField,
        /// The character index of the first control character.
        position: usize,
    },
    /// A JSON command could not be decoded: bad JSON, an unknown `type`, a missing or invalid field.
    #[error("malformed command: {reason}")]
    MalformedCommand {
        /// What the decoder said.
        reason: String,
    },
    /// A JSON command was larger than any valid command can be.
    #[error("the command is {len} bytes long; at most {max} are accepted")]
    CommandTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A failure of the state store. Cloneable: one failed batch fails each of
/// the writes in it with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stored revision was not the one the write expected: someone else
    /// wrote this user since it was loaded. Nothing was overwritten.
    #[error("write conflict for user {key}: expected stored revision {expected}, found another")]
    Conflict {
        /// The user.
        key: UserKey,
        /// The revision the write was based on.
        expected: Revision,
    },
    /// The stored row cannot be decoded; only this user is affected.
    #[error("the stored state of user {key} (revision {revision}) is corrupt: {reason}")]
    Corrupt {
        /// The user.
        key: UserKey,
        /// The revision found in the row.
        revision: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be had: the database is down, refusing, or the pool timed out.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Query(String),
    /// The operation took longer than the configured limit; its outcome is unknown.
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    /// The schema migrations could not be applied.
    #[error("applying the schema migrations failed: {0}")]
    Migration(String),
    /// The store was misconfigured or its worker runtime is gone.
    #[error("the store cannot run: {0}")]
    Setup(String),
}

impl From<diesel::result::Error> for StoreError {
    fn from(error: diesel::result::Error) -> Self {
        StoreError::Query(error.to_string())
    }
}

/// Why a command was not applied. The user's stored state is unchanged by it,
/// and the actor that answered it keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Another writer changed this user first (another node, or a stale actor).
    /// The actor reloads the stored state; sending the command again applies it
    /// on top of that.
    #[error("user {key} was changed concurrently (this write expected revision {expected}); retry the command")]
    Conflict {
        /// The user.
        key: UserKey,
        /// The revision the failed write was based on.
        expected: Revision,
    },
    /// The user's stored state cannot be decoded; an operator must repair or
    /// delete the row. Other users are not affected.
    #[error("the stored state of user {key} is corrupt: {source}")]
    CorruptState {
        /// The user.
        key: UserKey,
        /// The decoding failure.
        #[source]
        source: StoreError,
    },
    /// The database could not be read or written; retry later. If a write's
    /// outcome is unknown, the actor reloads before its next command.
    #[error("the state of user {key} could not be read or written; retry later: {source}")]
    StoreUnavailable {
        /// The user.
        key: UserKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Too much is already queued (for this user, or in total); the command
    /// was refused, not applied. Retry later, more slowly.
    #[error("the command for user {key} was refused: {reason}")]
    Overloaded {
        /// The user.
        key: UserKey,
        /// Which limit was reached.
        reason: String,
    },
    /// The command never reached the user's actor (it was stopped by its
    /// system); it was not applied.
    #[error("the command for user {key} was not delivered: {reason}")]
    NotDelivered {
        /// The user.
        key: UserKey,
        /// Why.
        reason: String,
    },
}

impl CommandError {
    /// Classifies a store failure for the sender of a command.
    pub(crate) fn from_store(key: &UserKey, error: StoreError) -> Self {
        match error {
            StoreError::Conflict { expected, .. } => CommandError::Conflict {
                key: key.clone(),
                expected,
            },
            corrupt @ StoreError::Corrupt { .. } => CommandError::CorruptState {
                key: key.clone(),
                source: corrupt,
            },
            other => CommandError::StoreUnavailable {
                key: key.clone(),
                source: other,
            },
        }
    }

    /// The user the failed command was for.
    pub fn key(&self) -> &UserKey {
        match self {
            CommandError::Conflict { key, .. }
            | CommandError::CorruptState { key, .. }
            | CommandError::StoreUnavailable { key, .. }
            | CommandError::Overloaded { key, .. }
            | CommandError::NotDelivered { key, .. } => key,
        }
    }

    /// A short, stable name of the failure, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Conflict { .. } => "conflict",
            CommandError::CorruptState { .. } => "corrupt_state",
            CommandError::StoreUnavailable { .. } => "store_unavailable",
            CommandError::Overloaded { .. } => "overloaded",
            CommandError::NotDelivered { .. } => "not_delivered",
        }
    }

    /// Whether sending the same command again may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CommandError::CorruptState { .. })
    }
}
