use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Clock, StatePolicy, SystemClock};

/// How the user actors behave. Defaults follow the original design: a user
/// idle for 30 minutes is passivated, checked every 5 minutes, and 3 recently
/// viewed products are kept.
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
    /// How many recently viewed products are kept.
    pub recent_products_limit: usize,
    /// Where recorded times come from.
    pub clock: Arc<dyn Clock>,
    /// Arbiters (threads) the manager spreads user actors over; default: one
    /// per core. With 0, user actors run on the manager's own arbiter, which
    /// tests that pause tokio's clock need: paused time is per runtime, and
    /// each arbiter has its own.
    pub arbiters: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            idle_check_interval: Duration::from_secs(5 * 60),
            recent_products_limit: StatePolicy::default().recent_products_limit,
            clock: Arc::new(SystemClock),
            arbiters: std::thread::available_parallelism().map_or(1, usize::from),
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
            .field("arbiters", &self.arbiters)
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

    /// Sets [`arbiters`](Self::arbiters).
    pub fn with_arbiters(mut self, arbiters: usize) -> Self {
        self.arbiters = arbiters;
        self
    }

    pub(crate) fn policy(&self) -> StatePolicy {
        StatePolicy::default().with_recent_products_limit(self.recent_products_limit)
    }
}
