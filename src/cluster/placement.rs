//! Which live node should own each slice: rendezvous hashing with bounded
//! loads, sticky to the current owners.
//!
//! Every node computes the same placement from the same view (the live
//! nodes and the current owners, both read from the database), so no node
//! tells another what to do: each hands over what it should no longer own
//! and takes what it should, by compare-and-set on the ownership rows.
//!
//! - Balance: each node gets `⌊1024 / N⌋` slices or one more.
//! - Stickiness: a slice stays with its current owner while that owner is
//!   live and within its share, so a node joining takes about `1024 / N`
//!   slices from the others (each gives up only its excess over its new
//!   share), and a node leaving gives away only its own.
//! - Rendezvous: a slice to be placed goes to the node that ranks it highest
//!   (`hash(node, slice)`) among those with room.

use std::collections::HashMap;

use crate::entity::SLICES;

/// The owner each slice should have, by index, given the live nodes (never
/// empty) and each slice's current owner (any node, live or not).
pub(crate) fn place<'a>(live: &[&'a str], current: &[Option<&'a str>]) -> Vec<&'a str> {
    assert!(!live.is_empty(), "placing slices needs a live node");
    let slices = usize::from(SLICES);
    // Each node's share: the slices divided evenly, the remainder one each
    // to the nodes that hold the most now (so a placement at its shares is
    // kept as it is).
    let mut holding: HashMap<&str, usize> = live.iter().map(|node| (*node, 0)).collect();
    for owner in current.iter().flatten() {
        if let Some(count) = holding.get_mut(owner) {
            *count += 1;
        }
    }
    let mut by_holding: Vec<&'a str> = live.to_vec();
    by_holding.sort_unstable_by(|a, b| holding[b].cmp(&holding[a]).then(a.cmp(b)));
    let (base, extra) = (slices / live.len(), slices % live.len());
    let share: HashMap<&str, usize> = by_holding
        .iter()
        .enumerate()
        .map(|(i, node)| (*node, base + usize::from(i < extra)))
        .collect();
    let mut load: HashMap<&str, usize> = live.iter().map(|node| (*node, 0)).collect();
    let mut placed: Vec<Option<&'a str>> = vec![None; slices];
    // Current owners keep what they have, within their share: the slices
    // they rank highest first, so what they give up is what others rank higher.
    let mut kept: Vec<(u64, usize, &'a str)> = current
        .iter()
        .enumerate()
        .filter_map(|(slice, owner)| {
            let owner = (*owner).filter(|owner| load.contains_key(owner))?;
            Some((rank(owner, slice), slice, owner))
        })
        .collect();
    kept.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, slice, owner) in kept {
        let count = load.get_mut(owner).expect("live");
        if *count < share[owner] {
            *count += 1;
            placed[slice] = Some(owner);
        }
    }
    // The rest to the node that ranks each highest among those below their share.
    for (slice, place) in placed.iter_mut().enumerate().filter(|(_, place)| place.is_none()) {
        let node = live
            .iter()
            .filter(|node| load[**node] < share[**node])
            .max_by_key(|node| (rank(node, slice), **node))
            .expect("the shares add up to every slice");
        *load.get_mut(node).expect("live") += 1;
        *place = Some(node);
    }
    placed.into_iter().map(|node| node.expect("placed")).collect()
}

/// How highly `node` ranks `slice`: a stable hash of the two (FNV-1a, then
/// a final mix), the same on every node and every release.
fn rank(node: &str, slice: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain((slice as u32).to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64's finaliser: neighbouring slices rank independently.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn counts<'a>(placement: &[&'a str]) -> HashMap<&'a str, usize> {
        let mut counts = HashMap::new();
        for node in placement {
            *counts.entry(*node).or_insert(0) += 1;
        }
        counts
    }

    fn moved(before: &[&str], after: &[&str]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    /// The bounds: each node within ±10% of its share; a join or a
    /// leave moves at most ⌈1024/N⌉ + 5% of the slices.
    #[test]
    fn placement_is_balanced_and_a_join_or_leave_moves_little() {
        for n in 1..=16 {
            let names = nodes(n + 1);
            let live: Vec<&str> = names[..n].iter().map(String::as_str).collect();
            let start = place(&live, &[None; 1024]);
            let share = 1024.0 / n as f64;
            for (node, count) in counts(&start) {
                assert!(
                    (count as f64 - share).abs() <= share * 0.1 + 1.0,
                    "{n} nodes: {node} has {count}"
                );
            }
            let steady = place(&live, &start.iter().copied().map(Some).collect::<Vec<_>>());
            assert_eq!(moved(&start, &steady), 0, "{n} nodes: a placement is stable");

            // One joins.
            let joined: Vec<&str> = names.iter().map(String::as_str).collect();
            let current: Vec<Option<&str>> = start.iter().copied().map(Some).collect();
            let after_join = place(&joined, &current);
            let bound = 1024usize.div_ceil(n + 1) + 1024 * 5 / 100;
            assert!(
                moved(&start, &after_join) <= bound,
                "{n} + 1: moved {}",
                moved(&start, &after_join)
            );
            let share = 1024.0 / (n + 1) as f64;
            for (node, count) in counts(&after_join) {
                assert!(
                    (count as f64 - share).abs() <= share * 0.1 + 1.0,
                    "{n} + 1: {node} has {count}"
                );
            }

            // One leaves (the first): only its slices move.
            if n > 1 {
                let left: Vec<&str> = live[1..].to_vec();
                let after_leave = place(&left, &current);
                let bound = 1024usize.div_ceil(n) + 1024 * 5 / 100;
                assert!(
                    moved(&start, &after_leave) <= bound,
                    "{n} - 1: moved {}",
                    moved(&start, &after_leave)
                );
                let theirs = start.iter().filter(|owner| **owner == live[0]).count();
                assert_eq!(
                    moved(&start, &after_leave),
                    theirs,
                    "{n} - 1: only the leaver's slices move"
                );
            }
        }
    }

    #[test]
    fn the_owners_of_a_dead_node_are_ignored() {
        let live = ["a", "b"];
        let current: Vec<Option<&str>> = (0..1024).map(|i| Some(if i % 2 == 0 { "dead" } else { "a" })).collect();
        let placement = place(&live, &current);
        assert!(placement.iter().all(|node| live.contains(node)));
        assert_eq!(counts(&placement)["a"], 512, "a keeps what it had, within its share");
    }
}
