//! What a caller gave us and we refused: [`InvalidInput`].

use std::fmt;

/// Which id an [`InvalidInput`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdField {
    /// The id of an [`EntityEvent`](crate::EntityEvent).
    EventId,
    /// An id of an entity's key or command, named by its
    /// [`validate_id`](crate::validate_id) call ("mall id", "cart id").
    Named(&'static str),
}

impl fmt::Display for IdField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdField::EventId => "event id",
            IdField::Named(name) => name,
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
    /// An id was not UTF-8: in an HTTP path, once percent-decoded (`%FF`).
    #[error("the {field} is not UTF-8 once percent-decoded")]
    NotUtf8 {
        /// Which id.
        field: IdField,
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
    /// A request body is not the JSON its route expects (an application's
    /// own route, with [`http::json_config`](crate::http::json_config)).
    #[error("the body is not the JSON expected: {reason}")]
    MalformedBody {
        /// What the decoder said.
        reason: String,
    },
    /// A stored entity id does not decode to a key of its entity type.
    #[error("the entity id {entity_id:?} is malformed: {reason}")]
    MalformedKey {
        /// The entity id.
        entity_id: String,
        /// What is wrong with it.
        reason: &'static str,
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
