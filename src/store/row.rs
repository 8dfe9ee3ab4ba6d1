//! The stored form of a row, shared by the SQL backends.

use diesel::sql_types::{BigInt, Binary, Integer};
use diesel::QueryableByName;

use super::{StoredRow, JSON_SERIALIZER_ID};
use crate::entity::{PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// The columns a load reads.
#[derive(Debug, Clone, QueryableByName, diesel::Queryable)]
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
