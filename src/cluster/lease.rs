//! Named leases: work that runs once per cluster (a change feed consumer,
//! a publisher, a periodic sweep) held by one node at a time.
//!
//! A named lease is a row (`cluster_leases`) its holder took by
//! compare-and-set; it is valid while its holder's node lease is, so it
//! costs no renewal of its own, and its epoch (moved on at every hand-over)
//! fences what the holder saves under it: a node that lost it (stalled past
//! its lease, say) saves nothing more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::StoreError;
use crate::store::{JoinedNode, StateStore};

/// A lease on work that runs once per cluster, held by at most one node
/// at a time: [`Cluster::lease`](super::Cluster::lease), or a change feed
/// followed in cluster mode ([`EntityFeed::resume`](crate::EntityFeed::resume)
/// takes one per consumer name).
///
/// ```no_run
/// # async fn sweep() {}
/// # async fn run(cluster: persist_durable::Cluster) -> Result<(), persist_durable::ClusterError> {
/// let nightly = cluster.lease("nightly-sweep");
/// loop {
///     nightly.until_held().await?;          // one node at a time gets past this
///     sweep().await;
///     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
/// }
/// # }
/// ```
pub struct NamedLease {
    name: String,
    store: Arc<dyn StateStore>,
    node: Arc<dyn JoinedNode>,
    /// The epoch this node holds it at; 0: not held.
    epoch: AtomicU64,
    /// When this node last tried to take it: once per membership round.
    tried: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for NamedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedLease")
            .field("name", &self.name)
            .field("node", &self.node.node())
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish()
    }
}

impl NamedLease {
    /// The lease `name` on `store`, whose process joined a cluster as `node`.
    pub(crate) fn new(store: Arc<dyn StateStore>, node: Arc<dyn JoinedNode>, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            store,
            node,
            epoch: AtomicU64::new(0),
            tried: std::sync::Mutex::new(None),
        }
    }

    /// The named lease of `store`'s cluster node, if its process joined one.
    pub(crate) fn of_store(store: Arc<dyn StateStore>, name: impl Into<String>) -> Option<Self> {
        let node = store.leases()?.joined()?;
        Some(Self::new(store, node, name))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the lease if no live node holds it (or this one already does);
    /// whether this node holds it now.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        if self.is_held() {
            return Ok(true);
        }
        let Some(leases) = self.store.leases() else {
            return Ok(false);
        };
        {
            let mut tried = self.tried.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if tried.is_some_and(|tried| tried.elapsed() < self.node.round()) {
                return Ok(false);
            }
            *tried = Some(std::time::Instant::now());
        }
        match leases.acquire_named(&self.name, self.node.node()).await? {
            Some(epoch) => {
                tracing::info!(lease = %self.name, node = %self.node.node(), epoch, "took a named lease");
                self.epoch.store(epoch, Ordering::Release);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Waits until this node holds the lease, trying every membership round.
    pub async fn until_held(&self) -> Result<(), StoreError> {
        while !self.acquire().await? {
            tokio::time::sleep(self.node.round() / 4).await;
        }
        Ok(())
    }

    /// Whether this node holds the lease, as far as it knows: taken, not
    /// found lost, and its node lease still to be trusted.
    pub fn is_held(&self) -> bool {
        self.epoch.load(Ordering::Acquire) != 0 && self.node.lease_is_valid()
    }

    /// The epoch held: the fencing token of what is saved under the lease.
    pub fn epoch(&self) -> Option<u64> {
        Some(self.epoch.load(Ordering::Acquire)).filter(|epoch| *epoch != 0)
    }

    /// This node no longer holds it (a fenced save found it moved on).
    pub(crate) fn lost(&self) {
        if self.epoch.swap(0, Ordering::AcqRel) != 0 {
            tracing::warn!(lease = %self.name, node = %self.node.node(), "a named lease moved to another node");
        }
    }

    /// Saves `consumer`'s position under the lease; `Ok(false)` (and the
    /// lease let go) if it has moved on, and nothing was saved.
    pub async fn save_offset(&self, consumer: &str, position: u64) -> Result<bool, StoreError> {
        let (Some(epoch), Some(leases)) = (self.epoch(), self.store.leases()) else {
            return Ok(false);
        };
        let saved = leases
            .save_offset_fenced(consumer, position, &self.name, self.node.node(), epoch)
            .await?;
        if !saved {
            self.lost();
        }
        Ok(saved)
    }

    /// Gives the lease up, for another node to take at once.
    pub async fn release(&self) -> Result<(), StoreError> {
        let epoch = self.epoch.swap(0, Ordering::AcqRel);
        match (epoch, self.store.leases()) {
            (0, _) | (_, None) => Ok(()),
            (epoch, Some(leases)) => leases.release_named(&self.name, self.node.node(), epoch).await,
        }
    }
}
