//! The change feed: every committed state change, in order, from a
//! resumable position, for downstream systems (a search index, a cache, a
//! Kafka topic). One feed holds every entity type; an [`EntityFeed`] reads
//! the changes of one, typed.
//!
//! Enable it on the store with [`StoreConfig::with_change_feed`]. Each
//! committed revision is written in the same statement as the state, so a
//! change is in the feed exactly when it is committed. Unlike Pekko's
//! `changesBySlices`, no revision is skipped, not even those of commands
//! that were committed together in one row write.
//!
//! [`StoreConfig::with_change_feed`]: crate::StoreConfig::with_change_feed

use std::marker::PhantomData;
use std::time::Duration;

use crate::domain::UserState;
use crate::entity::{DurableEntity, EntityKey, Revision};
use crate::error::{CorruptRow, StoreError};
use crate::store::{ChangeRow, SharedStore};

/// One committed revision of an entity's state, as the change feed delivers
/// it. For users (the default) a [`UserState`] keyed by [`UserKey`](crate::UserKey).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange<E: DurableEntity = UserState> {
    /// Where the change stands in the feed: in commit order, across entity types.
    pub position: u64,
    /// The entity.
    pub key: E::Key,
    /// The revision this state was committed as.
    pub revision: Revision,
    /// The state at that revision.
    pub state: E,
    /// When the writing transaction ran, by the database's clock.
    pub committed_at: chrono::DateTime<chrono::Utc>,
}

impl<E: DurableEntity> StateChange<E> {
    fn decode(row: ChangeRow) -> Result<Self, StoreError> {
        let corrupt = |source: CorruptRow| StoreError::Corrupt {
            key: row.key.clone(),
            revision: row.revision.0 as i64,
            source,
        };
        let key = E::Key::from_entity_id(row.key.entity_id()).map_err(|e| corrupt(CorruptRow::Key(e)))?;
        let (state, _event_ids) = crate::store::decode_payload::<E>(&row.payload).map_err(corrupt)?;
        Ok(Self {
            position: row.position,
            key,
            revision: row.revision,
            state,
            committed_at: row.committed_at,
        })
    }
}

/// The change feed of the user states.
pub type ChangeFeed = EntityFeed<UserState>;

/// Follows the changes of one entity type from a position, and can save that
/// position as a consumer's offset so that a restarted consumer goes on where
/// it stopped, with no gap and no duplicate. For users it is [`ChangeFeed`].
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
pub struct EntityFeed<E: DurableEntity> {
    store: SharedStore,
    consumer: Option<String>,
    position: u64,
    batch_size: usize,
    poll_interval: Duration,
    entity: PhantomData<fn() -> E>,
}

impl<E: DurableEntity> EntityFeed<E> {
    /// Follows the feed after `position` (0: from the beginning), without a stored offset.
    pub fn from_position(store: SharedStore, position: u64) -> Self {
        Self {
            store,
            consumer: None,
            position,
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
            entity: PhantomData,
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
    pub async fn next_batch(&mut self) -> Result<Vec<StateChange<E>>, StoreError> {
        let rows = self
            .store
            .read_change_rows(E::ENTITY_TYPE, self.position, self.batch_size)
            .await?;
        let changes = rows
            .into_iter()
            .map(StateChange::decode)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(last) = changes.last() {
            self.position = last.position;
        }
        Ok(changes)
    }

    /// Waits until there are changes after the current position and returns them.
    pub async fn next(&mut self) -> Result<Vec<StateChange<E>>, StoreError> {
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
            None => Err(StoreError::InvalidConfig(
                "this feed has no consumer name; start it with EntityFeed::resume".into(),
            )),
        }
    }
}
