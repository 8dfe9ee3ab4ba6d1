//! The manager of one entity type: its shards, one per arbiter, and the
//! routing of messages sent to its address to the shard that owns the key.

use std::sync::Arc;

use std::future::Future;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::entity_actor::{stopped_before_answering, Answer, Records, Shared};
use super::messages::{
    EntityCommand, EntityRecords, GetManagerStats, HandOver, ManagerStats, PurgeIdle, StopGracefully,
};
use super::placement::{Placement, Spread};
use super::round::Work;
use super::shard::{Drain, HandOverSlices, HasActor, IsResident, RouteCommand, Shard, ShardCounters};
use super::start_unbounded;
use crate::config::Config;
use crate::entity::{DurableEntity, EntityEvent};
use crate::error::{ManagerStopped, StoreError};
use crate::store::SharedStore;
use crate::timers::{Fire, FireTarget, Firing, Scheduler, SchedulerHandle};

/// Routes each [`EntityCommand`] to its entity's
/// [`EntityActor`](crate::EntityActor), starting (and so restoring) the
/// actor when the entity has none. For users it is
/// [`UserStateManager`](crate::UserStateManager); most programs reach it
/// through the typed handle [`Entities`](crate::Entities).
///
/// The entities are split into shards by the hash of their key, one shard
/// per [`Config::arbiters`] (one on the manager's own thread when it is 0).
/// A shard owns its entities' actors and runs them on its own thread, so a
/// command crosses threads once on its way to the actor; the typed handle
/// picks the shard in the caller's thread, a message sent to this actor's
/// address is passed on to it. [`Config::max_commands_in_flight`] and
/// [`Config::max_resident`] bound all shards together, and
/// [`GetManagerStats`] sums theirs.
///
/// Passivation is a handshake, as in Pekko's cluster sharding: an idle actor
/// asks to be passivated; from then on its shard holds back new commands for
/// that entity and sends the actor a `Passivate` message behind everything
/// already forwarded. The actor handles those first, then stops; when it has
/// stopped (its last write committed), the held-back commands go to a new
/// actor, which restores the committed state first. No command is lost,
/// bounced with a mailbox error, or applied twice. At most
/// [`Config::max_queued_per_entity`] commands are held per entity, the bound
/// of a live actor's queue: beyond it they are refused at once with
/// [`CommandError::Overloaded`](crate::CommandError::Overloaded).
///
/// ```
/// use persist_durable::{Command, SqliteStore, UserCommand, UserKey, UserStateManager, Config};
/// use actix::Actor;
/// use std::sync::Arc;
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let dir = tempfile::tempdir()?;
///     let store = SqliteStore::open(dir.path().join("user-state.db")).await?;
///     let manager = UserStateManager::new(Arc::new(store), Config::default()).start();
///     let key = UserKey::new("mall001", "user001")?;
///     let state = manager.send(UserCommand::new(key, Command::UserLogin)).await??;
///     assert!(state.last_login.is_some());
///     Ok(())
/// }
/// ```
pub struct EntityManager<E: DurableEntity> {
    store: SharedStore,
    config: Config,
    /// Boxed: settings need not be `Unpin`, an actor must be.
    settings: Box<E::Settings>,
    /// Set when the manager starts.
    shards: Option<Shards<E>>,
    /// The shards' threads; empty: the one shard runs on the manager's.
    arbiters: Vec<Arbiter>,
}

/// The shards of one manager, in placement order, and how keys spread over
/// them, with the manager's timer scheduler.
pub(crate) struct Shards<E: DurableEntity> {
    shards: Arc<[Addr<Shard<E>>]>,
    spread: Spread,
    scheduler: Option<SchedulerHandle>,
}

impl<E: DurableEntity> Shards<E> {
    /// The shard that owns `key`.
    pub(crate) fn of(&self, key: &E::Key) -> &Addr<Shard<E>> {
        &self.shards[self.spread.shard_of(key)]
    }

    /// Queues `event` for `key` at its shard now, in order; the answer comes
    /// straight from the entity's actor.
    pub(crate) fn send(&self, key: E::Key, event: EntityEvent<E::Command>) -> impl Future<Output = Answer<E>> + Send {
        self.route(key, Work::Command(event))
    }

    /// Queues a timer's `fire` for `key` at its shard now: delivered like a
    /// command, and answered once its write commits.
    pub(crate) fn fire(&self, key: E::Key, fire: Fire) -> impl Future<Output = Answer<E>> + Send {
        self.route(key, Work::Fire(Box::new(fire)))
    }

    fn route(&self, key: E::Key, work: Work<E::Command>) -> impl Future<Output = Answer<E>> + Send {
        let (reply, answer) = oneshot::channel();
        self.of(&key).do_send(RouteCommand {
            key: key.clone(),
            work,
            reply,
        });
        // Dropped unanswered: the shard or the actor stopped first.
        async move { answer.await.unwrap_or_else(|_| Err(stopped_before_answering(&key))) }
    }

    /// Queues an ingest's `records` for `key` at its shard now.
    pub(crate) fn send_records(&self, key: E::Key, records: Records<E>) -> impl Future<Output = Vec<Answer<E>>> + Send {
        let len = records.len();
        let request = self.of(&key).send(EntityRecords {
            key: key.clone(),
            records,
        });
        async move {
            request
                .await
                .unwrap_or_else(|error| EntityRecords::undelivered(&key, len, &format!("the manager is gone: {error}")))
        }
    }

    /// Hands `keys` over, each by its shard.
    pub(crate) fn hand_over(&self, keys: Vec<E::Key>) {
        let mut per_shard: Vec<Vec<E::Key>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for key in keys {
            per_shard[self.spread.shard_of(&key)].push(key);
        }
        for (shard, keys) in self.shards.iter().zip(per_shard) {
            if !keys.is_empty() {
                shard.do_send(HandOver(keys));
            }
        }
    }

    /// Purges every shard's idle rows now (see [`PurgeIdle`]); the counts
    /// summed, the first failure the answer.
    pub(crate) async fn purge_idle(&self) -> Result<u64, StoreError> {
        let requests: Vec<_> = self.shards.iter().map(|shard| shard.send(PurgeIdle)).collect();
        let mut purged = 0;
        for request in requests {
            purged += request.await.map_err(|_| StoreError::Stopped)??;
        }
        Ok(purged)
    }

    /// Whether `key` has an actor that is not passivating.
    pub(crate) async fn is_resident(&self, key: &E::Key) -> Result<bool, ManagerStopped> {
        self.of(key)
            .send(IsResident(key.clone()))
            .await
            .map_err(|_| ManagerStopped)
    }

    /// Passivates the entities of `slices` (this node no longer owns them),
    /// each shard its own.
    pub(crate) fn hand_over_slices(&self, slices: &[crate::entity::Slice]) {
        let slices: Arc<[crate::entity::Slice]> = slices.into();
        for shard in self.shards.iter() {
            shard.do_send(HandOverSlices(slices.clone()));
        }
    }

    /// Whether `key` has an actor, passivating or not.
    pub(crate) async fn has_actor(&self, key: &E::Key) -> Result<bool, ManagerStopped> {
        self.of(key)
            .send(HasActor(key.clone()))
            .await
            .map_err(|_| ManagerStopped)
    }

    /// Fires every timer due by the clock's now, and returns once each is
    /// answered (the testkit's `advance`).
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) async fn fire_due(&self) {
        if let Some(scheduler) = &self.scheduler {
            scheduler.fire_due().await;
        }
    }

    /// Stops every shard gracefully (see [`Drain`]), and the firing of
    /// timers; true once all have.
    pub(crate) async fn drain(&self) -> bool {
        if let Some(scheduler) = &self.scheduler {
            scheduler.stop();
        }
        let drained: Vec<_> = self
            .shards
            .iter()
            .map(|shard| {
                let (reply, drained) = oneshot::channel();
                shard.do_send(Drain(reply));
                drained
            })
            .collect();
        let mut all = true;
        for shard in drained {
            all &= shard.await.is_ok();
        }
        all
    }

    /// The counters of all shards, summed; a shard that cannot answer counts nothing.
    pub(crate) async fn stats(&self) -> ManagerStats {
        // Each request is queued when made: the shards answer concurrently.
        let requests: Vec<_> = self.shards.iter().map(|shard| shard.send(GetManagerStats)).collect();
        let mut sum = ManagerStats::default();
        for request in requests {
            if let Ok(stats) = request.await {
                sum = sum.add(stats);
            }
        }
        sum
    }
}

impl<E: DurableEntity> Clone for Shards<E> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
            spread: self.spread.clone(),
            scheduler: self.scheduler.clone(),
        }
    }
}

impl<E: DurableEntity> EntityManager<E> {
    /// A manager whose entity actors persist to `store` and behave as
    /// `config` says, with the entity's default settings.
    pub fn new(store: SharedStore, config: Config) -> Self {
        Self::with_settings(store, config, E::Settings::default())
    }

    /// A manager whose entities' transitions use `settings`.
    pub fn with_settings(store: SharedStore, config: Config, settings: E::Settings) -> Self {
        Self {
            store,
            config,
            settings: Box::new(settings),
            shards: None,
            arbiters: Vec::new(),
        }
    }

    /// Starts the manager and its shards, returning both: the typed handle
    /// sends commands to the shards directly.
    pub(crate) fn start_with_shards(mut self) -> (Addr<Self>, Shards<E>) {
        let shards = self.shards();
        (start_unbounded(self, None), shards)
    }

    /// The shards: one per arbiter (one on this thread without arbiters),
    /// started on first need, with the timer scheduler (on this thread).
    fn shards(&mut self) -> Shards<E> {
        if let Some(shards) = &self.shards {
            return shards.clone();
        }
        self.arbiters = (0..self.config.arbiters).map(|_| Arbiter::new()).collect();
        let spread = Spread::new(self.arbiters.len().max(1));
        let counters = ShardCounters::default();
        // The scheduler fires through the shards, and the shards' actors
        // tell it of the timers they set: made first, started after.
        let started = Arc::new(std::sync::OnceLock::new());
        let scheduler = self.config.timers.map(|timers| {
            let ownership = self.config.cluster.as_ref().map(|cluster| cluster.ownership().clone());
            let target = Arc::new(ToShards(started.clone()));
            Scheduler::new(
                E::ENTITY_TYPE,
                self.store.clone(),
                timers,
                self.config.clock.clone(),
                ownership,
                target,
            )
        });
        let (scheduler, handle) = match scheduler {
            Some((scheduler, handle)) => (Some(scheduler), Some(handle)),
            None => (None, None),
        };
        let shards: Arc<[Addr<Shard<E>>]> = (0..spread.shards())
            .map(|index| {
                let shared = Shared {
                    store: self.store.clone(),
                    config: self.config.clone(),
                    settings: E::Settings::clone(&self.settings),
                    manager: None,
                    scheduler: handle.clone(),
                };
                let shard = Shard::new(Arc::new(shared), Placement::new(index, spread.clone()), &counters);
                start_unbounded(shard, self.arbiters.get(index).map(Arbiter::handle).as_ref())
            })
            .collect();
        let shards = Shards {
            shards,
            spread,
            scheduler: handle,
        };
        self.shards = Some(shards.clone());
        let _ = started.set(shards.clone());
        if let Some(scheduler) = scheduler {
            actix::spawn(scheduler.run());
        }
        shards
    }
}

impl<E: DurableEntity> Actor for EntityManager<E> {
    type Context = Context<Self>;

    /// Starts the manager with an unbounded mailbox (callers burst far beyond
    /// actix's default of 16 queued messages), and its shards.
    fn start(self) -> Addr<Self> {
        self.start_with_shards().0
    }

    /// Started some other way than [`start`](Actor::start): the shards start now.
    fn started(&mut self, _ctx: &mut Self::Context) {
        self.shards();
    }

    /// Never of its own accord: the shards hold what callers sent, and
    /// dropping the manager's last address (`start().send(..)` in one
    /// expression) must not drop that. It lives as long as its system.
    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        Running::Continue
    }
}

impl<E: DurableEntity> Handler<EntityCommand<E>> for EntityManager<E> {
    type Result = ResponseFuture<Answer<E>>;

    fn handle(&mut self, EntityCommand { key, event }: EntityCommand<E>, _ctx: &mut Self::Context) -> Self::Result {
        // Queued at the shard now, so commands keep the order they came in.
        Box::pin(self.shards().send(key, event))
    }
}

impl<E: DurableEntity> Handler<EntityRecords<E>> for EntityManager<E> {
    type Result = ResponseFuture<Vec<Answer<E>>>;

    fn handle(&mut self, EntityRecords { key, records }: EntityRecords<E>, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.shards().send_records(key, records))
    }
}

impl<E: DurableEntity> Handler<HandOver<E>> for EntityManager<E> {
    type Result = ();

    fn handle(&mut self, HandOver(keys): HandOver<E>, _ctx: &mut Self::Context) {
        self.shards().hand_over(keys);
    }
}

impl<E: DurableEntity> Handler<GetManagerStats> for EntityManager<E> {
    type Result = ResponseFuture<ManagerStats>;

    fn handle(&mut self, _: GetManagerStats, _ctx: &mut Self::Context) -> Self::Result {
        let shards = self.shards();
        Box::pin(async move { shards.stats().await })
    }
}

impl<E: DurableEntity> Handler<StopGracefully> for EntityManager<E> {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _: StopGracefully, _ctx: &mut Self::Context) -> Self::Result {
        let shards = self.shards();
        Box::pin(async move { shards.drain().await })
    }
}

impl<E: DurableEntity> Handler<PurgeIdle> for EntityManager<E> {
    type Result = ResponseFuture<Result<u64, StoreError>>;

    /// Each shard purges the rows of its own keys; the counts are summed,
    /// and the first failure is the answer.
    fn handle(&mut self, _: PurgeIdle, _ctx: &mut Self::Context) -> Self::Result {
        let shards = self.shards();
        Box::pin(async move { shards.purge_idle().await })
    }
}

/// The scheduler's way to its manager's shards, set once they are started.
struct ToShards<E: DurableEntity>(Arc<std::sync::OnceLock<Shards<E>>>);

impl<E: DurableEntity> FireTarget for ToShards<E> {
    fn fire(&self, key: crate::entity::PersistenceId, fire: Fire) -> Firing {
        let Some(shards) = self.0.get() else {
            return Box::pin(async { Err("the manager is starting".to_owned()) });
        };
        let Some(entity) = key.key::<E::Key>() else {
            tracing::error!(%key, timer = %fire.name, "a stored timer names no entity of this type; it is not fired");
            return Box::pin(async { Err("the timer's persistence id is not a key".to_owned()) });
        };
        let answer = shards.fire(entity, fire);
        Box::pin(async move { answer.await.map(drop).map_err(|error| error.to_string()) })
    }
}
