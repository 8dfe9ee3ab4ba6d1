//! Retention and admin reads, typed: purging the rows of one entity type
//! that have not been written for a while, counting a type's entities and
//! paging through its keys, all without starting an actor.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::StateStore;
use crate::entity::{DurableEntity, EntityKey, PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// The change feed's record of a purged entity: a tombstone, the payload of a
/// deletion with no state and no remembered event ids. The feed reads it as
/// [`ChangeKind::Deleted`](crate::ChangeKind::Deleted) with the default state.
pub(crate) const TOMBSTONE: &[u8] = br#"{"deleted":true}"#;

/// The instant `older_than` ago by this process's clock; `None` when that is
/// before any representable time, so nothing can be older.
pub(crate) fn written_before(older_than: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
}

/// Retention and admin reads for every entity type.
impl dyn StateStore {
    /// Removes every row of `E` not written for `older_than` (by the row's
    /// `db_timestamp`), `chunk_size` rows per statement, and returns how
    /// many it removed (also counted in `persist_durable_purged_total`).
    ///
    /// Each chunk is deleted only where the row still has the revision and
    /// the age it was found with, checked in the deleting statement, so an
    /// entity written meanwhile (from any node) is kept. With the change feed
    /// on, each removed entity appears in it as deleted. Its next write
    /// starts over at revision 1 from the default state.
    ///
    /// The store knows nothing of actors: use this where no
    /// [`EntityManager`](crate::EntityManager) of `E` is running (a
    /// maintenance job), since an entity resident in a manager would keep a
    /// state its store no longer holds. A running manager purges with
    /// [`Config::with_retention`](crate::Config::with_retention) instead, and
    /// skips its resident entities.
    ///
    /// An error stops the purge; chunks before it stay purged.
    pub async fn purge_idle<E: DurableEntity>(
        &self,
        older_than: Duration,
        chunk_size: usize,
    ) -> Result<u64, StoreError> {
        let Some(written_before) = written_before(older_than) else {
            return Ok(0);
        };
        let chunk_size = chunk_size.max(1);
        let mut after: Option<PersistenceId> = None;
        let mut purged = 0;
        loop {
            let candidates = self
                .purge_candidates(E::ENTITY_TYPE, written_before, after.as_ref(), chunk_size)
                .await?;
            let more = candidates.len() >= chunk_size;
            after = candidates.last().map(|(id, _)| id.clone());
            purged += self.purge_counted::<E>(candidates, written_before).await?.len() as u64;
            if !more {
                return Ok(purged);
            }
        }
    }

    /// [`purge_rows`](StateStore::purge_rows) for rows of `E`, counted in
    /// `persist_durable_purged_total`.
    pub(crate) async fn purge_counted<E: DurableEntity>(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let purged = self.purge_rows(rows, written_before).await?;
        metrics::counter!("persist_durable_purged_total", "entity" => E::ENTITY_TYPE).increment(purged.len() as u64);
        Ok(purged)
    }

    /// How many entities of `E` the store holds; see
    /// [`count_entities`](StateStore::count_entities).
    pub async fn count<E: DurableEntity>(&self) -> Result<u64, StoreError> {
        self.count_entities(E::ENTITY_TYPE).await
    }

    /// Up to `limit` keys of `K`'s entity type after `after` (`None`: from
    /// the first), in the stable order of
    /// [`entity_ids`](StateStore::entity_ids): pass the last key returned
    /// to get the next page; fewer than `limit` keys means the end.
    ///
    /// A stored id that does not decode to a `K` fails the page with
    /// [`StoreError::Corrupt`] naming it;
    /// [`entity_ids`](StateStore::entity_ids) pages past it.
    pub async fn entity_keys<K: EntityKey>(&self, after: Option<&K>, limit: usize) -> Result<Vec<K>, StoreError> {
        let after = after.map(EntityKey::persistence_id);
        let ids = self
            .entity_ids(K::Entity::ENTITY_TYPE, after.as_ref().map(PersistenceId::as_str), limit)
            .await?;
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            match K::from_entity_id(id.entity_id()) {
                Ok(key) => keys.push(key),
                Err(invalid) => {
                    let revision = match self.load_row(&id).await {
                        Ok(Some(row)) => row.revision.0 as i64,
                        _ => 0,
                    };
                    return Err(StoreError::Corrupt {
                        key: id,
                        revision,
                        source: CorruptRow::Key(invalid),
                    });
                }
            }
        }
        Ok(keys)
    }
}
