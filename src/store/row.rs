//! The stored form of a state, shared by the SQL backends.

use diesel::sql_types::{BigInt, Binary, Integer};
use diesel::QueryableByName;

use super::{Revision, StoredState};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

/// `state_ser_id` of rows whose payload is `UserState` as serde JSON.
pub const JSON_SERIALIZER_ID: i32 = 1;
/// `state_ser_manifest`: what the payload is, so a later format can coexist.
pub const STATE_MANIFEST: &str = "UserState/v1";

/// The columns a load reads.
#[derive(Debug, QueryableByName)]
pub(crate) struct StateRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) persistence_id: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) revision: i64,
    #[diesel(sql_type = Integer)]
    pub(crate) state_ser_id: i32,
    #[diesel(sql_type = Binary)]
    pub(crate) state_payload: Vec<u8>,
}

impl StateRow {
    /// Decodes the row, failing with [`StoreError::Corrupt`] (naming the user)
    /// for anything this version cannot read.
    pub(crate) fn decode(&self, key: &UserKey) -> Result<StoredState, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            revision: self.revision,
            reason,
        };
        let revision = u64::try_from(self.revision)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| corrupt("the revision is not positive".into()))?;
        if self.state_ser_id != JSON_SERIALIZER_ID {
            return Err(corrupt(format!("unknown serializer id {}", self.state_ser_id)));
        }
        let state: UserState =
            serde_json::from_slice(&self.state_payload).map_err(|e| corrupt(format!("payload: {e}")))?;
        Ok(StoredState {
            revision: Revision(revision),
            state,
        })
    }
}

/// The payload column of a state.
pub(crate) fn encode(state: &UserState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(state).map_err(|e| StoreError::Setup(format!("cannot encode a state: {e}")))
}

/// A revision as the `BIGINT` column holds it.
pub(crate) fn revision_column(revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision.0).map_err(|_| StoreError::Setup(format!("revision {revision} exceeds BIGINT")))
}
