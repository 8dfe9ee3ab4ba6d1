//! Turning a Kafka record into a command for one entity.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::entity::{decode_json, DurableEntity, EntityEvent, EntityKey, InvalidInput};

/// A record as a [`RecordDecoder`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct IngestRecord<'a> {
    /// The topic it was read from.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The record's key, if any.
    pub key: Option<&'a [u8]>,
    /// The record's value, if any.
    pub payload: Option<&'a [u8]>,
    /// The record's timestamp (producer's create time or broker's append
    /// time, as the topic is configured), if any.
    pub timestamp: Option<DateTime<Utc>>,
}

impl<'a> IngestRecord<'a> {
    /// A record from its parts: for testing a decoder.
    pub fn new(
        topic: &'a str,
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
        timestamp: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            topic,
            partition,
            offset,
            key,
            payload,
            timestamp,
        }
    }

    /// The record a Kafka client received.
    pub fn from_message(message: &'a impl rdkafka::Message) -> Self {
        Self {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            timestamp: message
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
        }
    }
}

/// What a record means: the entity it is for and the command for it. The
/// application supplies one per ingest; [`JsonRecords`] is the default.
///
/// A record the decoder refuses goes to the dead-letter topic with the
/// error, and its partition moves on. A closure
/// `Fn(&IngestRecord) -> Result<(Key, EntityEvent<Command>), InvalidInput>`
/// is a decoder.
pub trait RecordDecoder<E: DurableEntity>: Send + Sync + 'static {
    /// The entity and the command (with its event's id and time, if known).
    fn decode(&self, record: &IngestRecord<'_>) -> Result<(E::Key, EntityEvent<E::Command>), InvalidInput>;
}

impl<E, F> RecordDecoder<E> for F
where
    E: DurableEntity,
    F: Fn(&IngestRecord<'_>) -> Result<(E::Key, EntityEvent<E::Command>), InvalidInput> + Send + Sync + 'static,
{
    fn decode(&self, record: &IngestRecord<'_>) -> Result<(E::Key, EntityEvent<E::Command>), InvalidInput> {
        self(record)
    }
}

/// The default decoder: the record's key is the entity id
/// ([`EntityKey::entity_id`]; for users `<mall id>-<user id>`, a `-` or `%`
/// inside an id written `%2D` or `%25`), its value the command as JSON,
/// exactly as the HTTP API takes it (`{"type": "user_login"}`, with an
/// optional `event_id` and `event_time`). Without an `event_time` in the
/// JSON, the record's timestamp is the event time.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonRecords;

impl<E> RecordDecoder<E> for JsonRecords
where
    E: DurableEntity,
    E::Command: DeserializeOwned,
{
    fn decode(&self, record: &IngestRecord<'_>) -> Result<(E::Key, EntityEvent<E::Command>), InvalidInput> {
        let key = record.key.ok_or(InvalidInput::MalformedKey {
            entity_id: String::new(),
            reason: "the record has no key",
        })?;
        let key = std::str::from_utf8(key).map_err(|_| InvalidInput::MalformedKey {
            entity_id: String::from_utf8_lossy(key).into_owned(),
            reason: "the record's key is not UTF-8",
        })?;
        let key = E::Key::from_entity_id(key)?;
        let payload = record.payload.ok_or_else(|| InvalidInput::MalformedCommand {
            reason: "the record has no value".into(),
        })?;
        let payload = std::str::from_utf8(payload).map_err(|_| InvalidInput::MalformedCommand {
            reason: "the record's value is not UTF-8".into(),
        })?;
        let mut event: EntityEvent<E::Command> = decode_json(payload)?;
        if event.event_time.is_none() {
            event.event_time = record.timestamp;
        }
        Ok((key, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Command, UserKey, UserState};

    fn record<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> IngestRecord<'a> {
        IngestRecord {
            topic: "users",
            partition: 0,
            offset: 7,
            key,
            payload,
            timestamp: DateTime::from_timestamp(1_763_600_000, 0),
        }
    }

    fn decode(record: &IngestRecord<'_>) -> Result<(UserKey, EntityEvent<Command>), InvalidInput> {
        RecordDecoder::<UserState>::decode(&JsonRecords, record)
    }

    #[test]
    fn the_key_names_the_user_and_the_timestamp_is_the_event_time() {
        let (key, event) = decode(&record(Some(b"mall001-user001"), Some(br#"{"type":"user_login"}"#))).unwrap();
        assert_eq!(key, UserKey::new("mall001", "user001").unwrap());
        assert_eq!(event.command, Command::UserLogin);
        assert_eq!(event.event_time, DateTime::from_timestamp(1_763_600_000, 0));
    }

    #[test]
    fn an_event_time_in_the_json_wins_over_the_timestamp() {
        let json = br#"{"type":"user_login","event_time":"2026-11-21T10:00:00Z","event_id":"e1"}"#;
        let (_, event) = decode(&record(Some(b"m-u"), Some(json))).unwrap();
        assert_eq!(event.event_time.unwrap().to_rfc3339(), "2026-11-21T10:00:00+00:00");
        assert_eq!(event.event_id.unwrap().as_str(), "e1");
    }

    #[test]
    fn a_record_without_a_usable_key_or_value_is_refused_with_a_typed_error() {
        let login = Some(&br#"{"type":"user_login"}"#[..]);
        assert!(matches!(
            decode(&record(None, login)),
            Err(InvalidInput::MalformedKey { .. })
        ));
        assert!(matches!(
            decode(&record(Some(b"no separator"), login)),
            Err(InvalidInput::MalformedKey { .. })
        ));
        assert!(matches!(
            decode(&record(Some(&[0xff, b'-', b'u']), login)),
            Err(InvalidInput::MalformedKey { .. })
        ));
        assert!(matches!(
            decode(&record(Some(b"m-u"), None)),
            Err(InvalidInput::MalformedCommand { .. })
        ));
        assert!(matches!(
            decode(&record(Some(b"m-u"), Some(b"{not json"))),
            Err(InvalidInput::MalformedCommand { .. })
        ));
    }
}
