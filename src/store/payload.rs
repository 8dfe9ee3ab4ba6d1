//! The stored form of a state: the entity's JSON object with the
//! machinery's fields beside its own: the remembered event ids under
//! `recent_event_ids` (the field user states have always been stored with),
//! and after a delete `erased_at`; a tombstone (the revision that deleted the
//! entity) holds the machinery's fields alone, `deleted: true`, and no state.
//! Ingested entities also carry `source_offsets`: per source partition, the
//! offset of the last record settled, and `refused_records`: the records
//! refused at or below it, with why.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::entity::{AppliedOffsets, Durable, DurableEntity, EventId, PersistenceId, StoredOffsets};
use crate::error::{CorruptRow, StoreError};

/// The change feed's record of a purged entity: a tombstone, the payload of a
/// deletion with no state and no remembered event ids. The feed reads it as
/// [`ChangeKind::Deleted`](crate::ChangeKind::Deleted) with the default state.
pub(crate) const TOMBSTONE: &[u8] = br#"{"deleted":true}"#;

/// What a change feed row of an entity holds once the entity is deleted or
/// purged: its data erased, its place in the feed kept. The feed reads it as
/// [`ChangeKind::Redacted`](crate::ChangeKind::Redacted). Empty, which no
/// encoded state is (a state encodes to a JSON object at least `{}`).
pub(crate) const REDACTED: &[u8] = b"";

#[derive(Serialize)]
struct Envelope<'a, E, O, R> {
    /// Absent from a tombstone: the erased entity's data is gone.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    state: Option<&'a E>,
    #[serde(skip_serializing_if = "<[EventId]>::is_empty")]
    recent_event_ids: &'a [EventId],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    erased_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_offsets: Option<O>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_records: Option<R>,
}

/// An envelope's offsets fields when there are none.
type NoOffsets = Option<()>;

/// The machinery's fields of a stored payload.
#[derive(Deserialize)]
struct Machinery {
    #[serde(default)]
    recent_event_ids: Vec<EventId>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    erased_at: Option<DateTime<Utc>>,
    #[serde(default)]
    source_offsets: StoredOffsets,
    /// Offsets as the JSON object's keys: text (a flattened struct reads no
    /// numbers from keys).
    #[serde(default)]
    refused_records: BTreeMap<String, BTreeMap<String, String>>,
}

impl Machinery {
    /// The entity as stored: `state` with the machinery's fields beside it.
    fn with_state<E>(self, state: E) -> Durable<E> {
        Durable {
            state,
            event_ids: self.recent_event_ids,
            erased_at: self.erased_at,
            tombstone: self.deleted,
            source_offsets: AppliedOffsets::from_fields(self.source_offsets, self.refused_records),
        }
    }
}

#[derive(Deserialize)]
struct Decoded<E> {
    #[serde(flatten)]
    state: E,
    #[serde(flatten)]
    machinery: Machinery,
}

pub(crate) fn encode<E: DurableEntity>(key: &PersistenceId, durable: &Durable<E>) -> Result<Vec<u8>, StoreError> {
    to_json(
        key,
        &Envelope {
            state: (!durable.tombstone).then_some(&durable.state),
            recent_event_ids: &durable.event_ids,
            deleted: durable.tombstone,
            erased_at: durable.erased_at,
            source_offsets: (!durable.source_offsets.is_empty()).then(|| durable.source_offsets.offsets_field()),
            refused_records: durable.source_offsets.refused_field(),
        },
    )
}

/// A state with no machinery fields: what `StateStoreExt::write` stores.
pub(crate) fn encode_state<E: DurableEntity>(key: &PersistenceId, state: &E) -> Result<Vec<u8>, StoreError> {
    to_json(
        key,
        &Envelope::<E, NoOffsets, NoOffsets> {
            state: Some(state),
            recent_event_ids: &[],
            deleted: false,
            erased_at: None,
            source_offsets: None,
            refused_records: None,
        },
    )
}

fn to_json(key: &PersistenceId, envelope: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(envelope).map_err(|e| StoreError::Encode {
        key: key.clone(),
        source: Arc::new(e),
    })
}

/// A payload stored at `schema_version`: at the entity's own version it is
/// read as it is; an older one is upgraded first ([`upgrade`]), a newer one
/// refused.
pub(crate) fn decode<E: DurableEntity>(payload: &[u8], schema_version: u32) -> Result<Durable<E>, CorruptRow> {
    if schema_version != E::SCHEMA_VERSION {
        return upgrade(payload, schema_version);
    }
    match serde_json::from_slice::<Decoded<E>>(payload) {
        Ok(Decoded { state, machinery }) => Ok(machinery.with_state(state)),
        // A tombstone holds no state, which an entity without serde defaults
        // cannot read from nothing.
        Err(error) => match serde_json::from_slice::<Machinery>(payload) {
            Ok(machinery) if machinery.deleted => Ok(machinery.with_state(E::default())),
            _ => Err(CorruptRow::Payload(Arc::new(error))),
        },
    }
}

/// A payload split into the machinery's fields and the state's.
#[derive(Deserialize)]
struct Split {
    // First: a flattened struct takes its fields out of the payload, and the
    // flattened map after it gets only what is left, the state.
    #[serde(flatten)]
    machinery: Machinery,
    #[serde(flatten)]
    state: serde_json::Map<String, serde_json::Value>,
}

/// Decodes a payload written at an older schema version: the state's fields
/// alone go through [`DurableEntity::upgrade`], one step per version up to
/// the entity's, and the machinery's are kept as they are. A newer version
/// is refused whole.
fn upgrade<E: DurableEntity>(payload: &[u8], stored: u32) -> Result<Durable<E>, CorruptRow> {
    if stored > E::SCHEMA_VERSION {
        return Err(CorruptRow::NewerSchema {
            stored,
            known: E::SCHEMA_VERSION,
        });
    }
    let Split { machinery, state } = serde_json::from_slice(payload).map_err(|e| CorruptRow::Payload(Arc::new(e)))?;
    if machinery.deleted {
        // A tombstone holds no state to upgrade.
        return Ok(machinery.with_state(E::default()));
    }
    let mut state = serde_json::Value::Object(state);
    for from in stored..E::SCHEMA_VERSION {
        state = E::upgrade(from, state).map_err(|reason| CorruptRow::Upgrade { from, reason })?;
    }
    let state = serde_json::from_value(state).map_err(|e| CorruptRow::Payload(Arc::new(e)))?;
    Ok(machinery.with_state(state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{UserKey, UserState};
    use crate::entity::EntityKey;

    #[test]
    fn event_ids_are_stored_beside_the_state_and_read_back() {
        let key = UserKey::new("m", "u").unwrap().persistence_id();
        let state = UserState {
            marketing_opt_in: true,
            ..UserState::default()
        };
        let ids = vec![EventId::new("e1").unwrap()];
        let bytes = encode(&key, &Durable::new(state.clone(), ids.clone())).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["recent_event_ids"][0], "e1");
        assert_eq!(json["marketing_opt_in"], true);
        assert_eq!(decode::<UserState>(&bytes, 1).unwrap(), Durable::new(state, ids));
    }

    #[test]
    fn a_row_written_before_the_generic_core_loads_with_its_event_ids() {
        let old = br#"{"last_login":null,"last_cart_use":null,"recent_products":["p1"],"marketing_opt_in":false,"last_event_time":null,"recent_event_ids":["e1","e2"]}"#;
        let decoded = decode::<UserState>(old, 1).unwrap();
        assert_eq!(decoded.state.recent_products[0].as_str(), "p1");
        assert_eq!(
            decoded.event_ids,
            [EventId::new("e1").unwrap(), EventId::new("e2").unwrap()]
        );
    }

    #[test]
    fn a_tombstone_keeps_the_machinerys_fields_and_none_of_the_state() {
        let key = UserKey::new("m", "u").unwrap().persistence_id();
        let mut durable = Durable::new(
            UserState {
                marketing_opt_in: true,
                ..UserState::default()
            },
            vec![EventId::new("e1").unwrap()],
        );
        let erased_at = chrono::DateTime::parse_from_rfc3339("2026-11-21T10:00:00Z")
            .unwrap()
            .to_utc();
        durable.tombstone = true;
        durable.erased_at = Some(erased_at);
        let bytes = encode(&key, &durable).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"recent_event_ids": ["e1"], "deleted": true, "erased_at": "2026-11-21T10:00:00Z"})
        );
        let decoded = decode::<UserState>(&bytes, 1).unwrap();
        assert_eq!(decoded.state, UserState::default());
        assert!(decoded.tombstone);
        assert_eq!(decoded.erased_at, Some(erased_at));
    }

    #[test]
    fn a_payload_that_is_not_the_state_is_corrupt() {
        assert!(matches!(
            decode::<UserState>(b"{not json", 1),
            Err(CorruptRow::Payload(_))
        ));
    }

    #[test]
    fn a_payload_from_a_newer_schema_version_is_refused() {
        let payload = br#"{"marketing_opt_in":true,"recent_event_ids":["e1"]}"#;
        assert!(matches!(
            decode::<UserState>(payload, 2),
            Err(CorruptRow::NewerSchema { stored: 2, known: 1 })
        ));
    }

    #[test]
    fn an_older_payload_without_an_upgrade_step_is_corrupt() {
        // UserState defines no upgrade: the trait's default refuses every step.
        let payload = br#"{"marketing_opt_in":true}"#;
        assert!(matches!(
            decode::<UserState>(payload, 0),
            Err(CorruptRow::Upgrade { from: 0, .. })
        ));
    }

    #[test]
    fn the_upgrade_sees_the_state_alone() {
        let payload = br#"{"marketing_opt_in":true,"recent_event_ids":["e1"],"erased_at":"2026-11-21T10:00:00Z"}"#;
        let Split { machinery, state } = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            serde_json::Value::Object(state),
            serde_json::json!({"marketing_opt_in": true})
        );
        assert_eq!(machinery.recent_event_ids, [EventId::new("e1").unwrap()]);
        assert!(machinery.erased_at.is_some());
    }
}
