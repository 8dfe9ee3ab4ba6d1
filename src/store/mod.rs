//! Durable storage of entity states behind one trait, [`StateStore`], with a
//! backend per database.
//!
//! Rows follow Pekko's `durable_state` table: one row per entity, keyed by
//! its persistence id (`<entity type>|<entity id>`), with the entity type,
//! a revision that every write must name, and the state as bytes. The store
//! knows no entity: the typed methods on `dyn StateStore` ([`load`],
//! [`write`], [`write_changes`]) encode and decode through
//! [`DurableEntity`], so a new entity type needs no store code. A write that
//! finds another revision fails with [`StoreError::Conflict`] instead of
//! overwriting.
//!
//! The database backends run every query on a small runtime of their own
//! (`DbRuntime`), not on the caller's. That keeps diesel-async's blocking
//! calls off actix's single-threaded runtime, lets a write in flight finish
//! even if the actor that asked for it stops, and keeps database timeouts on
//! real time even when a test pauses tokio's clock.
//!
//! [`load`]: trait.StateStore.html#method.load
//! [`write`]: trait.StateStore.html#method.write
//! [`write_changes`]: trait.StateStore.html#method.write_changes

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::UserState;
use crate::entity::{Durable, DurableEntity, EntityKey, EventId, PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};

pub(crate) mod admin;
mod config;
mod group_commit;
mod memory;
mod payload;
#[cfg(feature = "postgres")]
mod postgres;
mod row;
mod runtime;
mod schema;
#[cfg(feature = "sqlite")]
mod sqlite;

/// Implements [`StateStore`] for a SQL store by handing every call to its
/// `group_commit` field: the stores differ in their SQL, not in this.
macro_rules! delegate_to_group_commit {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::StateStore for $store {
            async fn load_row(
                &self,
                key: &$crate::PersistenceId,
            ) -> Result<Option<$crate::store::StoredRow>, $crate::StoreError> {
                self.group_commit.load_row(key).await
            }

            async fn write_row(&self, write: $crate::store::WriteRow) -> Result<$crate::Revision, $crate::StoreError> {
                self.group_commit.write_row(write).await
            }

            fn keeps_change_feed(&self) -> bool {
                self.group_commit.keeps_change_feed()
            }

            async fn ping(&self) -> Result<(), $crate::StoreError> {
                self.group_commit.ping().await
            }

            fn stats(&self) -> $crate::store::StoreStats {
                self.group_commit.stats()
            }

            async fn read_change_rows(
                &self,
                entity_type: &str,
                after: u64,
                limit: usize,
            ) -> Result<Vec<$crate::store::ChangeRow>, $crate::StoreError> {
                self.group_commit.read_changes(entity_type, after, limit).await
            }

            async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, $crate::StoreError> {
                self.group_commit.load_offset(consumer).await
            }

            async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), $crate::StoreError> {
                self.group_commit.save_offset(consumer, position).await
            }

            async fn purge_candidates(
                &self,
                entity_type: &str,
                written_before: chrono::DateTime<chrono::Utc>,
                after: Option<&$crate::PersistenceId>,
                limit: usize,
            ) -> Result<Vec<($crate::PersistenceId, $crate::Revision)>, $crate::StoreError> {
                self.group_commit
                    .purge_candidates(entity_type, written_before, after, limit)
                    .await
            }

            async fn purge_rows(
                &self,
                rows: Vec<($crate::PersistenceId, $crate::Revision)>,
                written_before: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::PersistenceId>, $crate::StoreError> {
                self.group_commit.purge_rows(rows, written_before).await
            }

            async fn count_entities(&self, entity_type: &str) -> Result<u64, $crate::StoreError> {
                self.group_commit.count_entities(entity_type).await
            }

            async fn entity_ids(
                &self,
                entity_type: &str,
                after: Option<&str>,
                limit: usize,
            ) -> Result<Vec<$crate::PersistenceId>, $crate::StoreError> {
                self.group_commit.entity_ids(entity_type, after, limit).await
            }
        }
    };
}
pub(crate) use delegate_to_group_commit;

/// Gives a concrete store the typed methods of `dyn StateStore`, so that
/// `Arc<SqliteStore>` has them as a [`SharedStore`] does.
macro_rules! typed_access {
    ($store:ty) => {
        impl $store {
            /// See [`StateStore::load`](trait.StateStore.html#method.load).
            pub async fn load<K: $crate::EntityKey>(
                &self,
                key: &K,
            ) -> Result<Option<$crate::StoredState<K::Entity>>, $crate::StoreError> {
                (self as &dyn $crate::StateStore).load(key).await
            }

            /// See [`StateStore::write`](trait.StateStore.html#method.write).
            pub async fn write<K: $crate::EntityKey>(
                &self,
                key: &K,
                expected: $crate::Revision,
                revision: $crate::Revision,
                state: &K::Entity,
            ) -> Result<$crate::Revision, $crate::StoreError> {
                (self as &dyn $crate::StateStore)
                    .write(key, expected, revision, state)
                    .await
            }

            /// See [`StateStore::write_changes`](trait.StateStore.html#method.write_changes).
            pub async fn write_changes<K: $crate::EntityKey>(
                &self,
                key: &K,
                expected: $crate::Revision,
                states: &[K::Entity],
            ) -> Result<$crate::Revision, $crate::StoreError> {
                (self as &dyn $crate::StateStore)
                    .write_changes(key, expected, states)
                    .await
            }

            /// See [`StateStore::purge_idle`](trait.StateStore.html#method.purge_idle).
            pub async fn purge_idle<E: $crate::DurableEntity>(
                &self,
                older_than: std::time::Duration,
                chunk_size: usize,
            ) -> Result<u64, $crate::StoreError> {
                (self as &dyn $crate::StateStore)
                    .purge_idle::<E>(older_than, chunk_size)
                    .await
            }

            /// See [`StateStore::count`](trait.StateStore.html#method.count).
            pub async fn count<E: $crate::DurableEntity>(&self) -> Result<u64, $crate::StoreError> {
                (self as &dyn $crate::StateStore).count::<E>().await
            }

            /// See [`StateStore::entity_keys`](trait.StateStore.html#method.entity_keys).
            pub async fn entity_keys<K: $crate::EntityKey>(
                &self,
                after: Option<&K>,
                limit: usize,
            ) -> Result<Vec<K>, $crate::StoreError> {
                (self as &dyn $crate::StateStore).entity_keys(after, limit).await
            }
        }
    };
}
pub(crate) use typed_access;

pub use config::StoreConfig;
pub use memory::MemoryStore;
pub(crate) use payload::{decode as decode_payload, encode as encode_durable, Machinery};
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// An entity's state as committed, with its revision and the event ids the
/// machinery remembers beside it. For users (the default) a [`UserState`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredState<E = UserState> {
    /// The committed revision.
    pub revision: Revision,
    /// The committed state.
    pub state: E,
    /// Ids of the most recently applied events, oldest first.
    pub recent_event_ids: Vec<EventId>,
    /// When the entity was last deleted, if ever: events that happened at or
    /// before it are not applied.
    pub erased_at: Option<chrono::DateTime<chrono::Utc>>,
    /// This revision is the entity's deletion (its state is the default).
    pub deleted: bool,
    /// Per source partition (`topic/partition`), the offset of the last
    /// ingested record applied to this entity, written with the state.
    pub source_offsets: crate::entity::SourceOffsets,
}

impl<E: DurableEntity> StoredState<E> {
    /// What an entity never seen before has: the default state at [`Revision::NONE`].
    pub fn initial() -> Self {
        Self {
            revision: Revision::NONE,
            state: E::default(),
            recent_event_ids: Vec::new(),
            erased_at: None,
            deleted: false,
            source_offsets: Default::default(),
        }
    }

    pub(crate) fn into_durable(self) -> (Revision, Durable<E>) {
        let durable = Durable {
            state: self.state,
            event_ids: self.recent_event_ids,
            erased_at: self.erased_at,
            tombstone: self.deleted,
            source_offsets: crate::entity::AppliedOffsets::from_map(self.source_offsets),
        };
        (self.revision, durable)
    }
}

/// A stored row as the store holds it: entity-agnostic bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The committed revision (at least 1).
    pub revision: Revision,
    /// The schema version the state was written at (`state_schema_version`):
    /// the writing entity's [`DurableEntity::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The encoded state.
    pub payload: Vec<u8>,
}

/// One revision-checked write of one row, as the store takes it.
#[derive(Debug, Clone)]
pub struct WriteRow {
    /// The row.
    pub key: PersistenceId,
    /// `state_ser_manifest`: what the payloads are.
    pub manifest: &'static str,
    /// The revision the row must have ([`Revision::NONE`]: no row yet).
    pub expected: Revision,
    /// The revision written; above `expected`.
    pub revision: Revision,
    /// `state_schema_version` of the payloads: the entity's
    /// [`DurableEntity::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The encoded states of the last `payloads.len()` revisions up to
    /// `revision`, oldest first: the row keeps the last, the change feed
    /// (when the store keeps one) gets each. Without a feed, the last alone
    /// suffices.
    pub payloads: Vec<Vec<u8>>,
}

impl WriteRow {
    /// Refuses writes that cannot be right, before they reach a batch where
    /// they would fail everyone's statement.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.revision <= self.expected || self.payloads.is_empty() {
            return Err(StoreError::InvalidWrite {
                key: self.key.clone(),
                expected: self.expected,
                revision: self.revision,
                states: self.payloads.len(),
            });
        }
        Ok(())
    }
}

/// A change feed entry as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// Where the change stands in the feed of all entity types: in commit order.
    pub position: u64,
    /// The entity.
    pub key: PersistenceId,
    /// The revision committed.
    pub revision: Revision,
    /// The schema version the state was written at.
    pub schema_version: u32,
    /// The encoded state at that revision.
    pub payload: Vec<u8>,
    /// When the writing transaction ran, by the database's clock.
    pub committed_at: chrono::DateTime<chrono::Utc>,
}

/// The rows before the first that failed to decode; the failure itself when
/// it is the first. A change feed read thus delivers every change before a
/// corrupt one and then stops at it, never passing over it.
pub(crate) fn good_prefix<T>(rows: impl IntoIterator<Item = Result<T, StoreError>>) -> Result<Vec<T>, StoreError> {
    let mut good = Vec::new();
    for row in rows {
        match row {
            Ok(row) => good.push(row),
            Err(error) if good.is_empty() => return Err(error),
            Err(_) => break,
        }
    }
    Ok(good)
}

/// Durable storage of entity states with revision-checked writes, for any
/// entity type: rows of bytes keyed by persistence id.
///
/// Implementations must make [`write_row`](Self::write_row) atomic and
/// conditional: it succeeds only if the stored revision is still the
/// expected one. The typed methods ([`load`](#method.load),
/// [`write`](#method.write), [`write_changes`](#method.write_changes)) are on
/// `dyn StateStore`, so a [`SharedStore`] has them.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug + 'static {
    /// The committed row, or `None` for an entity never written.
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError>;

    /// Writes `write` if the stored revision is `write.expected`; otherwise
    /// fails with [`StoreError::Conflict`] and changes nothing.
    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError>;

    /// Whether writes record the change feed (and so need every revision's payload).
    fn keeps_change_feed(&self) -> bool {
        false
    }

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What the store has done since it was opened.
    fn stats(&self) -> StoreStats;

    /// Up to `limit` committed changes of `entity_type` after feed position
    /// `after` (0: from the start), in position order. See [`EntityFeed`](crate::EntityFeed).
    ///
    /// A row that cannot be decoded ends the changes returned; when it is
    /// the first after `after`, the read fails with
    /// [`StoreError::CorruptChange`] naming its position. Never skip it.
    async fn read_change_rows(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        let _ = (entity_type, after, limit);
        Err(StoreError::NoChangeFeed)
    }

    /// The position `consumer` saved last, if any: a change-feed follower's,
    /// or a Kafka ingest's per partition (`kafka/<group>/<topic>/<partition>`).
    /// Every store of this crate keeps them, with or without the change feed.
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let _ = consumer;
        Err(StoreError::Unsupported("reader positions"))
    }

    /// Saves the position `consumer` has processed up to: for a change-feed
    /// follower the last position handled, for an ingest the next offset to read.
    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let _ = (consumer, position);
        Err(StoreError::Unsupported("reader positions"))
    }

    /// Up to `limit` rows of `entity_type` last written before
    /// `written_before` (by the database's `db_timestamp`), with their
    /// revisions, in persistence id order after `after` (`None`: from the
    /// first): what a purge may remove. Pass the last id returned as `after`
    /// for the next chunk; fewer than `limit` means there are no more.
    ///
    /// The default fails with [`StoreError::Unsupported`]; the crate's
    /// stores implement it.
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: chrono::DateTime<chrono::Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let _ = (entity_type, written_before, after, limit);
        Err(StoreError::Unsupported("purging rows"))
    }

    /// Deletes each of `rows` whose stored revision is still the one given
    /// and that was still last written before `written_before`, both checked
    /// in the deleting statement itself, so a row written meanwhile (by any
    /// node) is kept. Returns the ids deleted. With the change feed on, the
    /// same transaction records each deletion in the feed: the next revision,
    /// as a tombstone ([`ChangeKind::Deleted`](crate::ChangeKind::Deleted)).
    ///
    /// The store knows nothing of actors: removing an entity that is
    /// resident somewhere leaves that actor with a state the store no longer
    /// holds. An [`EntityManager`](crate::EntityManager) with retention on
    /// skips its own resident entities; see
    /// [`purge_idle`](trait.StateStore.html#method.purge_idle) otherwise.
    ///
    /// The default fails with [`StoreError::Unsupported`].
    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let _ = (rows, written_before);
        Err(StoreError::Unsupported("purging rows"))
    }

    /// How many entities of `entity_type` the store holds (rows, tombstones
    /// of deleted entities included), read without starting any actor.
    ///
    /// The default fails with [`StoreError::Unsupported`].
    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let _ = entity_type;
        Err(StoreError::Unsupported("counting entities"))
    }

    /// Up to `limit` persistence ids of `entity_type`, in the database's
    /// order of persistence ids, after the one whose
    /// [`as_str`](PersistenceId::as_str) is `after` (`None`: from the
    /// first): pass the last id returned to get the next page. The order is
    /// stable, so paging visits every entity that exists throughout exactly
    /// once; fewer than `limit` ids means the end.
    ///
    /// The default fails with [`StoreError::Unsupported`].
    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let _ = (entity_type, after, limit);
        Err(StoreError::Unsupported("listing entities"))
    }
}

/// Typed access, for every entity type: the state is encoded and decoded
/// through its [`DurableEntity`] implementation.
impl dyn StateStore {
    /// The entity's committed state, or `None` for an entity never written.
    ///
    /// A state stored at an older schema version comes back upgraded
    /// ([`DurableEntity::upgrade`]); one stored at a newer version than the
    /// entity's [`SCHEMA_VERSION`](DurableEntity::SCHEMA_VERSION) fails with
    /// [`StoreError::Corrupt`] ([`CorruptRow::NewerSchema`]).
    pub async fn load<K: EntityKey>(&self, key: &K) -> Result<Option<StoredState<K::Entity>>, StoreError> {
        self.load_durable(&key.persistence_id()).await
    }

    /// Stores `state` as `revision` if the stored revision is `expected`
    /// ([`Revision::NONE`]: no row yet); otherwise fails with
    /// [`StoreError::Conflict`] and changes nothing.
    ///
    /// `revision` is `expected` plus the number of commands the state
    /// reflects. With the change feed on, only `revision` itself is
    /// recorded, and no event ids are remembered beside the state;
    /// [`write_changes`](#method.write_changes) records every revision.
    pub async fn write<K: EntityKey>(
        &self,
        key: &K,
        expected: Revision,
        revision: Revision,
        state: &K::Entity,
    ) -> Result<Revision, StoreError> {
        let key = key.persistence_id();
        let payload = payload::encode_state(&key, state)?;
        self.write_row(WriteRow {
            key,
            manifest: K::Entity::MANIFEST,
            expected,
            revision,
            schema_version: K::Entity::SCHEMA_VERSION,
            payloads: vec![payload],
        })
        .await
    }

    /// Writes the states after each of several commands as revisions
    /// `expected + 1 ..= expected + states.len()`: the row keeps the last,
    /// the change feed (when the store keeps one) gets every one. Fails like
    /// [`write`](#method.write) and then records nothing.
    pub async fn write_changes<K: EntityKey>(
        &self,
        key: &K,
        expected: Revision,
        states: &[K::Entity],
    ) -> Result<Revision, StoreError> {
        let key = key.persistence_id();
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
        self.write_encoded::<K::Entity>(key, expected, revision, payloads).await
    }

    pub(crate) async fn load_durable<E: DurableEntity>(
        &self,
        key: &PersistenceId,
    ) -> Result<Option<StoredState<E>>, StoreError> {
        let Some(row) = self.load_row(key).await? else {
            return Ok(None);
        };
        let corrupt = |source: CorruptRow| StoreError::Corrupt {
            key: key.clone(),
            revision: row.revision.0 as i64,
            source,
        };
        let durable = payload::decode::<E>(&row.payload, row.schema_version).map_err(corrupt)?;
        Ok(Some(StoredState {
            revision: row.revision,
            state: durable.state,
            recent_event_ids: durable.event_ids,
            erased_at: durable.erased_at,
            deleted: durable.tombstone,
            source_offsets: durable.source_offsets.into_map(),
        }))
    }

    /// Writes revisions `expected + 1 ..= revision`: `payloads` holds the
    /// encoded state ([`encode_durable`]) of each when the store keeps a
    /// change feed, else only the last, the one a row needs (callers encode
    /// no more than that).
    pub(crate) async fn write_encoded<E: DurableEntity>(
        &self,
        key: PersistenceId,
        expected: Revision,
        revision: Revision,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Revision, StoreError> {
        self.write_row(WriteRow {
            key,
            manifest: E::MANIFEST,
            expected,
            revision,
            schema_version: E::SCHEMA_VERSION,
            payloads,
        })
        .await
    }
}

/// Counters of a store: how well group commit and bulk restore are batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Write statements (batches) executed.
    pub write_statements: u64,
    /// Rows those statements wrote (conflicts excluded).
    pub rows_written: u64,
    /// Rows refused because their revision had moved on.
    pub conflicts: u64,
    /// Load statements (batches) executed.
    pub load_statements: u64,
    /// Entities those statements looked up.
    pub users_loaded: u64,
}

/// A shared, type-erased store, as the actors hold it.
pub type SharedStore = Arc<dyn StateStore>;

/// The serializer id of every row this crate writes: the payload is serde JSON.
pub(crate) const JSON_SERIALIZER_ID: i32 = 1;
