//! Which shard of a manager owns an entity: its key's hash under one random
//! seed per manager, so the caller's thread, the manager and the shards all
//! agree without asking one another. A fast hash (foldhash) suffices: keys
//! chosen to crowd one shard could only unbalance the threads, not slow a
//! lookup, and without the seed they cannot be chosen offline.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::{FixedState, RandomState};

/// How a manager spreads keys over its shards.
#[derive(Debug, Clone)]
pub(crate) struct Spread {
    shards: usize,
    hasher: FixedState,
}

impl Spread {
    /// Over `shards` shards (at least one), with a seed of its own.
    pub(crate) fn new(shards: usize) -> Self {
        let seed = RandomState::default().hash_one(shards);
        Self {
            shards: shards.max(1),
            hasher: FixedState::with_seed(seed),
        }
    }

    /// The shard that owns `key`.
    pub(crate) fn shard_of<K: Hash>(&self, key: &K) -> usize {
        if self.shards == 1 {
            return 0;
        }
        (self.hasher.hash_one(key) % self.shards as u64) as usize
    }

    /// How many shards.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }
}

/// A shard's place among its manager's shards.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    index: usize,
    spread: Spread,
}

impl Placement {
    /// Shard `index` of `spread`.
    pub(crate) fn new(index: usize, spread: Spread) -> Self {
        debug_assert!(index < spread.shards());
        Self { index, spread }
    }

    /// Whether `key` is this shard's.
    pub(crate) fn owns<K: Hash>(&self, key: &K) -> bool {
        self.spread.shard_of(key) == self.index
    }

    /// This shard's part of a bound on all shards together, keys being
    /// spread evenly: an equal share, rounded up.
    pub(crate) fn share_of(&self, bound: usize) -> usize {
        bound.div_ceil(self.spread.shards())
    }

    /// The first shard, which takes what belongs to no key.
    pub(crate) fn is_first(&self) -> bool {
        self.index == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_exactly_one_owner_and_keys_spread_over_all_shards() {
        let spread = Spread::new(4);
        let mut per_shard = [0usize; 4];
        for i in 0..4_000 {
            let key = format!("mall{:03}-user{i:07}", i % 100);
            let owners: Vec<_> = (0..4)
                .filter(|&s| Placement::new(s, spread.clone()).owns(&key))
                .collect();
            assert_eq!(owners.len(), 1, "{key} owned by {owners:?}");
            assert_eq!(owners[0], spread.shard_of(&key));
            per_shard[owners[0]] += 1;
        }
        assert!(per_shard.iter().all(|&n| (800..=1_200).contains(&n)), "{per_shard:?}");
    }

    #[test]
    fn one_shard_owns_everything() {
        let spread = Spread::new(1);
        assert!(Placement::new(0, spread).owns(&"any key"));
    }
}
