use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::key::validate;
use super::Command;
use crate::error::{IdField, InvalidInput};

/// The id a producer gave an event (a Kafka `topic-partition-offset`, a
/// UUID...), so that a redelivered event is recognised and not applied twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventId(String);

impl EventId {
    /// Validates the id: non-empty, at most [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) bytes, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        validate(IdField::EventId, &id)?;
        Ok(Self(id))
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EventId {
    type Error = InvalidInput;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<EventId> for String {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A [`Command`] with what is known about the event behind it.
///
/// Both extras are optional. With an `event_id`, a redelivered event (same
/// id, same user) is acknowledged with the current state and not applied
/// again. With an `event_time`, a late event never moves the recorded times
/// backwards. In JSON they sit beside the command's fields:
/// `{"type": "user_login", "event_id": "logins-3-1042", "event_time": "2026-11-20T09:00:00Z"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    #[serde(flatten)]
    pub command: Command,
    /// The producer's id of the event, for deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<EventId>,
    /// When the event happened; the clock's now when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<DateTime<Utc>>,
}

impl Event {
    /// Sets [`event_id`](Self::event_id).
    pub fn with_id(mut self, id: EventId) -> Self {
        self.event_id = Some(id);
        self
    }

    /// Sets [`event_time`](Self::event_time).
    pub fn at(mut self, time: DateTime<Utc>) -> Self {
        self.event_time = Some(time);
        self
    }

    /// Decodes an event from JSON, with a typed error for anything malformed.
    pub fn from_json(json: &str) -> Result<Self, InvalidInput> {
        super::command::decode_json(json)
    }
}

impl From<Command> for Event {
    fn from(command: Command) -> Self {
        Self {
            command,
            event_id: None,
            event_time: None,
        }
    }
}
