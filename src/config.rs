use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};

/// How the entity actors and their manager behave, for every entity type.
/// Defaults follow the original design: an entity idle for 30 minutes is
/// passivated, checked every 5 minutes, and (for users) 3 recently viewed
/// products are kept.
///
/// ```
/// use std::time::Duration;
/// let config = persist_durable::Config::default()
///     .with_idle_timeout(Duration::from_secs(15 * 60))
///     .with_recent_products_limit(5);
/// assert_eq!(config.idle_check_interval, Duration::from_secs(5 * 60));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long a user may go without a command before its actor is passivated.
    pub idle_timeout: Duration,
    /// How often an actor checks whether it has been idle long enough.
    pub idle_check_interval: Duration,
    /// Users only: how many recently viewed products are kept (see
    /// [`DurableEntity::settings`](crate::DurableEntity::settings)).
    pub recent_products_limit: usize,
    /// Where recorded times come from.
    pub clock: Arc<dyn Clock>,
    /// How many applied event ids each entity remembers, to recognise redelivery.
    pub event_id_memory: usize,
    /// How often a write that lost a revision conflict is reloaded and
    /// applied again before its commands fail with
    /// [`CommandError::Conflict`](crate::CommandError::Conflict).
    pub conflict_retries: u32,
    /// Commands queued for one user at most; beyond it, commands are refused
    /// with [`CommandError::Overloaded`](crate::CommandError::Overloaded).
    pub max_queued_per_user: usize,
    /// Commands in flight through the manager at most; beyond it, refused
    /// with [`CommandError::Overloaded`](crate::CommandError::Overloaded).
    pub max_commands_in_flight: usize,
    /// Users with an actor at most, over all shards; beyond it, the shard
    /// whose activation crossed it passivates its least recently used ones
    /// (Akka's default for a shard region is 100,000).
    pub max_resident_users: usize,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            idle_check_interval: Duration::from_secs(5 * 60),
            recent_products_limit: 3,
            clock: Arc::new(SystemClock),
            event_id_memory: 32,
            conflict_retries: 3,
            max_queued_per_user: 1_000,
            max_commands_in_flight: 100_000,
            max_resident_users: 100_000,
            arbiters: std::thread::available_parallelism().map_or(1, usize::from),
            retention: None,
            retention_check_interval: Duration::from_secs(60 * 60),
            retention_chunk_size: 500,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("idle_timeout", &self.idle_timeout)
            .field("idle_check_interval", &self.idle_check_interval)
            .field("recent_products_limit", &self.recent_products_limit)
            .field("clock", &self.clock)
            .field("event_id_memory", &self.event_id_memory)
            .field("conflict_retries", &self.conflict_retries)
            .field("max_queued_per_user", &self.max_queued_per_user)
            .field("max_commands_in_flight", &self.max_commands_in_flight)
            .field("max_resident_users", &self.max_resident_users)
            .field("arbiters", &self.arbiters)
            .field("retention", &self.retention)
            .field("retention_check_interval", &self.retention_check_interval)
            .field("retention_chunk_size", &self.retention_chunk_size)
            .finish()
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

    /// Sets [`recent_products_limit`](Self::recent_products_limit).
    pub fn with_recent_products_limit(mut self, limit: usize) -> Self {
        self.recent_products_limit = limit;
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

    /// Sets [`conflict_retries`](Self::conflict_retries); 0 reports every conflict.
    pub fn with_conflict_retries(mut self, retries: u32) -> Self {
        self.conflict_retries = retries;
        self
    }

    /// Sets [`max_queued_per_user`](Self::max_queued_per_user); at least 1.
    pub fn with_max_queued_per_user(mut self, limit: usize) -> Self {
        self.max_queued_per_user = limit.max(1);
        self
    }

    /// Sets [`max_commands_in_flight`](Self::max_commands_in_flight); at least 1.
    pub fn with_max_commands_in_flight(mut self, limit: usize) -> Self {
        self.max_commands_in_flight = limit.max(1);
        self
    }

    /// Sets [`max_resident_users`](Self::max_resident_users); at least 1.
    pub fn with_max_resident_users(mut self, limit: usize) -> Self {
        self.max_resident_users = limit.max(1);
        self
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

    /// Sets [`retention_check_interval`](Self::retention_check_interval); zero is raised to one millisecond.
    pub fn with_retention_check_interval(mut self, interval: Duration) -> Self {
        self.retention_check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets [`retention_chunk_size`](Self::retention_chunk_size); at least 1.
    pub fn with_retention_chunk_size(mut self, rows: usize) -> Self {
        self.retention_chunk_size = rows.max(1);
        self
    }
}
