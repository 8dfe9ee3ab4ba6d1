use std::time::Duration;

/// Settings shared by the database backends.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Connections in the pool. PostgreSQL default 8; SQLite serialises
    /// writers anyway, so a few connections suffice.
    pub pool_size: usize,
    /// How long a query waits for a connection before failing with
    /// [`StoreError::Unavailable`](crate::StoreError::Unavailable).
    pub connect_timeout: Duration,
    /// The most a single load or write may take. The database enforces it
    /// (PostgreSQL's `statement_timeout` and `lock_timeout` on each
    /// connection), so a write that fails for time is rolled back, not
    /// committed later; the client gives up on its own only after twice as
    /// long, with [`StoreError::Timeout`](crate::StoreError::Timeout).
    pub operation_timeout: Duration,
    /// Worker threads of the store's own runtime.
    pub worker_threads: usize,
    /// SQLite only: how long a writer waits for a lock held by another connection or process.
    pub sqlite_busy_timeout: Duration,
    /// Group commit: the most writes (or restores) in one statement.
    pub max_batch_size: usize,
    /// Group commit: how long a batch waits for more requests after its
    /// first. A batch that fills while it waits still waits out the window
    /// (the collector does not listen meanwhile, which spares every sender a
    /// wake-up): keep it short next to the latency you want.
    pub max_batch_wait: Duration,
    /// Group commit: write statements in flight at once.
    pub max_write_batches_in_flight: usize,
    /// Restore statements in flight at once, so a restart does not storm the database.
    pub max_restores_in_flight: usize,
    /// Record every committed revision in the change feed, in the same
    /// statement as the state (see [`ChangeFeed`](crate::ChangeFeed)). Off by
    /// default: it costs a row per command and serialises the commits of
    /// write statements (measured in BENCHMARKS.md).
    pub change_feed: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            worker_threads: 2,
            sqlite_busy_timeout: Duration::from_secs(5),
            max_batch_size: 512,
            max_batch_wait: Duration::from_millis(1),
            max_write_batches_in_flight: 6,
            max_restores_in_flight: 2,
            change_feed: false,
        }
    }
}

impl StoreConfig {
    /// Sets [`pool_size`](Self::pool_size).
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`worker_threads`](Self::worker_threads).
    pub fn with_worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = threads.max(1);
        self
    }

    /// Sets [`max_batch_size`](Self::max_batch_size); at least 1.
    pub fn with_max_batch_size(mut self, size: usize) -> Self {
        self.max_batch_size = size.max(1);
        self
    }

    /// Sets [`max_batch_wait`](Self::max_batch_wait); zero sends what is queued at once.
    pub fn with_max_batch_wait(mut self, wait: Duration) -> Self {
        self.max_batch_wait = wait;
        self
    }

    /// Sets [`max_write_batches_in_flight`](Self::max_write_batches_in_flight); at least 1.
    pub fn with_max_write_batches_in_flight(mut self, batches: usize) -> Self {
        self.max_write_batches_in_flight = batches.max(1);
        self
    }

    /// Sets [`max_restores_in_flight`](Self::max_restores_in_flight); at least 1.
    pub fn with_max_restores_in_flight(mut self, restores: usize) -> Self {
        self.max_restores_in_flight = restores.max(1);
        self
    }

    /// Sets [`change_feed`](Self::change_feed).
    pub fn with_change_feed(mut self, enabled: bool) -> Self {
        self.change_feed = enabled;
        self
    }

    /// Sets [`sqlite_busy_timeout`](Self::sqlite_busy_timeout).
    pub fn with_sqlite_busy_timeout(mut self, timeout: Duration) -> Self {
        self.sqlite_busy_timeout = timeout;
        self
    }
}

impl StoreConfig {
    /// Refuses settings under which an answer could be wrong about a
    /// commit: timeouts of zero (or under a millisecond, which the
    /// databases cannot express). SQLite also needs its busy timeout within
    /// the operation timeout, checked by [`SqliteStore::open_with`](crate::SqliteStore::open_with).
    pub fn validate(&self) -> Result<(), crate::StoreError> {
        let at_least_a_millisecond = [
            ("operation_timeout", self.operation_timeout),
            ("connect_timeout", self.connect_timeout),
        ];
        for (name, timeout) in at_least_a_millisecond {
            if timeout < Duration::from_millis(1) {
                return Err(crate::StoreError::InvalidConfig(format!(
                    "{name} is {timeout:?}; at least 1 ms is needed"
                )));
            }
        }
        Ok(())
    }

    /// A connection pool for `manager` with this configuration's size and timeouts.
    pub(crate) fn build_pool<M: deadpool::managed::Manager>(
        &self,
        manager: M,
    ) -> Result<deadpool::managed::Pool<M>, crate::StoreError> {
        deadpool::managed::Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| crate::StoreError::InvalidConfig(format!("cannot build the connection pool: {e}")))
    }
}
