use std::fmt;
use std::future::Future;
use std::sync::Arc;

use actix::Addr;

use super::entity_actor::{Answer, Records};
use super::manager::{EntityManager, Shards};
use super::messages::{
    EntityCommand, EntityRecords, GetManagerStats, HandOver, ManagerStats, PurgeIdle, StopGracefully,
};
use crate::config::Config;
use crate::entity::{DurableEntity, EntityEvent, EntityKey};
use crate::error::{CommandError, CorruptRow, ManagerStopped, StoreError};
use crate::store::ext::checked;
use crate::store::SharedStore;
use crate::timers::{Missed, PendingTimer, Schedule};

/// A cloneable, typed handle to the entities of one type: one `?` per command.
///
/// `send(key, command).await` returns the state after the command, or a
/// [`CommandError`]: a manager that cannot be reached is
/// [`CommandError::NotDelivered`], not a second layer of `Result`. Share it
/// with actix-web handlers as `web::Data<Entities<E>>`; the manager's
/// [`Addr`] stays available through [`addr`](Self::addr). For users it is
/// [`UserStates`](crate::UserStates).
///
/// A handle from [`start`](Self::start) picks the entity's shard in the
/// caller's thread and sends the command there, one hop shorter than a
/// message to the manager's address, which passes it on.
///
/// ```
/// use persist_durable::{Command, Config, MemoryStore, UserKey, UserStates};
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let users = UserStates::start(std::sync::Arc::new(MemoryStore::new()), Config::default());
///     let state = users.send(UserKey::new("mall001", "user001")?, Command::UserLogin).await?;
///     assert!(state.last_login.is_some());
///     Ok(())
/// }
/// ```
pub struct Entities<E: DurableEntity> {
    manager: Addr<EntityManager<E>>,
    /// The manager's shards, when this handle started it.
    shards: Option<Shards<E>>,
    store: SharedStore,
    /// In cluster mode: this node's membership, and how commands for
    /// entities owned elsewhere reach their owner.
    cluster: Option<ClusterRoute<E>>,
}

/// How a handle in cluster mode routes a command.
struct ClusterRoute<E: DurableEntity> {
    cluster: crate::Cluster,
    /// Forward to the owner (else answer `NotOwner`).
    forward: bool,
    forwarder: Option<Arc<dyn Forward<E>>>,
}

impl<E: DurableEntity> Clone for ClusterRoute<E> {
    fn clone(&self) -> Self {
        Self {
            cluster: self.cluster.clone(),
            forward: self.forward,
            forwarder: self.forwarder.clone(),
        }
    }
}

impl<E: DurableEntity> Entities<E> {
    /// Starts a manager for `E` on `store`, with the entity's default
    /// settings, and returns its handle.
    pub fn start(store: SharedStore, config: Config) -> Self {
        Self::start_with(store, config, E::Settings::default())
    }

    /// Starts a manager for `E` on `store` whose entities' transitions use
    /// `settings` (for users a [`StatePolicy`](crate::StatePolicy)), and
    /// returns its handle.
    pub fn start_with(store: SharedStore, config: Config, settings: E::Settings) -> Self {
        let cluster = config.cluster.clone().map(|cluster| ClusterRoute {
            cluster,
            forward: config.forward,
            forwarder: None,
        });
        let (manager, shards) = EntityManager::<E>::with_settings(store.clone(), config, settings).start_with_shards();
        if let Some(route) = &cluster {
            // The entities of slices this node loses passivate here; their
            // new owner restores what was committed.
            let shards = shards.clone();
            route.cluster.on_lost(move |slices| shards.hand_over_slices(slices));
        }
        Self {
            manager,
            shards: Some(shards),
            store,
            cluster,
        }
    }

    /// In cluster mode, forwards commands for entities owned elsewhere
    /// through `forwarder` (the HTTP one: [`http::forward_to_owners`](crate::http::forward_to_owners)).
    pub(crate) fn with_forwarder(mut self, forwarder: Arc<dyn Forward<E>>) -> Self {
        if let Some(route) = &mut self.cluster {
            route.forwarder = Some(forwarder);
        }
        self
    }

    /// A handle to a manager already started on `store`; its commands go
    /// through the manager's address.
    pub fn new(manager: Addr<EntityManager<E>>, store: SharedStore) -> Self {
        Self {
            manager,
            shards: None,
            store,
            cluster: None,
        }
    }

    /// Sends `command` (a command, or an [`EntityEvent`] with its id and
    /// time) to the entity `key` and returns the state after it, once committed.
    ///
    /// In cluster mode, an entity another node owns gets the command through
    /// that node (see [`Config::with_cluster`]).
    pub async fn send(&self, key: E::Key, command: impl Into<EntityEvent<E::Command>>) -> Result<E, CommandError<E>> {
        if let (Some(shards), Some(route)) = (&self.shards, &self.cluster) {
            return route.send(shards, key, command.into()).await;
        }
        if let Some(shards) = &self.shards {
            return shards.send(key, command.into()).await;
        }
        let request = self.manager.send(EntityCommand::new(key.clone(), command));
        request.await.unwrap_or_else(|error| {
            Err(CommandError::NotDelivered {
                key,
                reason: error.to_string(),
            })
        })
    }

    /// The manager's counters, summed over its shards.
    pub async fn stats(&self) -> Result<ManagerStats, ManagerStopped> {
        match &self.shards {
            Some(shards) => Ok(shards.stats().await),
            None => self.manager.send(GetManagerStats).await.map_err(|_| ManagerStopped),
        }
    }

    /// Purges now, as retention does periodically, the rows of `E` not
    /// written for [`Config::retention`], skipping resident entities, and
    /// returns how many were removed; see [`PurgeIdle`](crate::PurgeIdle).
    /// Fails with [`StoreError::InvalidConfig`] when retention is off.
    pub async fn purge_idle(&self) -> Result<u64, StoreError> {
        match &self.shards {
            Some(shards) => shards.purge_idle().await,
            None => self.manager.send(PurgeIdle).await.map_err(|_| StoreError::Stopped)?,
        }
    }

    /// Stops gracefully: every resident entity passivates once what is
    /// queued at it is committed (and answered), and this returns once none
    /// is left. A command sent from then on is answered
    /// [`CommandError::NotDelivered`], not applied. Call it before the
    /// process exits, so that no acknowledged command is cut short.
    pub async fn stop(&self) -> Result<(), ManagerStopped> {
        let drained = match &self.shards {
            Some(shards) => shards.drain().await,
            None => self.manager.send(StopGracefully).await.map_err(|_| ManagerStopped)?,
        };
        if drained {
            Ok(())
        } else {
            Err(ManagerStopped)
        }
    }

    /// Applies `event` here, never forwarding it: what another node's
    /// forwarded command gets. In cluster mode an entity this node does not
    /// own is answered `NotOwner`.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) async fn send_here(&self, key: E::Key, event: EntityEvent<E::Command>) -> Answer<E> {
        match &self.shards {
            Some(shards) => shards.send(key, event).await,
            None => self
                .manager
                .send(EntityCommand::new(key.clone(), event))
                .await
                .unwrap_or_else(|error| {
                    Err(CommandError::NotDelivered {
                        key,
                        reason: error.to_string(),
                    })
                }),
        }
    }

    /// Sends an ingest's `records` for `key`, answered one result per record.
    #[allow(dead_code)] // used by the `kafka` feature
    pub(crate) async fn send_records(&self, key: E::Key, records: Records<E>) -> Vec<Answer<E>> {
        if let (Some(shards), Some(route)) = (&self.shards, &self.cluster) {
            return route.send_records(shards, key, records).await;
        }
        self.send_records_here(key, records).await
    }

    /// Queues an ingest's `records` here, never forwarding them (what
    /// another node's forwarded records get).
    pub(crate) async fn send_records_here(&self, key: E::Key, records: Records<E>) -> Vec<Answer<E>> {
        if let Some(shards) = &self.shards {
            return shards.send_records(key, records).await;
        }
        let len = records.len();
        let request = self.manager.send(EntityRecords {
            key: key.clone(),
            records,
        });
        request
            .await
            .unwrap_or_else(|error| EntityRecords::undelivered(&key, len, &format!("the manager is gone: {error}")))
    }

    /// Passivates `keys` once what was sent to them is committed (see [`HandOver`]).
    #[allow(dead_code)] // used by the `kafka` feature
    pub(crate) fn hand_over(&self, keys: Vec<E::Key>) {
        match &self.shards {
            Some(shards) => shards.hand_over(keys),
            None => self.manager.do_send(HandOver(keys)),
        }
    }

    /// Whether `key` has an actor that is not passivating (false for a
    /// handle made from an address).
    pub(crate) async fn is_resident(&self, key: &E::Key) -> bool {
        match &self.shards {
            Some(shards) => shards.is_resident(key).await.unwrap_or(false),
            None => false,
        }
    }

    /// Whether `key` has an actor, passivating or not (false for a handle
    /// made from an address).
    #[cfg(feature = "testkit")]
    pub(crate) async fn has_actor(&self, key: &E::Key) -> bool {
        match &self.shards {
            Some(shards) => shards.has_actor(key).await.unwrap_or(false),
            None => false,
        }
    }

    /// Cancels the entity's timer `name`; whether it had one. A fire of it
    /// in flight then commits nothing. The state is not told: a later
    /// change of what it wants of that timer sets it again.
    pub async fn cancel_timer(&self, key: &E::Key, name: &str) -> Result<bool, StoreError> {
        let id = checked(key)?;
        self.store.cancel_timer(&id, name).await
    }

    /// Fires every timer due by the clock's now and waits for each fire's
    /// answer: the testkit's `advance`.
    #[cfg(feature = "testkit")]
    pub(crate) async fn fire_due(&self) {
        if let Some(shards) = &self.shards {
            shards.fire_due().await;
        }
    }

    /// Checks that the store's database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// The manager's address, for sending [`EntityCommand`]s yourself.
    pub fn addr(&self) -> &Addr<EntityManager<E>> {
        &self.manager
    }

    /// The store the entities persist to.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }
}

impl<E: DurableEntity> Entities<E>
where
    E::Command: serde::de::DeserializeOwned,
{
    /// The entity's pending timers, by name, with the commands they deliver.
    /// A stored timer that does not read back fails with
    /// [`StoreError::Corrupt`], naming the entity.
    pub async fn timers(&self, key: &E::Key) -> Result<Vec<PendingTimer<E::Command>>, StoreError> {
        let id = checked(key)?;
        let stored = self.store.timers_of(&id).await?;
        stored
            .into_iter()
            .map(|timer| {
                let corrupt = |source: CorruptRow| StoreError::Corrupt {
                    key: id.clone(),
                    revision: None,
                    source,
                };
                let schedule =
                    Schedule::decode(&timer.schedule).ok_or_else(|| corrupt(CorruptRow::Schedule(timer.schedule)))?;
                let command = serde_json::from_slice(&timer.command)
                    .map_err(|error| corrupt(CorruptRow::Payload(Arc::new(error))))?;
                Ok(PendingTimer {
                    name: timer.name,
                    due: timer.due,
                    schedule,
                    missed: Missed::from_code(timer.missed),
                    command,
                })
            })
            .collect()
    }
}

impl<E: DurableEntity> Clone for Entities<E> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
            shards: self.shards.clone(),
            store: self.store.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

impl<E: DurableEntity> fmt::Debug for Entities<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entities")
            .field("entity_type", &E::ENTITY_TYPE)
            .field("store", &self.store)
            .finish()
    }
}

/// How often a command whose entity is on its way to another owner is tried
/// again before it is answered `NotOwner`.
const ROUTING_ATTEMPTS: u32 = 4;

impl<E: DurableEntity> ClusterRoute<E> {
    /// Sends `event` to `key`'s owner: here if this node owns its slice,
    /// else forwarded; a slice moving meanwhile sends it again (nothing of
    /// it was applied: its write was fenced, or it never reached an actor).
    async fn send(&self, shards: &Shards<E>, key: E::Key, event: EntityEvent<E::Command>) -> Answer<E> {
        let slice = key.persistence_id().slice();
        let ownership = self.cluster.ownership();
        let mut attempt = 0;
        let started = tokio::time::Instant::now();
        loop {
            attempt += 1;
            let mut forwarded = false;
            let answer = if ownership.owns(slice) {
                shards.send(key.clone(), event.clone()).await
            } else {
                match (ownership.owner(slice), &self.forwarder) {
                    (Some(owner), Some(forwarder)) if self.forward && *owner.node != **ownership.node() => {
                        self.cluster.count_forwarded();
                        forwarded = true;
                        forwarder.forward(owner, key.clone(), event.clone()).await
                    }
                    (owner, _) => Err(CommandError::NotOwner {
                        key: key.clone(),
                        owner: owner.map(|owner| owner.address.to_string()),
                    }),
                }
            };
            match answer {
                Err(CommandError::NotOwner { .. }) if self.forward && attempt < ROUTING_ATTEMPTS => {
                    // Moving: the next round of the membership task settles it.
                    tokio::time::sleep(self.cluster.renew_every() / 2).await;
                }
                // The owner could not be reached, so nothing was sent: it may
                // have died, and its slices move once its lease expires.
                Err(CommandError::NotDelivered { .. })
                    if forwarded && started.elapsed() < self.cluster.failover_within() =>
                {
                    tokio::time::sleep(self.cluster.renew_every() / 2).await;
                }
                answer => return answer,
            }
        }
    }
}

impl<E: DurableEntity> ClusterRoute<E> {
    /// Sends an ingest's `records` to `key`'s owner: here if this node owns
    /// its slice, else forwarded with where each came from, so the owner
    /// remembers their offsets. Not retried here: the ingest retries what
    /// may pass, in order.
    async fn send_records(&self, shards: &Shards<E>, key: E::Key, records: Records<E>) -> Vec<Answer<E>> {
        let slice = key.persistence_id().slice();
        let ownership = self.cluster.ownership();
        if ownership.owns(slice) {
            return shards.send_records(key, records).await;
        }
        match (ownership.owner(slice), &self.forwarder) {
            (Some(owner), Some(forwarder)) if self.forward && *owner.node != **ownership.node() => {
                self.cluster.count_forwarded();
                forwarder.forward_records(owner, key, records).await
            }
            (owner, _) => {
                let owner = owner.map(|owner| owner.address.to_string());
                (0..records.len())
                    .map(|_| {
                        Err(CommandError::NotOwner {
                            key: key.clone(),
                            owner: owner.clone(),
                        })
                    })
                    .collect()
            }
        }
    }
}

/// Sends a command to the node that owns its entity, and brings back its
/// answer: the cluster's forwarding, behind which the HTTP one sits.
pub(crate) trait Forward<E: DurableEntity>: Send + Sync {
    /// `event` for `key`, sent to `owner`.
    fn forward(
        &self,
        owner: crate::cluster::Owner,
        key: E::Key,
        event: EntityEvent<E::Command>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Answer<E>> + Send>>;

    /// An ingest's `records` for `key`, sent to `owner`: one answer each.
    fn forward_records(
        &self,
        owner: crate::cluster::Owner,
        key: E::Key,
        records: Records<E>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<Answer<E>>> + Send>>;
}
