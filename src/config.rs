use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};

/// How the entity actors and their manager behave, for every entity type.
/// Defaults follow the original design: an entity idle for 30 minutes is
/// passivated, checked every 5 minutes. What an entity's own transition is
/// tuned by (for users, how many recently viewed products are kept) is its
/// settings, given at start: [`Entities::start_with`](crate::Entities::start_with).
///
/// ```
/// use std::time::Duration;
/// let config = persist_durable::Config::default().with_idle_timeout(Duration::from_secs(15 * 60));
/// assert_eq!(config.idle_check_interval, Duration::from_secs(5 * 60));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// How long an entity may go without a command before its actor is passivated.
    pub idle_timeout: Duration,
    /// How often an actor checks whether it has been idle long enough.
    pub idle_check_interval: Duration,
    /// Where recorded times come from.
    pub clock: Arc<dyn Clock>,
    /// How many applied event ids each entity remembers, to recognise redelivery.
    pub event_id_memory: usize,
    /// Whether this process is the only one writing these entities (one
    /// service on its embedded SQLite, say): then an answer that needs no
    /// write (a read, a redelivery, a no-op) comes from the state in memory.
    /// Off by default: each such answer is first checked against the stored
    /// revision (batched like restores), so that several nodes on one
    /// database never answer from a state older than the store holds. See
    /// [`with_exclusive_writer`](Self::with_exclusive_writer).
    pub exclusive_writer: bool,
    /// How often a write that lost a revision conflict is reloaded and
    /// applied again before its commands fail with
    /// [`CommandError::Conflict`](crate::CommandError::Conflict).
    pub conflict_retries: u32,
    /// Commands queued for one entity at most; beyond it, commands are refused
    /// with [`CommandError::Overloaded`](crate::CommandError::Overloaded).
    pub max_queued_per_entity: usize,
    /// Commands in flight through the manager at most; beyond it, refused
    /// with [`CommandError::Overloaded`](crate::CommandError::Overloaded).
    pub max_commands_in_flight: usize,
    /// Entities with an actor at most, over all shards; beyond it, the shard
    /// whose activation crossed it passivates its least recently used ones
    /// (Akka's default for a shard region is 100,000).
    pub max_resident: usize,
    /// Shards of the manager, each on an arbiter (thread) of its own with the
    /// actors of the entities whose keys hash to it; default: one per core.
    /// With 0, one shard runs on the manager's own arbiter, which tests that
    /// pause tokio's clock need: paused time is per runtime, and each arbiter
    /// has its own.
    pub arbiters: usize,
    /// How long an entity's row may go unwritten before the manager purges
    /// it (by the row's `db_timestamp`, against this process's wall clock);
    /// `None`, the default: never. Resident entities are never purged.
    pub retention: Option<Duration>,
    /// With [`retention`](Self::retention) on: how often the manager purges.
    pub retention_check_interval: Duration,
    /// Rows a purge removes per statement at most.
    pub retention_chunk_size: usize,
    /// How long the change feed keeps its changes, trimmed by this manager
    /// every [`FeedRetention::every`](crate::FeedRetention::every); `None`, the default: kept until
    /// trimmed otherwise ([`ChangeLogExt::trim_feed`](crate::ChangeLogExt::trim_feed)).
    /// The feed holds every entity type: one manager with it suffices.
    pub feed_retention: Option<crate::FeedRetention>,
    /// Cluster mode: this node's membership, which decides which entities
    /// this manager serves (see [`Cluster`](crate::Cluster)); `None`, the
    /// default: every node serves every entity, checked by revision.
    pub cluster: Option<crate::Cluster>,
    /// In cluster mode, whether a command for an entity another node owns is
    /// forwarded to that node (the default, with the HTTP forwarder of
    /// [`http::forwarding`](crate::http)) or answered
    /// [`CommandError::NotOwner`](crate::CommandError::NotOwner) with the
    /// owner's address, for the application to redirect its client.
    pub forward: bool,
    /// How this manager fires its entities' durable timers (see
    /// [`timers`](crate::timers)); `None`: this node fires none (the timers
    /// its entities set are stored all the same, and fired by the nodes
    /// that do).
    pub timers: Option<crate::TimerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            idle_check_interval: Duration::from_secs(5 * 60),
            clock: Arc::new(SystemClock),
            event_id_memory: 32,
            exclusive_writer: false,
            conflict_retries: 3,
            max_queued_per_entity: 1_000,
            max_commands_in_flight: 100_000,
            max_resident: 100_000,
            arbiters: std::thread::available_parallelism().map_or(1, usize::from),
            retention: None,
            retention_check_interval: Duration::from_secs(60 * 60),
            retention_chunk_size: 500,
            feed_retention: None,
            cluster: None,
            forward: true,
            timers: Some(crate::TimerConfig::default()),
        }
    }
}

impl Config {
    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`idle_check_interval`](Self::idle_check_interval); zero is raised to one millisecond.
    pub fn with_idle_check_interval(mut self, interval: Duration) -> Self {
        self.idle_check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets [`clock`](Self::clock).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Sets [`event_id_memory`](Self::event_id_memory).
    pub fn with_event_id_memory(mut self, count: usize) -> Self {
        self.event_id_memory = count;
        self
    }

    /// Declares this process the only writer of its entities: reads and
    /// no-ops are answered from memory, without a round trip to the store.
    /// The fast single-node choice. If a second process writes the same
    /// entities anyway, nothing is overwritten (writes stay revision-checked),
    /// but this one may answer reads and no-ops from a state older than the
    /// store holds, and keep serving a deleted entity's data until its next
    /// write or passivation.
    pub fn with_exclusive_writer(mut self) -> Self {
        self.exclusive_writer = true;
        self
    }

    /// Sets [`conflict_retries`](Self::conflict_retries); 0 reports every conflict.
    pub fn with_conflict_retries(mut self, retries: u32) -> Self {
        self.conflict_retries = retries;
        self
    }

    /// Sets [`max_queued_per_entity`](Self::max_queued_per_entity); at least 1.
    pub fn with_max_queued_per_entity(mut self, limit: usize) -> Self {
        self.max_queued_per_entity = limit.max(1);
        self
    }

    /// The former name of [`with_max_queued_per_entity`](Self::with_max_queued_per_entity).
    #[deprecated(note = "use with_max_queued_per_entity: the limit is per entity of any type")]
    pub fn with_max_queued_per_user(self, limit: usize) -> Self {
        self.with_max_queued_per_entity(limit)
    }

    /// Sets [`max_commands_in_flight`](Self::max_commands_in_flight); at least 1.
    pub fn with_max_commands_in_flight(mut self, limit: usize) -> Self {
        self.max_commands_in_flight = limit.max(1);
        self
    }

    /// Sets [`max_resident`](Self::max_resident); at least 1.
    pub fn with_max_resident(mut self, limit: usize) -> Self {
        self.max_resident = limit.max(1);
        self
    }

    /// The former name of [`with_max_resident`](Self::with_max_resident).
    #[deprecated(note = "use with_max_resident: the limit counts entities of any type")]
    pub fn with_max_resident_users(self, limit: usize) -> Self {
        self.with_max_resident(limit)
    }

    /// Sets [`arbiters`](Self::arbiters).
    pub fn with_arbiters(mut self, arbiters: usize) -> Self {
        self.arbiters = arbiters;
        self
    }

    /// Sets [`retention`](Self::retention): `Some(period)` purges, every
    /// [`retention_check_interval`](Self::retention_check_interval), the rows
    /// of the manager's entity type not written for `period`.
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`timers`](Self::timers): `None` fires no timer on this node.
    pub fn with_timers(mut self, timers: Option<crate::TimerConfig>) -> Self {
        self.timers = timers;
        self
    }

    /// Sets [`retention_check_interval`](Self::retention_check_interval); zero is raised to one millisecond.
    pub fn with_retention_check_interval(mut self, interval: Duration) -> Self {
        self.retention_check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets [`feed_retention`](Self::feed_retention).
    pub fn with_feed_retention(mut self, retention: Option<crate::FeedRetention>) -> Self {
        self.feed_retention = retention;
        self
    }

    /// Runs the manager in cluster mode, as `cluster`'s node: it serves the
    /// entities of the slices this node owns, answering them from memory
    /// while its lease holds, and every write it makes is fenced by the
    /// slice's epoch.
    pub fn with_cluster(mut self, cluster: crate::Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// In cluster mode, answers commands for entities owned elsewhere with
    /// [`CommandError::NotOwner`](crate::CommandError::NotOwner) (the
    /// owner's address in it) instead of forwarding them.
    pub fn without_forwarding(mut self) -> Self {
        self.forward = false;
        self
    }

    /// Sets [`retention_chunk_size`](Self::retention_chunk_size); at least 1.
    pub fn with_retention_chunk_size(mut self, rows: usize) -> Self {
        self.retention_chunk_size = rows.max(1);
        self
    }
}
