//! What this node owns, as the actors and the routing read it on every
//! command: lock-free, written only by the membership task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::entity::{Slice, SLICES};
use crate::store::Fence;

/// This node's slices and lease, and every slice's owner as last read.
pub(crate) struct Ownership {
    node: Arc<str>,
    /// Per slice, the epoch this node owns it at; 0: not this node's.
    epochs: Box<[AtomicU64]>,
    /// Until when (nanoseconds after `base`) this node may trust its lease:
    /// the last confirmed renewal, from when it was sent, plus the lease's
    /// length less the margin. 0: not until it renews.
    valid_until: AtomicU64,
    base: Instant,
    /// Every slice's owner as last read, by index, with its address.
    owners: RwLock<Vec<Option<Owner>>>,
    /// Counts the changes of this node's slices, each told to `changed`'s
    /// waiters: the timer schedulers read their new slices' timers.
    version: AtomicU64,
    changed: tokio::sync::Notify,
}

/// A slice's owner, for forwarding its commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) node: Arc<str>,
    pub(crate) address: Arc<str>,
}

impl Ownership {
    pub(crate) fn new(node: Arc<str>) -> Self {
        Self {
            node,
            epochs: (0..SLICES).map(|_| AtomicU64::new(0)).collect(),
            valid_until: AtomicU64::new(0),
            base: Instant::now(),
            owners: RwLock::new(vec![None; usize::from(SLICES)]),
            version: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// This node's name.
    pub(crate) fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// The fence a write for `slice` carries: `None` when this node does not own it.
    pub(crate) fn fence(&self, slice: Slice) -> Option<Fence> {
        let epoch = self.epoch(slice);
        (epoch != 0).then(|| Fence {
            node: self.node.clone(),
            epoch,
        })
    }

    /// The epoch this node owns `slice` at; 0 if it does not.
    pub(crate) fn epoch(&self, slice: Slice) -> u64 {
        self.epochs[usize::from(slice.index())].load(Ordering::Acquire)
    }

    /// Whether this node owns `slice`.
    pub(crate) fn owns(&self, slice: Slice) -> bool {
        self.epoch(slice) != 0
    }

    /// Whether this node owns `slice` and its lease is valid by its own
    /// monotonic clock: then no other node can write the slice's entities,
    /// and what this node holds in memory is what the store holds.
    pub(crate) fn answers_from_memory(&self, slice: Slice) -> bool {
        self.owns(slice) && self.lease_is_valid()
    }

    /// Whether the lease, as last confirmed, is still to be trusted.
    pub(crate) fn lease_is_valid(&self) -> bool {
        let until = self.valid_until.load(Ordering::Acquire);
        until != 0 && self.nanos(Instant::now()) < until
    }

    /// A renewal sent at `sent` was confirmed: the lease may be trusted for
    /// `trust` (its length less the margin) from then.
    pub(crate) fn renewed(&self, sent: Instant, trust: Duration) {
        let until = self.nanos(sent + trust).max(1);
        self.valid_until.fetch_max(until, Ordering::AcqRel);
    }

    /// The lease is not to be trusted until renewed again.
    pub(crate) fn distrust(&self) {
        self.valid_until.store(0, Ordering::Release);
    }

    /// This node owns `slice` at `epoch` (0: no longer).
    pub(crate) fn set(&self, slice: Slice, epoch: u64) {
        let before = self.epochs[usize::from(slice.index())].swap(epoch, Ordering::AcqRel);
        if before != epoch {
            self.version.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_waiters();
        }
    }

    /// How many times this node's slices changed.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Waits for the next change of this node's slices.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Every slice this node owns, with its epoch.
    pub(crate) fn owned(&self) -> Vec<(Slice, u64)> {
        Slice::all()
            .map(|slice| (slice, self.epoch(slice)))
            .filter(|(_, epoch)| *epoch != 0)
            .collect()
    }

    /// `slice`'s owner as last read (another node's, or this one's).
    pub(crate) fn owner(&self, slice: Slice) -> Option<Owner> {
        let owners = self.owners.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        owners[usize::from(slice.index())].clone()
    }

    /// Every slice's owner, as just read.
    pub(crate) fn set_owners(&self, owners: Vec<Option<Owner>>) {
        *self.owners.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = owners;
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_trusted_from_its_renewal_for_its_length_less_the_margin() {
        let ownership = Ownership::new("a".into());
        assert!(!ownership.lease_is_valid(), "not before the first renewal");
        ownership.renewed(Instant::now(), Duration::from_secs(60));
        assert!(ownership.lease_is_valid());
        ownership.distrust();
        assert!(!ownership.lease_is_valid());
        ownership.renewed(Instant::now() - Duration::from_secs(2), Duration::from_secs(1));
        assert!(!ownership.lease_is_valid(), "counted from when the renewal was sent");
    }

    #[test]
    fn a_slice_is_answered_from_memory_only_while_owned_under_a_valid_lease() {
        let ownership = Ownership::new("a".into());
        let slice = Slice::new(7).unwrap();
        ownership.set(slice, 3);
        assert!(!ownership.answers_from_memory(slice));
        ownership.renewed(Instant::now(), Duration::from_secs(60));
        assert!(ownership.answers_from_memory(slice));
        assert_eq!(ownership.fence(slice).map(|fence| fence.epoch), Some(3));
        ownership.set(slice, 0);
        assert!(!ownership.answers_from_memory(slice));
        assert_eq!(ownership.fence(slice), None);
    }
}
