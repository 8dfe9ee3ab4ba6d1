//! The ingest's state per partition and per entity: the partitions owned,
//! each entity's lane of records, and the records on their way.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::progress::Progress;
use crate::entity::{DurableEntity, EntityEvent, RecordOrigin};

/// A topic partition.
pub(super) type Partition = (Arc<str>, i32);

/// The ingest's bookkeeping, under one lock.
pub(super) struct State<E: DurableEntity> {
    /// The partitions this member owns.
    pub(super) owned: HashMap<Partition, Owned<E>>,
    /// Per entity, its records waiting and whether a batch is in flight.
    pub(super) lanes: HashMap<E::Key, Lane<E>>,
    /// Records received and not settled, over all partitions.
    pub(super) unsettled: usize,
    /// Entities served from partitions revoked in the last rebalance: handed
    /// over at the next assignment unless their partition comes back.
    pub(super) revoked: HashMap<Partition, HashSet<E::Key>>,
    /// Numbers each assignment of a partition, so that a record of an
    /// earlier assignment never counts in a later one.
    pub(super) next_epoch: u64,
}

impl<E: DurableEntity> Default for State<E> {
    fn default() -> Self {
        Self {
            owned: HashMap::new(),
            lanes: HashMap::new(),
            unsettled: 0,
            revoked: HashMap::new(),
            next_epoch: 0,
        }
    }
}

/// An owned partition.
pub(super) struct Owned<E: DurableEntity> {
    pub(super) epoch: u64,
    /// `topic/partition`: the key of entities' `source_offsets`.
    pub(super) label: Arc<str>,
    pub(super) progress: Progress,
    /// Records of it sent to entities (or to the dead-letter topic) and not settled.
    pub(super) in_flight: usize,
    /// Entities its records went to.
    pub(super) served: HashSet<E::Key>,
    /// The position last stored.
    pub(super) saved: Option<i64>,
}

/// One entity's records: waiting, and whether a batch is in flight.
pub(super) struct Lane<E: DurableEntity> {
    pub(super) waiting: VecDeque<Pending<E>>,
    pub(super) busy: bool,
}

/// A decoded record on its way to its entity.
pub(super) struct Pending<E: DurableEntity> {
    pub(super) partition: Partition,
    pub(super) epoch: u64,
    pub(super) event: EntityEvent<E::Command>,
    pub(super) origin: RecordOrigin,
    pub(super) raw: RawRecord,
}

/// What a dead letter carries of the record it replaces.
pub(super) struct RawRecord {
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Option<Vec<u8>>,
}
