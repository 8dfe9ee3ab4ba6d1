//! The stored form of a state: the entity's JSON object with the
//! machinery's remembered event ids beside its fields, under
//! `recent_event_ids`, the field user states have always been stored with.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::entity::{DurableEntity, EventId, PersistenceId};
use crate::error::{CorruptRow, StoreError};

#[derive(Serialize)]
struct Envelope<'a, E> {
    #[serde(flatten)]
    state: &'a E,
    #[serde(skip_serializing_if = "<[EventId]>::is_empty")]
    recent_event_ids: &'a [EventId],
}

#[derive(Deserialize)]
struct Decoded<E> {
    #[serde(flatten)]
    state: E,
    #[serde(default)]
    recent_event_ids: Vec<EventId>,
}

pub(crate) fn encode<E: DurableEntity>(
    key: &PersistenceId,
    state: &E,
    event_ids: &[EventId],
) -> Result<Vec<u8>, StoreError> {
    let envelope = Envelope {
        state,
        recent_event_ids: event_ids,
    };
    serde_json::to_vec(&envelope).map_err(|e| StoreError::Encode {
        key: key.clone(),
        source: Arc::new(e),
    })
}

pub(crate) fn decode<E: DurableEntity>(payload: &[u8]) -> Result<(E, Vec<EventId>), CorruptRow> {
    let decoded: Decoded<E> = serde_json::from_slice(payload).map_err(|e| CorruptRow::Payload(Arc::new(e)))?;
    Ok((decoded.state, decoded.recent_event_ids))
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
        let ids = [EventId::new("e1").unwrap()];
        let bytes = encode(&key, &state, &ids).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["recent_event_ids"][0], "e1");
        assert_eq!(json["marketing_opt_in"], true);
        assert_eq!(decode::<UserState>(&bytes).unwrap(), (state, ids.to_vec()));
    }

    #[test]
    fn a_row_written_before_the_generic_core_loads_with_its_event_ids() {
        let old = br#"{"last_login":null,"last_cart_use":null,"recent_products":["p1"],"marketing_opt_in":false,"last_event_time":null,"recent_event_ids":["e1","e2"]}"#;
        let (state, ids) = decode::<UserState>(old).unwrap();
        assert_eq!(state.recent_products[0].as_str(), "p1");
        assert_eq!(ids, [EventId::new("e1").unwrap(), EventId::new("e2").unwrap()]);
    }

    #[test]
    fn a_payload_that_is_not_the_state_is_corrupt() {
        assert!(matches!(decode::<UserState>(b"{not json"), Err(CorruptRow::Payload(_))));
    }
}
