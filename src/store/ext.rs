//! Typed access for every store, as tower's `ServiceExt` gives every
//! service its combinators: extension traits with a blanket implementation,
//! so a concrete store, an `Arc` of one and a [`SharedStore`](super::SharedStore)
//! all have them. The state is encoded and decoded through the entity's
//! [`DurableEntity`] implementation; the store itself knows no entity.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::capability::{ChangeLog, Maintenance, StateStore};
use super::payload;
use super::rows::{FeedRetention, StoredState, WriteRow};
use crate::entity::{checked_persistence_id, Durable, DurableEntity, EntityKey, PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

/// Typed loads and writes, for every [`StateStore`].
#[async_trait]
pub trait StateStoreExt: StateStore {
    /// The entity's committed state, or `None` for an entity never written.
    ///
    /// A state stored at an older schema version comes back upgraded
    /// ([`DurableEntity::upgrade`]); one stored at a newer version than the
    /// entity's [`SCHEMA_VERSION`](DurableEntity::SCHEMA_VERSION) fails with
    /// [`StoreError::Corrupt`] ([`CorruptRow::NewerSchema`]).
    async fn load<K: EntityKey>(&self, key: &K) -> Result<Option<StoredState<K::Entity>>, StoreError> {
        let loaded = load_durable::<K::Entity, _>(self, &key.persistence_id()).await?;
        Ok(loaded.map(|(revision, durable)| StoredState::from_durable(revision, durable)))
    }

    /// Stores `state` as `revision` if the stored revision is `expected`
    /// ([`Revision::NONE`]: no row yet); otherwise fails with
    /// [`StoreError::Conflict`] and changes nothing.
    ///
    /// `revision` is `expected` plus the number of commands the state
    /// reflects. With the change feed on, only `revision` itself is
    /// recorded, and no event ids are remembered beside the state;
    /// [`write_changes`](Self::write_changes) records every revision.
    async fn write<K: EntityKey>(
        &self,
        key: &K,
        expected: Revision,
        revision: Revision,
        state: &K::Entity,
    ) -> Result<Revision, StoreError> {
        let key = checked(key)?;
        let payload = payload::encode_state(&key, state)?;
        self.write_row(entity_write::<K::Entity>(
            key,
            (expected, None),
            revision,
            vec![payload],
        ))
        .await
    }

    /// Writes the states after each of several commands as revisions
    /// `expected + 1 ..= expected + states.len()`: the row keeps the last,
    /// the change feed (when the store keeps one) gets every one. Fails like
    /// [`write`](Self::write) and then records nothing.
    async fn write_changes<K: EntityKey>(
        &self,
        key: &K,
        expected: Revision,
        states: &[K::Entity],
    ) -> Result<Revision, StoreError> {
        let key = checked(key)?;
        let revision = Revision(expected.0 + states.len() as u64);
        // Without a feed only the row's state, the last, is needed.
        let skipped = if self.keeps_change_feed() {
            0
        } else {
            states.len().saturating_sub(1)
        };
        let payloads = states[skipped..]
            .iter()
            .map(|state| payload::encode_state(&key, state))
            .collect::<Result<Vec<_>, _>>()?;
        self.write_row(entity_write::<K::Entity>(key, (expected, None), revision, payloads))
            .await
    }
}

impl<S: StateStore + ?Sized> StateStoreExt for S {}

/// Retention of the change feed, for every store with a [`ChangeLog`].
#[async_trait]
pub trait ChangeLogExt: ChangeLog {
    /// Removes the changes `retention` lets go, in chunks, and returns how
    /// many (also counted in `persist_durable_feed_trimmed_total`). Never
    /// past the slowest consumer unless told
    /// ([`FeedRetention::beyond_consumers`]); an error stops it, the chunks
    /// before it stay removed.
    async fn trim_feed(&self, retention: &FeedRetention) -> Result<u64, StoreError> {
        let bounds = self.feed_bounds().await?;
        let mut through = bounds.head.saturating_sub(retention.keep_last.unwrap_or(0));
        if !retention.beyond_consumers {
            if let Some(slowest) = bounds.slowest_consumer {
                through = through.min(slowest);
            }
        }
        let committed_before = match retention.keep_for {
            Some(age) => match written_before(age) {
                Some(before) => Some(before),
                None => return Ok(0),
            },
            None => None,
        };
        let chunk = retention.chunk_size.max(1);
        let mut trimmed = 0;
        loop {
            let removed = self.trim_changes(through, committed_before, chunk).await?;
            trimmed += removed;
            metrics::counter!("persist_durable_feed_trimmed_total").increment(removed);
            if removed < chunk as u64 {
                return Ok(trimmed);
            }
        }
    }
}

impl<S: ChangeLog + ?Sized> ChangeLogExt for S {}

/// Typed retention and admin reads, for every store with [`Maintenance`].
#[async_trait]
pub trait MaintenanceExt: Maintenance {
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
    async fn purge_idle<E: DurableEntity>(&self, older_than: Duration, chunk_size: usize) -> Result<u64, StoreError> {
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
            purged += purge_counted::<E, _>(self, candidates, written_before).await?.len() as u64;
            if !more {
                return Ok(purged);
            }
        }
    }

    /// How many entities of `E` the store holds; see
    /// [`count_entities`](Maintenance::count_entities).
    async fn count<E: DurableEntity>(&self) -> Result<u64, StoreError> {
        self.count_entities(E::ENTITY_TYPE).await
    }

    /// Up to `limit` keys of `K`'s entity type after `after` (`None`: from
    /// the first), in the stable order of
    /// [`entity_ids`](Maintenance::entity_ids): pass the last key returned
    /// to get the next page; fewer than `limit` keys means the end.
    ///
    /// A stored id that does not decode to a `K` fails the page with
    /// [`StoreError::Corrupt`] naming it;
    /// [`entity_ids`](Maintenance::entity_ids) pages past it.
    async fn entity_keys<K: EntityKey>(&self, after: Option<&K>, limit: usize) -> Result<Vec<K>, StoreError> {
        let after = after.map(EntityKey::persistence_id);
        let ids = self
            .entity_ids(K::Entity::ENTITY_TYPE, after.as_ref().map(PersistenceId::as_str), limit)
            .await?;
        ids.into_iter()
            .map(|id| {
                K::from_entity_id(id.entity_id()).map_err(|invalid| StoreError::Corrupt {
                    key: id,
                    revision: None,
                    source: CorruptRow::Key(invalid),
                })
            })
            .collect()
    }
}

impl<S: Maintenance + ?Sized> MaintenanceExt for S {}

/// `key`'s persistence id, refused with [`StoreError::InvalidKey`] unless its
/// entity id reads back as `key`.
pub(crate) fn checked<K: EntityKey>(key: &K) -> Result<PersistenceId, StoreError> {
    checked_persistence_id(key).map_err(|source| StoreError::InvalidKey {
        key: key.persistence_id(),
        source,
    })
}

/// The entity's committed revision and state as the actors hold them, or
/// `None` for an entity never written.
pub(crate) async fn load_durable<E: DurableEntity, S: StateStore + ?Sized>(
    store: &S,
    key: &PersistenceId,
) -> Result<Option<(Revision, Durable<E>)>, StoreError> {
    let Some(row) = store.load_row(key).await? else {
        return Ok(None);
    };
    let durable = payload::decode::<E>(&row.payload, row.schema_version).map_err(|source| StoreError::Corrupt {
        key: key.clone(),
        revision: Some(row.revision),
        source,
    })?;
    Ok(Some((row.revision, durable)))
}

/// The write of revisions `expected + 1 ..= revision` of an `E` over the
/// row at `expected` (its revision, and its generation if known): `payloads`
/// holds the encoded state of each when the store keeps a change feed, else
/// only the last, the one a row needs (callers encode no more than that).
/// It erases nothing, carries no fence and changes no timer; callers set those.
pub(crate) fn entity_write<E: DurableEntity>(
    key: PersistenceId,
    (expected, generation): (Revision, Option<u64>),
    revision: Revision,
    payloads: Vec<Vec<u8>>,
) -> WriteRow {
    WriteRow {
        key,
        manifest: E::MANIFEST,
        expected,
        generation,
        revision,
        schema_version: E::SCHEMA_VERSION,
        payloads,
        erases: false,
        fence: None,
        timers: Vec::new(),
        fired: None,
    }
}

/// [`purge_rows`](Maintenance::purge_rows) for rows of `E`, counted in
/// `persist_durable_purged_total`.
pub(crate) async fn purge_counted<E: DurableEntity, S: Maintenance + ?Sized>(
    store: &S,
    rows: Vec<(PersistenceId, Revision)>,
    written_before: DateTime<Utc>,
) -> Result<Vec<PersistenceId>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let purged = store.purge_rows(rows, written_before).await?;
    metrics::counter!("persist_durable_purged_total", "entity" => E::ENTITY_TYPE).increment(purged.len() as u64);
    Ok(purged)
}

/// The instant `older_than` ago by this process's clock; `None` when that is
/// before any representable time, so nothing can be older.
pub(crate) fn written_before(older_than: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
}
