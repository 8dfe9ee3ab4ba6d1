//! The stored form of a row, shared by the SQL backends.

use super::{StoredRow, JSON_SERIALIZER_ID};
use crate::entity::{PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// The columns a load reads, in the order the backends select them:
/// `(persistence_id, revision, state_ser_id, state_payload)`.
#[derive(Debug, Clone, diesel::Queryable)]
pub(crate) struct StateRow {
    pub(crate) persistence_id: String,
    pub(crate) revision: i64,
    pub(crate) state_ser_id: i32,
    pub(crate) state_payload: Vec<u8>,
}

impl StateRow {
    /// Checks what the store itself can check of a row, failing with
    /// [`StoreError::Corrupt`] (naming the entity) for anything this version
    /// cannot read.
    pub(crate) fn decode(self, key: &PersistenceId) -> Result<StoredRow, StoreError> {
        let corrupt = |source: CorruptRow| StoreError::Corrupt {
            key: key.clone(),
            revision: self.revision,
            source,
        };
        let revision = u64::try_from(self.revision)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| corrupt(CorruptRow::Revision))?;
        if self.state_ser_id != JSON_SERIALIZER_ID {
            return Err(corrupt(CorruptRow::SerializerId(self.state_ser_id)));
        }
        Ok(StoredRow {
            revision: Revision(revision),
            payload: self.state_payload,
        })
    }
}

/// A revision or position as a `BIGINT` column holds it.
pub(crate) fn bigint(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange(value))
}
