use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::key::validate;
use super::{IdField, InvalidInput};

/// The largest JSON command or event [`EntityEvent::decode_json`] accepts, in bytes.
const MAX_JSON_BYTES: usize = 16 * 1024;

/// The id a producer gave an event (a Kafka `topic-partition-offset`, a
/// UUID...), so that a redelivered event is recognised and not applied twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

/// A command with what is known about the event behind it, for any entity
/// type; for users it is [`Event`](crate::Event).
///
/// Both extras are optional and handled by the machinery, not the entity.
/// With an `event_id`, a redelivered event (same id, same entity) is
/// acknowledged with the current state and not applied again. With an
/// `event_time`, the entity's transition gets that time instead of now, to
/// decide what a late event may change. In JSON they sit beside the
/// command's fields: `{"type": "user_login", "event_id": "logins-3-1042",
/// "event_time": "2026-11-20T09:00:00Z"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityEvent<C> {
    /// What happened.
    #[serde(flatten)]
    pub command: C,
    /// The producer's id of the event, for deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<EventId>,
    /// When the event happened; the clock's now when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<DateTime<Utc>>,
}

impl<C> EntityEvent<C> {
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
}

impl<C: DeserializeOwned> EntityEvent<C> {
    /// Decodes an event from JSON (the command's fields, tagged as the
    /// command type says, beside `event_id` and `event_time`), with a typed
    /// error for anything malformed or oversized.
    pub fn decode_json(json: &str) -> Result<Self, InvalidInput> {
        decode_json(json)
    }
}

impl<C> From<C> for EntityEvent<C> {
    fn from(command: C) -> Self {
        Self {
            command,
            event_id: None,
            event_time: None,
        }
    }
}

/// Decodes a command or event, refusing oversized input before parsing it.
pub fn decode_json<T: DeserializeOwned>(json: &str) -> Result<T, InvalidInput> {
    if json.len() > MAX_JSON_BYTES {
        return Err(InvalidInput::CommandTooLarge {
            len: json.len(),
            max: MAX_JSON_BYTES,
        });
    }
    serde_json::from_str(json).map_err(|e| InvalidInput::MalformedCommand { reason: e.to_string() })
}
