//! The stored form of a row, shared by the SQL backends.

use super::{StoredRow, JSON_SERIALIZER_ID};
use crate::entity::{PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// The columns a load reads, in the order the backends select them:
/// `(persistence_id, revision, state_ser_id, state_schema_version, state_payload)`.
#[derive(Debug, Clone, diesel::Queryable)]
pub(crate) struct StateRow {
    pub(crate) persistence_id: String,
    pub(crate) revision: i64,
    pub(crate) state_ser_id: i32,
    pub(crate) state_schema_version: i32,
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
        let schema_version = schema_version(self.state_schema_version).map_err(corrupt)?;
        Ok(StoredRow {
            revision: Revision(revision),
            schema_version,
            payload: self.state_payload,
        })
    }
}

/// A stored `state_schema_version`, which is never negative.
pub(crate) fn schema_version(stored: i32) -> Result<u32, CorruptRow> {
    u32::try_from(stored).map_err(|_| CorruptRow::SchemaVersion(stored))
}

/// A schema version as the `INTEGER` column holds it.
pub(crate) fn integer(version: u32) -> Result<i32, StoreError> {
    i32::try_from(version).map_err(|_| StoreError::OutOfRange(version.into()))
}

/// A revision or position as a `BIGINT` column holds it.
pub(crate) fn bigint(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange(value))
}
