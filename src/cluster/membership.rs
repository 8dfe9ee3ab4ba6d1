//! The membership task: on a thread of its own, every renewal period, it
//! renews this node's lease (one write), reads the cluster (the nodes and
//! the slices' owners), hands over the slices the placement gives another
//! node, takes those it gives this node that no live node holds, and adopts
//! those handed to it. Nothing here runs on the actors' threads, so a busy
//! node's lease is renewed on time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::ownership::Owner;
use super::placement::place;
use super::{ClusterConfig, Shared};
use crate::entity::Slice;
use crate::error::StoreError;
use crate::store::{ClusterView, Leases};

/// What the task is asked from outside.
pub(super) enum Request {
    /// Leave gracefully: hand every slice over, deregister, stop.
    Leave(oneshot::Sender<Result<(), StoreError>>),
}

/// Runs the membership of this node until it leaves.
pub(super) async fn run(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let every = shared.config.renew_every;
    loop {
        let leave = tokio::select! {
            request = requests.recv() => request,
            () = tokio::time::sleep(every) => None,
        };
        if let Some(Request::Leave(reply)) = leave {
            let left = leave_gracefully(&shared).await;
            let _ = reply.send(left);
            return;
        }
        if let Err(error) = tick(&shared, false).await {
            warn!(node = %shared.ownership.node(), %error, "a membership round failed; the next one goes on");
        }
    }
}

/// One round: renew, read, hand over, take, adopt.
pub(super) async fn tick(shared: &Shared, leaving: bool) -> Result<(), StoreError> {
    let leases = shared.leases();
    let config = &shared.config;
    let node = shared.ownership.node().clone();
    let sent = Instant::now();
    if leases.renew(&node, config.lease).await? {
        shared.ownership.renewed(sent, config.trust());
        shared.counters.renewals.increment();
        metrics::counter!("persist_durable_cluster_renewals_total").increment(1);
    } else {
        // The lease expired (a stall, a partition from the database): every
        // slice may have moved on. Drop them all, and join again: the
        // epochs move on, so a write this process still had in flight
        // under the old ones commits nothing.
        warn!(%node, "this node's lease expired; its slices are dropped and it joins again");
        shared.ownership.distrust();
        let lost: Vec<Slice> = shared.ownership.owned().into_iter().map(|(slice, _)| slice).collect();
        for slice in &lost {
            shared.ownership.set(*slice, 0);
        }
        shared.counters.leases_lost.increment();
        metrics::counter!("persist_durable_cluster_leases_lost_total").increment(1);
        shared.lost(lost);
        let sent = Instant::now();
        leases.join(&node, &config.address, config.lease).await?;
        shared.ownership.renewed(sent, config.trust());
    }
    let view = leases.view().await?;
    settle(shared, &node, &view, leaving).await
}

/// Hands over, takes and adopts slices as the placement of `view` says.
async fn settle(shared: &Shared, node: &Arc<str>, view: &ClusterView, leaving: bool) -> Result<(), StoreError> {
    let leases = shared.leases();
    let alive: HashSet<&str> = view.nodes.iter().filter(|n| n.alive).map(|n| n.node.as_str()).collect();
    let mut placing: Vec<&str> = view
        .nodes
        .iter()
        .filter(|n| n.alive && !n.leaving)
        .map(|n| n.node.as_str())
        .filter(|n| !(leaving && *n == &**node))
        .collect();
    placing.sort_unstable();
    shared.ownership.set_owners(owners(view));
    if placing.is_empty() {
        // No node to give anything to: this one keeps what it has.
        return Ok(());
    }
    let current: Vec<Option<&str>> = view.slices.iter().map(|(owner, _)| owner.as_deref()).collect();
    let placement = place(&placing, &current);
    let mut handing = Vec::new();
    let mut lost = Vec::new();
    let mut wanted = Vec::new();
    for slice in Slice::all() {
        let index = usize::from(slice.index());
        let (owner, epoch) = &view.slices[index];
        let mine = owner.as_deref() == Some(&**node);
        let held = shared.ownership.epoch(slice);
        match (mine, placement[index] == &**node) {
            (true, true) => {
                if held != *epoch {
                    // Handed to this node, or its epoch moved on at a new join.
                    debug!(%slice, epoch, "slice adopted");
                    shared.ownership.set(slice, *epoch);
                    shared.counters.taken.increment();
                }
            }
            (true, false) => {
                // Placed on another node: stop taking its commands, then
                // hand it over (which waits for this node's writes in flight).
                shared.ownership.set(slice, 0);
                lost.push(slice);
                handing.push((slice, *epoch, Some(placement[index].to_owned())));
            }
            (false, placed_here) => {
                if held != 0 {
                    // Taken by another node while this one was not looking.
                    shared.ownership.set(slice, 0);
                    lost.push(slice);
                }
                let owner_alive = owner.as_deref().is_some_and(|owner| alive.contains(owner));
                if placed_here && !owner_alive {
                    wanted.push(slice);
                }
            }
        }
    }
    if !handing.is_empty() {
        // One statement for them all: hundreds of them one by one could
        // outlast the lease.
        let moved = leases.transfer(node, &handing).await?;
        debug!(%node, slices = moved.len(), "slices handed over");
        shared.counters.handed_over.add(moved.len() as u64);
        metrics::counter!("persist_durable_cluster_handovers_total", "direction" => "out")
            .increment(moved.len() as u64);
    }
    if !wanted.is_empty() {
        for (slice, epoch) in leases.acquire(node, &wanted).await? {
            shared.ownership.set(slice, epoch);
            shared.counters.taken.increment();
            metrics::counter!("persist_durable_cluster_handovers_total", "direction" => "in").increment(1);
        }
    }
    if !lost.is_empty() {
        info!(%node, slices = lost.len(), "slices moved to other nodes; their entities passivate here");
        shared.lost(lost);
    }
    let owned = shared.ownership.owned().len();
    shared.counters.set_owned(owned);
    Ok(())
}

/// Every slice's owner with its address, from `view`.
fn owners(view: &ClusterView) -> Vec<Option<Owner>> {
    let addresses: std::collections::HashMap<&str, Arc<str>> = view
        .nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| (n.node.as_str(), Arc::from(n.address.as_str())))
        .collect();
    view.slices
        .iter()
        .map(|(owner, _)| {
            let owner = owner.as_deref()?;
            Some(Owner {
                node: owner.into(),
                address: addresses.get(owner)?.clone(),
            })
        })
        .collect()
}

/// Leaves the cluster: marked leaving, every slice handed to the node the
/// placement gives it (at once, not a renewal later), then deregistered.
async fn leave_gracefully(shared: &Shared) -> Result<(), StoreError> {
    let leases = shared.leases();
    let node = shared.ownership.node().clone();
    let started = Instant::now();
    leases.leave(&node).await?;
    tick(shared, true).await?;
    let kept = shared.ownership.owned();
    // Alone in the cluster: nobody to hand to; the slices wait for the next
    // node to join, which takes them at once (their owner is gone).
    for (slice, _) in &kept {
        shared.ownership.set(*slice, 0);
    }
    shared.lost(kept.into_iter().map(|(slice, _)| slice).collect());
    shared.ownership.distrust();
    leases.deregister(&node).await?;
    info!(%node, took = ?started.elapsed(), "left the cluster");
    Ok(())
}

impl ClusterConfig {
    /// How long a confirmed renewal is trusted: the lease less the margin.
    pub(super) fn trust(&self) -> std::time::Duration {
        self.lease.saturating_sub(self.margin)
    }
}

impl Shared {
    pub(super) fn leases(&self) -> &dyn Leases {
        self.store.leases().expect("checked when the node joined")
    }
}
