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
//! A change that cannot be decoded (a row damaged in the database) is never
//! passed over: the feed delivers every change before it, then stops at it
//! with [`StoreError::CorruptChange`] naming its position and entity, and
//! stays stopped until the row is repaired or the consumer skips that one
//! change with [`EntityFeed::skip_corrupt`], which is logged as a warning.
//!
//! [`StoreConfig::with_change_feed`]: crate::StoreConfig::with_change_feed

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use tracing::warn;

use std::sync::Arc;

use crate::cluster::NamedLease;
use crate::entity::{DurableEntity, EntityKey, PersistenceId, Revision};
use crate::error::{CorruptRow, StoreError};
use crate::store::{good_prefix, ChangeLog, ChangeRow};

/// One committed revision of an entity's state, as the change feed delivers
/// it. For users it is [`UserStateChange`](crate::UserStateChange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange<E: DurableEntity> {
    /// Where the change stands in the feed: in commit order, across entity types.
    pub position: u64,
    /// The entity.
    pub key: E::Key,
    /// The revision this state was committed as.
    pub revision: Revision,
    /// The state at that revision (the default state for a deletion).
    pub state: E,
    /// When the writing transaction ran, by the database's clock.
    pub committed_at: chrono::DateTime<chrono::Utc>,
    /// What happened: an update, or the entity's deletion.
    pub kind: ChangeKind,
}

/// The kind of a [`StateChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// The entity's state changed.
    Updated,
    /// The entity was deleted: its data is gone, its state is the default.
    Deleted,
    /// A change of an entity deleted (or purged) since: its data was erased
    /// from the feed with the deletion, in the same statement; its position
    /// and revision stay, so the feed is still gapless. A consumer that read
    /// it before the deletion holds what it read: erasing that is the
    /// consumer's business, on the `Deleted` change that follows.
    Redacted,
}

impl<E: DurableEntity> StateChange<E> {
    fn decode(row: ChangeRow) -> Result<Self, StoreError> {
        let corrupt = |source: CorruptRow| StoreError::CorruptChange {
            position: row.position,
            key: row.key.clone(),
            source,
        };
        let key = E::Key::from_entity_id(row.key.entity_id()).map_err(|e| corrupt(CorruptRow::Key(e)))?;
        if row.payload == crate::store::payload::REDACTED {
            return Ok(Self {
                position: row.position,
                key,
                revision: row.revision,
                state: E::default(),
                committed_at: row.committed_at,
                kind: ChangeKind::Redacted,
            });
        }
        let durable = crate::store::payload::decode::<E>(&row.payload, row.schema_version).map_err(corrupt)?;
        let kind = if durable.is_tombstone() {
            ChangeKind::Deleted
        } else {
            ChangeKind::Updated
        };
        Ok(Self {
            position: row.position,
            key,
            revision: row.revision,
            state: durable.state,
            committed_at: row.committed_at,
            kind,
        })
    }
}

/// Follows the changes of one entity type from a position, and can save that
/// position as a consumer's offset so that a restarted consumer goes on where
/// it stopped, with no gap and no duplicate. For users it is [`ChangeFeed`](crate::ChangeFeed).
///
/// A change that cannot be decoded stops the feed, after every change before
/// it has been returned: reads fail with [`StoreError::CorruptChange`] until
/// the row is repaired, or until the consumer decides to go on without that
/// change and calls [`skip_corrupt`](Self::skip_corrupt) with its position:
///
/// ```no_run
/// # use persist_durable::{ChangeFeed, StoreError};
/// # async fn follow(mut feed: ChangeFeed) -> Result<(), Box<dyn std::error::Error>> {
/// loop {
///     match feed.next().await {
///         Ok(changes) => changes.iter().for_each(|change| println!("{}", change.position)),
///         Err(StoreError::CorruptChange { position, key, source }) => {
///             // Alert someone; then, if losing this one change is acceptable:
///             eprintln!("skipping change {position} of {key}: {source}");
///             feed.skip_corrupt(position)?;
///         }
///         Err(other) => return Err(other.into()),
///     }
///     feed.commit().await?;
/// }
/// # }
/// ```
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
    store: Arc<dyn ChangeLog>,
    consumer: Option<String>,
    /// In cluster mode, the consumer name's named lease: only its holder
    /// reads and saves.
    lease: Option<NamedLease>,
    position: u64,
    batch_size: usize,
    poll_interval: Duration,
    /// The undecodable change the last read stopped at.
    stopped_at: Option<(u64, PersistenceId)>,
    entity: PhantomData<fn() -> E>,
}

impl<E: DurableEntity> EntityFeed<E> {
    /// Follows the feed after `position` (0: from the beginning), without a
    /// stored offset. Any store with the feed will do: a
    /// [`SharedStore`](crate::SharedStore), or an `Arc` of a concrete store.
    pub fn from_position(store: Arc<dyn ChangeLog>, position: u64) -> Self {
        Self {
            store,
            consumer: None,
            lease: None,
            position,
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
            stopped_at: None,
            entity: PhantomData,
        }
    }

    /// Follows the feed for `consumer`, from the offset it last committed
    /// (the beginning if none).
    ///
    /// In cluster mode (the store's process joined a
    /// [`Cluster`](crate::Cluster)), the name is followed on one node at a
    /// time: the node holding the named lease `feed/<consumer>` reads and
    /// commits, with each commit fenced by the lease; on the others
    /// [`next`](Self::next) waits, and takes over from the last committed
    /// position once the holder dies or leaves. So in steady state every
    /// change is delivered once; across a crash, the changes after the last
    /// commit are delivered again.
    pub async fn resume(store: Arc<dyn ChangeLog>, consumer: impl Into<String>) -> Result<Self, StoreError> {
        let consumer = consumer.into();
        if consumer.starts_with(crate::store::KAFKA_POSITIONS) {
            return Err(StoreError::InvalidConfig(format!(
                "the consumer name {consumer:?} is under kafka/, where the Kafka ingest keeps its partition positions"
            )));
        }
        let lease = NamedLease::of_store(store.clone(), format!("feed/{consumer}"));
        let position = store.load_offset(&consumer).await?.unwrap_or(0);
        Ok(Self {
            consumer: Some(consumer),
            lease,
            ..Self::from_position(store, position)
        })
    }

    /// In cluster mode, whether this node may read: it holds the consumer
    /// name's lease (taken now if free, going on from the position last
    /// committed, perhaps by another node).
    async fn may_read(&mut self) -> Result<bool, StoreError> {
        let Some(lease) = &self.lease else {
            return Ok(true);
        };
        if lease.is_held() {
            return Ok(true);
        }
        if !lease.acquire().await? {
            return Ok(false);
        }
        if let Some(consumer) = &self.consumer {
            self.position = self.store.load_offset(consumer).await?.unwrap_or(0);
        }
        Ok(true)
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

    /// The position of the last change returned (or skipped).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The position of the undecodable change the last read stopped at, if
    /// it did: the one [`skip_corrupt`](Self::skip_corrupt) would skip.
    pub fn stopped_at(&self) -> Option<u64> {
        self.stopped_at.as_ref().map(|(position, _)| *position)
    }

    /// The changes after the current position, up to the batch size; empty
    /// when there are none yet.
    ///
    /// The changes end before the first one that cannot be decoded; when it
    /// is the next one, the read fails with [`StoreError::CorruptChange`]
    /// and the position stays where it is.
    pub async fn next_batch(&mut self) -> Result<Vec<StateChange<E>>, StoreError> {
        if !self.may_read().await? {
            return Ok(Vec::new());
        }
        let read = self
            .store
            .read_change_rows(E::ENTITY_TYPE, self.position, self.batch_size)
            .await
            .and_then(|rows| good_prefix(rows.into_iter().map(StateChange::decode)));
        let changes = match read {
            Ok(changes) => changes,
            Err(error) => {
                if let StoreError::CorruptChange { position, key, .. } = &error {
                    self.stopped_at = Some((*position, key.clone()));
                }
                return Err(error);
            }
        };
        self.stopped_at = None;
        if let Some(last) = changes.last() {
            self.position = last.position;
        }
        Ok(changes)
    }

    /// Moves past the change at `position` without delivering it: the way
    /// on after [`StoreError::CorruptChange`] when repairing the row is not
    /// possible and losing that one change is acceptable. Only the change
    /// the feed stopped at can be skipped, and only right after the read
    /// that stopped there; anything else is refused and skips nothing.
    ///
    /// The skip is logged as a warning and counted in
    /// `persist_durable_feed_changes_skipped_total`. Like reading, it moves
    /// the position: [`commit`](Self::commit) makes it the consumer's offset.
    pub fn skip_corrupt(&mut self, position: u64) -> Result<(), SkipRefused> {
        match self.stopped_at.take() {
            Some((stopped, key)) if stopped == position => {
                warn!(
                    position,
                    key = %key,
                    consumer = self.consumer.as_deref().unwrap_or("-"),
                    entity = E::ENTITY_TYPE,
                    "skipping a change of the feed that cannot be decoded; it will not be delivered"
                );
                metrics::counter!("persist_durable_feed_changes_skipped_total", "entity" => E::ENTITY_TYPE)
                    .increment(1);
                self.position = position;
                Ok(())
            }
            stopped => {
                let stopped_at = stopped.as_ref().map(|(position, _)| *position);
                self.stopped_at = stopped;
                Err(SkipRefused {
                    requested: position,
                    stopped_at,
                })
            }
        }
    }

    /// Waits until there are changes after the current position and returns
    /// them. Changes committed through this process's store wake it at
    /// once; those of other processes show at the next poll (every
    /// [`with_poll_interval`](Self::with_poll_interval)).
    pub async fn next(&mut self) -> Result<Vec<StateChange<E>>, StoreError> {
        let signal = self.store.feed_signal();
        loop {
            // Listening before reading: a commit in between still wakes it.
            let committed = signal.as_ref().map(|signal| {
                let mut committed = Box::pin(signal.notified());
                committed.as_mut().enable();
                committed
            });
            let changes = self.next_batch().await?;
            if !changes.is_empty() {
                return Ok(changes);
            }
            match committed {
                Some(committed) => {
                    let _ = tokio::time::timeout(self.poll_interval, committed).await;
                }
                None => tokio::time::sleep(self.poll_interval).await,
            }
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
        match (&self.consumer, &self.lease) {
            (Some(consumer), Some(lease)) => match lease.save_offset(consumer, self.position).await? {
                true => Ok(()),
                false => Err(StoreError::LeaseLost {
                    lease: lease.name().to_owned(),
                }),
            },
            (Some(consumer), None) => self.store.save_offset(consumer, self.position).await,
            (None, _) => Err(StoreError::InvalidConfig(
                "this feed has no consumer name; start it with EntityFeed::resume".into(),
            )),
        }
    }
}

/// [`EntityFeed::skip_corrupt`] was asked to skip a change other than the
/// undecodable one the feed stopped at; nothing was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipRefused {
    /// The position asked to skip.
    pub requested: u64,
    /// The undecodable change the feed stopped at, if it did.
    pub stopped_at: Option<u64>,
}

impl fmt::Display for SkipRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stopped_at {
            Some(stopped_at) => write!(
                f,
                "not skipping position {}: the feed stopped at the undecodable change at {stopped_at}",
                self.requested
            ),
            None => write!(
                f,
                "not skipping position {}: the feed has not stopped at an undecodable change",
                self.requested
            ),
        }
    }
}

impl std::error::Error for SkipRefused {}
