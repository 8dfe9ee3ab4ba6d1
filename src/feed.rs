//! The change feed: every committed state change, in order, from a
//! resumable position, for downstream systems (a search index, a cache, a
//! Kafka topic).
//!
//! Enable it on the store with [`StoreConfig::with_change_feed`]. Each
//! committed revision is written in the same statement as the state, so a
//! change is in the feed exactly when it is committed. Unlike Pekko's
//! `changesBySlices`, no revision is skipped, not even those of commands
//! that were committed together in one row write.
//!
//! [`StoreConfig::with_change_feed`]: crate::StoreConfig::with_change_feed

use std::time::Duration;

use crate::error::StoreError;
use crate::store::{SharedStore, StateChange};

/// Follows the change feed from a position, and can save that position as a
/// consumer's offset so that a restarted consumer goes on where it stopped,
/// with no gap and no duplicate.
///
/// ```
/// use actix::Actor;
/// use persist_durable::{ChangeFeed, Command, Config, SqliteStore, StoreConfig, UserCommand, UserKey, UserStateManager};
/// use std::sync::Arc;
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let dir = tempfile::tempdir()?;
///     let config = StoreConfig::default().with_change_feed(true);
///     let store: persist_durable::SharedStore =
///         Arc::new(SqliteStore::open_with(dir.path().join("state.db"), config).await?);
///     let manager = UserStateManager::new(store.clone(), Config::default()).start();
///     manager.send(UserCommand::new(UserKey::new("mall001", "user001")?, Command::UserLogin)).await??;
///
///     let mut feed = ChangeFeed::resume(store, "search-index").await?;
///     let changes = feed.next().await?; // waits until there is something
///     assert_eq!((changes[0].position, changes[0].revision.0), (1, 1));
///     feed.commit().await?; // a restarted consumer resumes after position 1
///     Ok(())
/// }
/// ```
pub struct ChangeFeed {
    store: SharedStore,
    consumer: Option<String>,
    position: u64,
    batch_size: usize,
    poll_interval: Duration,
}

impl ChangeFeed {
    /// Follows the feed after `position` (0: from the beginning), without a stored offset.
    pub fn from_position(store: SharedStore, position: u64) -> Self {
        Self {
            store,
            consumer: None,
            position,
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
        }
    }

    /// Follows the feed for `consumer`, from the offset it last committed
    /// (the beginning if none).
    pub async fn resume(store: SharedStore, consumer: impl Into<String>) -> Result<Self, StoreError> {
        let consumer = consumer.into();
        let position = store.load_offset(&consumer).await?.unwrap_or(0);
        Ok(Self {
            consumer: Some(consumer),
            ..Self::from_position(store, position)
        })
    }

    /// Reads at most `size` changes at a time (500 by default).
    pub fn with_batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// How long [`next`](Self::next) waits between polls of an idle feed (100 ms by default).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The position of the last change returned.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The changes after the current position, up to the batch size; empty
    /// when there are none yet.
    pub async fn next_batch(&mut self) -> Result<Vec<StateChange>, StoreError> {
        let changes = self.store.read_changes(self.position, self.batch_size).await?;
        if let Some(last) = changes.last() {
            self.position = last.position;
        }
        Ok(changes)
    }

    /// Waits until there are changes after the current position and returns them.
    pub async fn next(&mut self) -> Result<Vec<StateChange>, StoreError> {
        loop {
            let changes = self.next_batch().await?;
            if !changes.is_empty() {
                return Ok(changes);
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Saves the current position as the consumer's offset. Call it once the
    /// changes returned so far are processed: a consumer restarted with
    /// [`resume`](Self::resume) continues right after them.
    ///
    /// Changes processed but not yet committed are delivered again after a
    /// crash (at least once). For exactly once, store the position together
    /// with the consumer's own side effect, in its transaction, and start
    /// from it with [`from_position`](Self::from_position).
    pub async fn commit(&self) -> Result<(), StoreError> {
        match &self.consumer {
            Some(consumer) => self.store.save_offset(consumer, self.position).await,
            None => Err(StoreError::Setup(
                "this feed has no consumer name; start it with ChangeFeed::resume".into(),
            )),
        }
    }
}
