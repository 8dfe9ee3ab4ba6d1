//! The ingest's state per partition and per entity: the partitions owned,
//! each entity's lane of records, and the records on their way.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// The bytes of the record copies those hold for dead-lettering.
    pub(super) unsettled_bytes: usize,
    /// Entities served from partitions revoked in the last rebalance: handed
    /// over at the next assignment unless their partition comes back.
    pub(super) revoked: HashMap<Partition, Served<E::Key>>,
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
            unsettled_bytes: 0,
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
    /// Entities its records went to, the most recent ones.
    pub(super) served: Served<E::Key>,
    /// The position last stored.
    pub(super) saved: Option<i64>,
    /// The position last committed to Kafka (for lag monitoring).
    pub(super) committed_to_kafka: Option<i64>,
    /// The offset the next record should have, checked once where reading
    /// started again (an assignment, a resume): a later one is a gap.
    pub(super) expect_next: Option<i64>,
    /// The dead-letter intents stored for its records at or past where this
    /// assignment started, by offset: read from the store at the
    /// assignment, added to as records are dead-lettered without their
    /// entity's noting, dropped once the stored position passes them.
    pub(super) intents: BTreeMap<i64, Intent>,
}

/// A dead-letter intent: stored before the dead letter of a record its
/// entity could not note as refused (its row is corrupt, say), so that the
/// record read again is dead-lettered, never delivered (and so never
/// applied, even once the row is repaired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    /// The dead letter may not be written: read again, the record is
    /// dead-lettered again.
    Intended,
    /// The broker acknowledged the dead letter: read again, the record is
    /// settled as it is.
    Written,
}

/// The entities a partition's records went to, bounded: at most as many as
/// could be resident, the least recently fed forgotten first (as the
/// manager passivates the least recently used beyond its bound). Handing an
/// entity over is what keeps the next owner from a conflict with a stale
/// actor here; one forgotten and still resident is caught by the revision
/// check.
pub(super) struct Served<K> {
    /// Each entity with when it was last fed.
    last_fed: HashMap<K, u64>,
    /// The same, by when: the least recently fed first.
    by_recency: BTreeMap<u64, K>,
    /// Counts every insert: a later one is more recent.
    clock: u64,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Served<K> {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            last_fed: HashMap::new(),
            by_recency: BTreeMap::new(),
            clock: 0,
            capacity: capacity.max(1),
        }
    }

    /// `key` was fed now.
    pub(super) fn insert(&mut self, key: &K) {
        self.clock += 1;
        if let Some(fed) = self.last_fed.get_mut(key) {
            self.by_recency.remove(fed);
            *fed = self.clock;
            self.by_recency.insert(self.clock, key.clone());
            return;
        }
        if self.last_fed.len() >= self.capacity {
            if let Some((_, least_recent)) = self.by_recency.pop_first() {
                self.last_fed.remove(&least_recent);
            }
        }
        self.last_fed.insert(key.clone(), self.clock);
        self.by_recency.insert(self.clock, key.clone());
    }
}

impl<K> IntoIterator for Served<K> {
    type Item = K;
    type IntoIter = std::collections::btree_map::IntoValues<u64, K>;

    /// The least recently fed first.
    fn into_iter(self) -> Self::IntoIter {
        self.by_recency.into_values()
    }
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

impl RawRecord {
    /// The bytes it holds.
    pub(super) fn len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// A record to settle: where it is, and the bytes its copy held.
#[derive(Clone)]
pub(super) struct Mark {
    pub(super) partition: Partition,
    pub(super) epoch: u64,
    pub(super) offset: i64,
    pub(super) bytes: usize,
}

impl<E: DurableEntity> Pending<E> {
    pub(super) fn mark(&self) -> Mark {
        Mark {
            partition: self.partition.clone(),
            epoch: self.epoch,
            offset: self.origin.offset,
            bytes: self.raw.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, the entity first seen was forgotten first, however recently
    /// it was fed since: the hot entity was the one not handed over.
    #[test]
    fn the_served_bound_forgets_the_least_recently_fed_entity() {
        let mut served = Served::new(2);
        served.insert(&"hot");
        served.insert(&"cold");
        served.insert(&"hot");
        served.insert(&"new");
        let kept: Vec<&str> = served.into_iter().collect();
        assert_eq!(kept, ["hot", "new"]);
    }

    #[test]
    fn an_entity_fed_again_is_remembered_once() {
        let mut served = Served::new(3);
        for key in ["a", "b", "a", "a", "b"] {
            served.insert(&key);
        }
        let kept: Vec<&str> = served.into_iter().collect();
        assert_eq!(kept, ["a", "b"]);
    }
}
