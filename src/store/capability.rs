//! The store seam: what a store does, one trait per capability.
//!
//! [`StateStore`] keeps rows: the one capability every actor needs. The
//! others are traits of their own, so code that needs one names it and a
//! store without it does not compile there: [`Offsets`] for an ingest's
//! positions and a feed consumer's offsets, [`ChangeLog`] for the change
//! feed, [`Maintenance`] for purges and admin reads. [`Store`] is all of them
//! together: what the crate's stores are, and what a manager runs on
//! ([`SharedStore`](super::SharedStore)). Typed conveniences (`load::<K>`,
//! `purge_idle::<E>`, ...) are on the extension traits
//! [`StateStoreExt`](super::StateStoreExt) and
//! [`MaintenanceExt`](super::MaintenanceExt), for every store.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rows::{ChangeRow, FeedBounds, Fence, StoreStats, StoredRow, StoredTimer, WriteRow};
use crate::entity::{PersistenceId, Revision, Slice};
use crate::error::StoreError;

/// Durable storage of entity states with revision-checked writes, for any
/// entity type: rows of bytes keyed by persistence id.
///
/// Implementations must make [`write_row`](Self::write_row) atomic and
/// conditional: it succeeds only if the stored revision is still the
/// expected one.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug + 'static {
    /// The committed row, or `None` for an entity never written.
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError>;

    /// Writes `write` if the stored revision is `write.expected`; otherwise
    /// fails with [`StoreError::Conflict`] and changes nothing.
    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError>;

    /// Whether writes record the change feed, and so need every revision's
    /// payload (without it, the last suffices).
    fn keeps_change_feed(&self) -> bool;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What the store has done since it was opened.
    fn stats(&self) -> StoreStats;

    /// The statements cluster mode decides ownership with, in this store's
    /// database; `None` for a store that cannot hold them (SQLite, memory).
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }
}

/// Ownership in cluster mode, decided in the database the entities live in:
/// nodes register and renew one lease row each; slices and named leases
/// change hands only by compare-and-set on their rows, whose epoch is the
/// fencing token. Every expiry is decided by the database's clock. See
/// [`Cluster`](crate::Cluster).
#[async_trait]
pub trait Leases: Send + Sync {
    /// Registers `node` at `address` with a lease of `ttl` from now (or
    /// registers it again), and moves on the epoch of every slice and named
    /// lease it held: a previous process under the same name is fenced off.
    async fn join(&self, node: &str, address: &str, ttl: std::time::Duration) -> Result<(), StoreError>;

    /// Extends `node`'s lease to `ttl` from now, unless it has expired:
    /// false then (its slices are no longer its own; it joins again).
    async fn renew(&self, node: &str, ttl: std::time::Duration) -> Result<bool, StoreError>;

    /// The registered nodes and every slice's owner, as the database sees them now.
    async fn view(&self) -> Result<ClusterView, StoreError>;

    /// Takes those of `slices` that no live node owns for `node`, each with
    /// its epoch moved on; returns the slices taken and their epochs.
    async fn acquire(&self, node: &str, slices: &[Slice]) -> Result<Vec<(Slice, u64)>, StoreError>;

    /// Hands each of `moves`' slices from `node` (owning it at the epoch
    /// given) to the node given, or to no one: their epochs move on. One
    /// statement, locking the slices in order; it waits for the writes
    /// fenced by the old epochs that are in flight. Returns the slices moved
    /// with their new epochs (not those `node` no longer owned at that epoch).
    async fn transfer(
        &self,
        node: &str,
        moves: &[(Slice, u64, Option<String>)],
    ) -> Result<Vec<(Slice, u64)>, StoreError>;

    /// Marks `node` as leaving: it hands its slices over and no placement
    /// counts it any more.
    async fn leave(&self, node: &str) -> Result<(), StoreError>;

    /// Removes `node`'s registration.
    async fn deregister(&self, node: &str) -> Result<(), StoreError>;

    /// Takes the named lease `name` for `node` if no live node holds it
    /// (or `node` itself does), its epoch moved on; `None` if another live
    /// node holds it.
    async fn acquire_named(&self, name: &str, node: &str) -> Result<Option<u64>, StoreError>;

    /// Gives the named lease up, if `node` still holds it at `epoch`.
    async fn release_named(&self, name: &str, node: &str, epoch: u64) -> Result<(), StoreError>;

    /// [`Maintenance::purge_rows`] in cluster mode: each row is deleted only
    /// while its fence holds (`node` owns its slice at the epoch given, its
    /// lease unexpired), checked in the deleting statement.
    async fn purge_rows_fenced(
        &self,
        rows: Vec<(PersistenceId, Revision, Fence)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError>;

    /// The node this store's process joined a cluster as, if it has.
    fn joined(&self) -> Option<std::sync::Arc<dyn JoinedNode>>;

    /// Records the node this store's process joined as.
    fn set_joined(&self, node: std::sync::Arc<dyn JoinedNode>);

    /// Saves `consumer`'s position only while `node` holds the named lease
    /// `lease` at `epoch` with its node lease unexpired, checked in the same
    /// statement (the lease row held FOR SHARE, so no hand-over commits
    /// meanwhile); `false` if the fence did not hold and nothing was saved.
    async fn save_offset_fenced(
        &self,
        consumer: &str,
        position: u64,
        lease: &str,
        node: &str,
        epoch: u64,
    ) -> Result<bool, StoreError>;
}

/// The node of a cluster a store's process has joined as: what work that
/// runs once per cluster (a named lease's holder) needs of it. Set by
/// [`Cluster::join`](crate::Cluster::join) on the store it joins with.
pub trait JoinedNode: Send + Sync {
    /// The node's name.
    fn node(&self) -> &str;

    /// Whether its lease, as last renewed, may still be trusted.
    fn lease_is_valid(&self) -> bool;

    /// How often its membership runs (and so how soon a lease can move).
    fn round(&self) -> std::time::Duration;
}

/// The cluster as the database sees it: the registered nodes, and each
/// slice's owner and epoch (by slice index).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Every registered node.
    pub nodes: Vec<NodeRow>,
    /// Each slice's owner (`None`: no one) and epoch, by index.
    pub slices: Vec<(Option<String>, u64)>,
}

/// A registered node, as the database sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Its name.
    pub node: String,
    /// Where other nodes forward its slices' commands.
    pub address: String,
    /// Its lease has not expired, by the database's clock.
    pub alive: bool,
    /// It is leaving gracefully.
    pub leaving: bool,
}

/// Named positions: a change-feed consumer's offset, a Kafka ingest's
/// position per partition (`kafka/<group>/<topic>/<partition>`) and the
/// dead letters it intends to write (under `.../dead-letters/`).
#[async_trait]
pub trait Offsets: StateStore {
    /// The position `consumer` saved last, if any.
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError>;

    /// Saves the position `consumer` has processed up to: for a change-feed
    /// follower the last position handled, for an ingest the next offset to read.
    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError>;

    /// Every position saved under a name that starts with `prefix`, with
    /// its name: an ingest reads the dead-letter intents of a partition so
    /// (`kafka/<group>/<topic>/<partition>/dead-letters/`). The prefix is
    /// matched exactly, case and all (no pattern characters).
    async fn offsets_under(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError>;

    /// Removes the positions saved under a name that starts with `prefix`
    /// whose position is below `below`; returns how many. An ingest drops
    /// the dead-letter intents of records below the position it stored so,
    /// since those records are never read again.
    async fn remove_offsets_below(&self, prefix: &str, below: u64) -> Result<u64, StoreError>;
}

/// The change feed: every committed revision, in commit order. See
/// [`EntityFeed`](crate::EntityFeed).
#[async_trait]
pub trait ChangeLog: Offsets {
    /// Up to `limit` committed changes of `entity_type` after feed position
    /// `after` (0: from the start), in position order.
    ///
    /// A row that cannot be decoded ends the changes returned; when it is
    /// the first after `after`, the read fails with
    /// [`StoreError::CorruptChange`] naming its position. Never skip it. A
    /// store opened without the feed fails with [`StoreError::NoChangeFeed`].
    async fn read_change_rows(&self, entity_type: &str, after: u64, limit: usize)
        -> Result<Vec<ChangeRow>, StoreError>;

    /// Where the feed stands: its last position, and the lowest position a
    /// consumer saved (every [`Offsets`] name but the Kafka ingest's, which
    /// start with `kafka/`).
    async fn feed_bounds(&self) -> Result<FeedBounds, StoreError>;

    /// A signal this store notifies whenever it commits changes to the feed,
    /// so that a follower in this process wakes at once rather than at its
    /// next poll (changes committed by other processes show at the poll);
    /// `None`: followers poll. Register interest before reading (as
    /// [`EntityFeed::next`](crate::EntityFeed::next) does), or a commit in
    /// between goes unnoticed until the poll.
    fn feed_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Removes up to `limit` changes at positions up to `through`, and with
    /// `committed_before` only those committed before it, oldest first;
    /// returns how many. What [`ChangeLogExt::trim_feed`](super::ChangeLogExt::trim_feed)
    /// runs, chunk by chunk.
    async fn trim_changes(
        &self,
        through: u64,
        committed_before: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<u64, StoreError>;
}

/// Retention and admin reads: finding and purging idle rows, counting and
/// listing the entities of a type, without an actor.
#[async_trait]
pub trait Maintenance: StateStore {
    /// Up to `limit` rows of `entity_type` last written before
    /// `written_before` (by the database's `db_timestamp`), with their
    /// revisions, in persistence id order after `after` (`None`: from the
    /// first): what a purge may remove. Pass the last id returned as `after`
    /// for the next chunk; fewer than `limit` means there are no more.
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError>;

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
    /// skips its own resident entities.
    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError>;

    /// How many entities of `entity_type` the store holds (rows, tombstones
    /// of deleted entities included), read without starting any actor.
    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError>;

    /// Up to `limit` persistence ids of `entity_type`, in the database's
    /// order of persistence ids, after the one whose
    /// [`as_str`](PersistenceId::as_str) is `after` (`None`: from the
    /// first): pass the last id returned to get the next page. The order is
    /// stable, so paging visits every entity that exists throughout exactly
    /// once; fewer than `limit` ids means the end.
    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError>;
}

/// Durable timers' rows: what a scheduler reads of them, and what an
/// application lists and cancels. Timers are set and consumed by the
/// writes that commit their entity's state ([`WriteRow::timers`],
/// [`WriteRow::fired`]).
#[async_trait]
pub trait Timers: StateStore {
    /// Up to `limit` timers of `entity_type` due before `before`, earliest
    /// first; in cluster mode (`slices`), only those of the slices given.
    async fn due_timers(
        &self,
        entity_type: &str,
        before: DateTime<Utc>,
        slices: Option<&[Slice]>,
        limit: usize,
    ) -> Result<Vec<StoredTimer>, StoreError>;

    /// Every pending timer of the entity `key`, by name.
    async fn timers_of(&self, key: &PersistenceId) -> Result<Vec<StoredTimer>, StoreError>;

    /// Cancels the entity's timer `name`; whether it had one. A fire of it
    /// in flight then commits nothing.
    async fn cancel_timer(&self, key: &PersistenceId, name: &str) -> Result<bool, StoreError>;
}

/// Every capability at once: what the crate's stores are, and what a
/// manager runs on (its retention purges, an ingest on it stores positions,
/// a feed reads from it). Implemented for every type that has them all.
pub trait Store: ChangeLog + Maintenance + Timers {}

impl<S: ChangeLog + Maintenance + Timers + ?Sized> Store for S {}
