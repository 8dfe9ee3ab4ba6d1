//! Which shard of a manager owns an entity: its key's hash, fixed for the
//! life of the process, so the caller's thread, the manager and the shards
//! all agree without asking one another.

use std::hash::{DefaultHasher, Hash, Hasher};

/// A shard's place among its manager's shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    index: usize,
    count: usize,
}

impl Placement {
    /// Shard `index` of `count` (at least one).
    pub(crate) fn new(index: usize, count: usize) -> Self {
        debug_assert!(index < count.max(1));
        Self {
            index,
            count: count.max(1),
        }
    }

    /// Whether `key` is this shard's.
    pub(crate) fn owns<K: Hash>(&self, key: &K) -> bool {
        shard_of(key, self.count) == self.index
    }

    /// The first shard, which takes what belongs to no key.
    pub(crate) fn is_first(&self) -> bool {
        self.index == 0
    }
}

/// The shard of `count` that owns `key`.
pub(crate) fn shard_of<K: Hash>(key: &K, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    // Fixed keys: every thread computes the same shard.
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_exactly_one_owner_and_keys_spread_over_all_shards() {
        let count = 4;
        let mut per_shard = [0usize; 4];
        for i in 0..4_000 {
            let key = format!("mall{:03}-user{i:07}", i % 100);
            let owners: Vec<_> = (0..count).filter(|&s| Placement::new(s, count).owns(&key)).collect();
            assert_eq!(owners.len(), 1, "{key} owned by {owners:?}");
            per_shard[owners[0]] += 1;
        }
        assert!(per_shard.iter().all(|&n| (800..=1_200).contains(&n)), "{per_shard:?}");
    }
}
