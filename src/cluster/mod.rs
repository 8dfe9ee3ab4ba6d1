//! Cluster mode: one owner per entity, decided in the PostgreSQL database
//! the entities live in, with no membership protocol of the library's own.
//!
//! - Entities map to 1,024 [`Slice`]s by Pekko's hash of their persistence
//!   id, stored in every row.
//! - Each node registers (its name and the address other nodes forward to)
//!   and renews one lease row every [`ClusterConfig::renew_every`], whatever
//!   it owns; every expiry is decided by the database's clock.
//! - Slices are placed on the live nodes in exact shares (⌊1024/N⌋ or
//!   ⌈1024/N⌉ each; a join or a leave moves only what it must, the rest
//!   stays where it is, new homes by rendezvous hashing), and change hands
//!   only by compare-and-set on their ownership row, whose epoch is the
//!   fencing token; a round's hand-overs are one statement.
//! - Every write for a slice (group commit, delete, purge, a timer's fire,
//!   a singleton's position) commits only if its node still owns the slice at the epoch it
//!   carries, with its lease unexpired, checked in the same statement, which
//!   holds the ownership row `FOR SHARE`: a transfer waits for the old
//!   owner's writes in flight, and a node stalled past its lease commits
//!   nothing after it.
//! - The owner answers from memory, with no check, while its lease is valid
//!   by its own monotonic clock since its last confirmed renewal, less
//!   [`ClusterConfig::margin`]; past that, as in the default mode, it checks
//!   the stored revision before answering.
//! - A command for an entity owned elsewhere is forwarded to its owner, or
//!   answered [`CommandError::NotOwner`](crate::CommandError::NotOwner).
//!
//! SQLite serves one node: [`Cluster::join`] refuses it with
//! [`ClusterError::Unsupported`].

mod lease;
mod membership;
mod ownership;
mod placement;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use lease::NamedLease;
pub(crate) use ownership::{Owner, Ownership};

use crate::entity::Slice;
use crate::error::StoreError;
use crate::store::SharedStore;

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// This node's name, unique among the processes on the database: two
    /// processes under one name would fence each other off.
    pub node: String,
    /// Where the other nodes forward this node's slices' commands: the base
    /// URL of its actix-web server (`http://10.0.0.5:8080`).
    pub address: String,
    /// How long a renewal keeps the lease: 3 s by default. A node killed is
    /// replaced at most this plus one renewal period later.
    pub lease: Duration,
    /// How often the lease is renewed and the cluster read: every second by default.
    pub renew_every: Duration,
    /// How much sooner than the lease's end the node stops trusting it by
    /// its own clock (clock rates differ, and a renewal's answer takes time
    /// to arrive): 500 ms by default.
    pub margin: Duration,
}

impl ClusterConfig {
    /// `node`, reachable at `address`, with the default timings.
    pub fn new(node: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            address: address.into(),
            lease: Duration::from_secs(3),
            renew_every: Duration::from_secs(1),
            margin: Duration::from_millis(500),
        }
    }

    /// Sets [`lease`](Self::lease).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`renew_every`](Self::renew_every).
    pub fn with_renew_every(mut self, every: Duration) -> Self {
        self.renew_every = every;
        self
    }

    /// Sets [`margin`](Self::margin).
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let invalid = |why: &str| Err(ClusterError::InvalidConfig(why.to_owned()));
        if self.node.is_empty() {
            return invalid("the node's name is empty");
        }
        if self.renew_every.is_zero() || self.margin >= self.lease {
            return invalid("the renewal period must be positive and the margin shorter than the lease");
        }
        if self.renew_every * 2 > self.lease.saturating_sub(self.margin) {
            return invalid("the lease, less the margin, must last at least two renewal periods");
        }
        Ok(())
    }
}

/// Why a node could not join or leave a cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The store's database cannot hold cluster mode's leases (SQLite, the
    /// memory store): cluster mode needs PostgreSQL.
    #[error("cluster mode needs a store whose database holds its leases: PostgreSQL")]
    Unsupported,
    /// A setting of [`ClusterConfig`] cannot work.
    #[error("invalid cluster configuration: {0}")]
    InvalidConfig(String),
    /// The database failed.
    #[error("the cluster's database failed")]
    Store(#[from] StoreError),
    /// The node has already left.
    #[error("the node has left the cluster")]
    Left,
}

/// A node's counters, since it joined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Slices this node owns now.
    pub slices_owned: u64,
    /// Lease renewals confirmed.
    pub renewals: u64,
    /// Times the lease was found expired at renewal (a stall): every slice dropped.
    pub leases_lost: u64,
    /// Slices this node handed to another.
    pub slices_handed_over: u64,
    /// Slices this node took or was handed.
    pub slices_taken: u64,
    /// Commands forwarded to their entity's owner.
    pub commands_forwarded: u64,
    /// Writes refused by their fence (the slice had moved on).
    pub writes_fenced: u64,
}

/// This node in a cluster of nodes sharing one PostgreSQL database: give it
/// to each manager ([`Config::with_cluster`](crate::Config::with_cluster)),
/// and [`leave`](Self::leave) before the process exits. Cloning is cheap.
///
/// ```no_run
/// use persist_durable::{Cluster, ClusterConfig, Config, UserStates};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = persist_durable::open("postgres://postgres@127.0.0.1/app").await?;
/// let cluster = Cluster::join(store.clone(), ClusterConfig::new("node-a", "http://10.0.0.5:8080")).await?;
/// let users = UserStates::start(store, Config::default().with_cluster(cluster.clone()));
/// // ... serve; then:
/// cluster.leave().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<membership::Request>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.config.node)
            .finish_non_exhaustive()
    }
}

/// Told of the slices a node no longer owns.
type LostSlices = Box<dyn Fn(&[Slice]) + Send + Sync>;

/// What the membership task and the handles share.
struct Shared {
    config: ClusterConfig,
    store: SharedStore,
    ownership: Arc<Ownership>,
    counters: Counters,
    /// Told of the slices this node no longer owns: the managers, which
    /// passivate their entities.
    subscribers: Mutex<Vec<LostSlices>>,
}

impl Shared {
    /// Tells the managers this node no longer owns `slices`.
    fn lost(&self, slices: Vec<Slice>) {
        if slices.is_empty() {
            return;
        }
        let subscribers = self.subscribers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for subscriber in subscribers.iter() {
            subscriber(&slices);
        }
    }
}

impl Cluster {
    /// Registers this node on `store`'s database and takes its share of the
    /// slices, then keeps its lease and its share on a thread of its own.
    /// Returns once the first round is done: the node owns its slices.
    pub async fn join(store: SharedStore, config: ClusterConfig) -> Result<Cluster, ClusterError> {
        config.validate()?;
        store
            .leases()
            .ok_or(ClusterError::Unsupported)?
            .join(&config.node, &config.address, config.lease)
            .await?;
        let shared = Arc::new(Shared {
            ownership: Arc::new(Ownership::new(config.node.as_str().into())),
            config,
            store,
            counters: Counters::default(),
            subscribers: Mutex::new(Vec::new()),
        });
        membership::tick(&shared, false).await?;
        // Work that runs once per cluster, started from the store (a change
        // feed's consumer), finds this node through it.
        shared.leases().set_joined(Arc::new(Joined(shared.clone())));
        let (requests, received) = mpsc::unbounded_channel();
        let task = shared.clone();
        std::thread::Builder::new()
            .name(format!("persist-durable-cluster-{}", shared.config.node))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match runtime {
                    Ok(runtime) => runtime.block_on(membership::run(task, received)),
                    Err(error) => tracing::error!(%error, "the cluster's membership task could not start"),
                }
            })
            .map_err(|error| ClusterError::Store(StoreError::unavailable(error)))?;
        Ok(Cluster { shared, requests })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.shared.config.node
    }

    /// Whether this node owns `slice` now.
    pub fn owns(&self, slice: Slice) -> bool {
        self.shared.ownership.owns(slice)
    }

    /// The node's counters.
    pub fn stats(&self) -> ClusterStats {
        self.shared.counters.snapshot()
    }

    /// Leaves gracefully: every slice is handed to the node the placement
    /// now gives it (at once: it is taken within that node's next round),
    /// this node's entities passivate, and it deregisters. Commands for its
    /// entities then go to their new owners.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let (reply, left) = oneshot::channel();
        self.requests
            .send(membership::Request::Leave(reply))
            .map_err(|_| ClusterError::Left)?;
        Ok(left.await.map_err(|_| ClusterError::Left)??)
    }

    /// The named lease `name`: work that runs once per cluster, on the
    /// node that holds it.
    pub fn lease(&self, name: impl Into<String>) -> NamedLease {
        NamedLease::new(self.shared.store.clone(), Arc::new(Joined(self.shared.clone())), name)
    }

    /// How often the membership task runs.
    pub(crate) fn renew_every(&self) -> Duration {
        self.shared.config.renew_every
    }

    /// How long a node that died may still hold its slices: its lease, a
    /// renewal period of the node that takes them, and one of this node's
    /// to learn of it.
    pub(crate) fn failover_within(&self) -> Duration {
        self.shared.config.lease + 2 * self.shared.config.renew_every
    }

    /// What this node owns, for the managers and the routing.
    pub(crate) fn ownership(&self) -> &Arc<Ownership> {
        &self.shared.ownership
    }

    /// Calls `lost` with the slices this node stops owning, from the
    /// membership thread.
    pub(crate) fn on_lost(&self, lost: impl Fn(&[Slice]) + Send + Sync + 'static) {
        let mut subscribers = self
            .shared
            .subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        subscribers.push(Box::new(lost));
    }

    /// Counts a command forwarded to another node.
    pub(crate) fn count_forwarded(&self) {
        self.shared.counters.forwarded.increment();
        metrics::counter!("persist_durable_cluster_forwarded_total").increment(1);
    }

    /// Counts a write its fence refused.
    pub(crate) fn count_fenced(&self) {
        self.shared.counters.fenced.increment();
        metrics::counter!("persist_durable_cluster_fenced_total").increment(1);
    }
}

/// A node's counters, as atomics.
#[derive(Default)]
struct Counters {
    owned: Counter,
    renewals: Counter,
    leases_lost: Counter,
    handed_over: Counter,
    taken: Counter,
    forwarded: Counter,
    fenced: Counter,
}

#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn increment(&self) {
        self.add(1);
    }

    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Counters {
    fn set_owned(&self, owned: usize) {
        self.owned.0.store(owned as u64, Ordering::Relaxed);
        metrics::gauge!("persist_durable_cluster_slices_owned").set(owned as f64);
    }

    fn snapshot(&self) -> ClusterStats {
        ClusterStats {
            slices_owned: self.owned.get(),
            renewals: self.renewals.get(),
            leases_lost: self.leases_lost.get(),
            slices_handed_over: self.handed_over.get(),
            slices_taken: self.taken.get(),
            commands_forwarded: self.forwarded.get(),
            writes_fenced: self.fenced.get(),
        }
    }
}

/// This node, as a store's joined node.
struct Joined(Arc<Shared>);

impl crate::store::JoinedNode for Joined {
    fn node(&self) -> &str {
        &self.0.config.node
    }

    fn lease_is_valid(&self) -> bool {
        self.0.ownership.lease_is_valid()
    }

    fn round(&self) -> Duration {
        self.0.config.renew_every
    }
}
