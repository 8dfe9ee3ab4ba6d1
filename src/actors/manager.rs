use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::debug;

use super::entity_actor::{EntityActor, Records, Shared, Supervisor};
use super::protocol::{ChildEvent, FromChild, Passivate};
use super::start_unbounded;
use crate::config::Config;
use crate::entity::{DurableEntity, EntityEvent};
use crate::error::CommandError;
use crate::store::SharedStore;

mod delivery;
mod retention;

use delivery::{Batch, Delivery, Held, One};
pub use retention::PurgeIdle;

/// A command for one entity, sent to its [`EntityManager`]; for users it is
/// [`UserCommand`](crate::UserCommand).
#[derive(Debug, Clone)]
pub struct EntityCommand<E: DurableEntity> {
    /// The entity.
    pub key: E::Key,
    /// What is asked of it, with the event's id and time if known.
    pub event: EntityEvent<E::Command>,
}

impl<E: DurableEntity> Message for EntityCommand<E> {
    type Result = Result<E, CommandError<E>>;
}

impl<E: DurableEntity> EntityCommand<E> {
    /// `command` (a command or an [`EntityEvent`] of it) for the entity `key`.
    pub fn new(key: E::Key, command: impl Into<EntityEvent<E::Command>>) -> Self {
        Self {
            key,
            event: command.into(),
        }
    }

    /// The command itself.
    pub fn command(&self) -> &E::Command {
        &self.event.command
    }
}

/// Asks a manager for its counters.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ManagerStats")]
pub struct GetManagerStats;

/// What a manager has done since it started.
///
/// A passivation has one of three causes, counted apart when it begins:
/// [`idle_passivations`](Self::idle_passivations),
/// [`evictions`](Self::evictions) and [`handovers`](Self::handovers).
/// [`passivations`](Self::passivations) counts those of any cause that have
/// completed (the actor stopped), so once no entity is passivating it is
/// their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Entities with an actor now (passivating ones included).
    pub resident_users: usize,
    /// Actors started: first activations and restores after passivation.
    pub activations: u64,
    /// Passivations completed, of any cause: idleness, eviction or hand-over.
    pub passivations: u64,
    /// Entities whose actor asked to be passivated because it was idle for
    /// [`Config::idle_timeout`].
    pub idle_passivations: u64,
    /// Commands that arrived while their entity was passivating and were
    /// held for its next actor (at most [`Config::max_queued_per_user`] at a
    /// time per entity; beyond it they are refused).
    pub commands_held_during_passivation: u64,
    /// Entities passivated early because [`Config::max_resident_users`] was reached.
    pub evictions: u64,
    /// Entities passivated because the ingest feeding them lost their
    /// source partition to another node (a rebalance).
    pub handovers: u64,
    /// Rows removed by this manager's retention purges ([`Config::retention`], [`PurgeIdle`]).
    pub purged: u64,
    /// Commands refused with [`CommandError::Overloaded`] by the manager:
    /// beyond [`Config::max_commands_in_flight`], or beyond
    /// [`Config::max_queued_per_user`] held for a passivating entity.
    pub commands_refused: u64,
}

/// Routes each [`EntityCommand`] to its entity's [`EntityActor`], starting
/// (and so restoring) the actor when the entity has none. For users it is
/// [`UserStateManager`](crate::UserStateManager); most programs reach it
/// through the typed handle [`Entities`](crate::Entities).
///
/// Passivation is a handshake, as in Pekko's cluster sharding: an idle actor
/// asks to be passivated; from then on the manager holds back new commands
/// for that entity and sends the actor a `Passivate` message behind
/// everything already forwarded. The actor handles those first, then stops;
/// when it has stopped (its last write committed), the held-back commands go
/// to a new actor, which restores the committed state first. No command is
/// lost, bounced with a mailbox error, or applied twice. At most
/// [`Config::max_queued_per_user`] commands are held per entity, the bound
/// of a live actor's queue: beyond it the manager refuses them at once with
/// [`CommandError::Overloaded`].
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
    /// The configuration, settings and this manager's recipient, shared by every child.
    shared: Arc<Shared<E>>,
    /// Where entity actors run; empty: on the manager's own arbiter.
    arbiters: Vec<Arbiter>,
    children: HashMap<E::Key, Child<E>>,
    stats: ManagerStats,
    next_incarnation: u64,
    /// Commands forwarded and not yet answered, across all entities.
    in_flight: Arc<AtomicUsize>,
    /// A logical clock: one tick per command, to find the least recently used entities.
    ticks: u64,
    /// Children in [`Phase::Passivating`]; changed only with their phase.
    passivating: usize,
    /// The retention purge under way and the commands it holds back.
    retention: retention::Retention<E>,
}

struct Child<E: DurableEntity> {
    addr: Addr<EntityActor<E>>,
    incarnation: u64,
    /// The tick of the last command for this entity.
    last_used: u64,
    phase: Phase<E>,
}

/// Where a child is in its life.
enum Phase<E: DurableEntity> {
    /// Commands go straight to it.
    Active,
    /// Told to passivate: commands wait here for its successor, at most
    /// [`Config::max_queued_per_user`] of them.
    Passivating {
        held: Vec<Held<E>>,
        cause: PassivationCause,
    },
}

/// Why a child is passivated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassivationCause {
    /// It was idle and asked for it.
    Idle,
    /// [`Config::max_resident_users`] was reached and it was least recently used.
    Evicted,
    /// The ingest that fed it lost its source partition to another node,
    /// which must find the state as committed.
    HandedOver,
}

impl PassivationCause {
    /// The `cause` label of `persist_durable_passivations_total`.
    fn label(self) -> &'static str {
        match self {
            PassivationCause::Idle => "idle",
            PassivationCause::Evicted => "evicted",
            PassivationCause::HandedOver => "handed_over",
        }
    }
}

impl<E: DurableEntity> EntityManager<E> {
    /// A manager whose entity actors persist to `store` and behave as
    /// `config` says, with the entity's settings from
    /// [`DurableEntity::settings`].
    pub fn new(store: SharedStore, config: Config) -> Self {
        let settings = E::settings(&config);
        Self::with_settings(store, config, settings)
    }

    /// A manager whose entities' transitions use `settings`.
    pub fn with_settings(store: SharedStore, config: Config, settings: E::Settings) -> Self {
        let shared = Shared {
            config,
            settings,
            manager: None,
        };
        Self {
            store,
            arbiters: Vec::new(),
            shared: Arc::new(shared),
            children: HashMap::new(),
            stats: ManagerStats::default(),
            next_incarnation: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
            ticks: 0,
            passivating: 0,
            retention: retention::Retention::default(),
        }
    }

    /// Tells `key`'s child to passivate, holding its later commands, and
    /// counts it under `cause`; false if it is unknown or already passivating.
    fn begin_passivation(&mut self, key: &E::Key, cause: PassivationCause) -> bool {
        let Some(child) = self.children.get_mut(key) else {
            return false;
        };
        if let Phase::Passivating { .. } = child.phase {
            return false;
        }
        child.phase = Phase::Passivating {
            held: Vec::new(),
            cause,
        };
        child.addr.do_send(Passivate);
        self.passivating += 1;
        match cause {
            PassivationCause::Idle => self.stats.idle_passivations += 1,
            PassivationCause::Evicted => self.stats.evictions += 1,
            PassivationCause::HandedOver => self.stats.handovers += 1,
        }
        true
    }

    /// Passivates the least recently used entities once there are more than
    /// [`Config::max_resident_users`]: a hundredth of the limit at a time, so
    /// the scan is paid once per many activations.
    fn evict_least_recently_used(&mut self) {
        let limit = self.shared.config.max_resident_users;
        // Entities already passivating are on their way out: they do not count.
        let active = self.children.len() - self.passivating;
        if active <= limit {
            return;
        }
        let excess = active - limit + limit / 100;
        let mut candidates: Vec<(u64, E::Key)> = self
            .children
            .iter()
            .filter(|(_, child)| matches!(child.phase, Phase::Active))
            .map(|(key, child)| (child.last_used, key.clone()))
            .collect();
        let excess = excess.min(candidates.len());
        if excess == 0 {
            return;
        }
        candidates.select_nth_unstable_by_key(excess - 1, |(last_used, _)| *last_used);
        for (_, key) in candidates.into_iter().take(excess) {
            self.begin_passivation(&key, PassivationCause::Evicted);
        }
    }

    fn spawn_child(&mut self, key: &E::Key) -> Child<E> {
        self.next_incarnation += 1;
        self.stats.activations += 1;
        metrics::counter!("persist_durable_activations_total", "entity" => E::ENTITY_TYPE).increment(1);
        let supervisor = Supervisor {
            incarnation: self.next_incarnation,
            passivation_requested: false,
        };
        let actor = EntityActor::with_shared(key.clone(), self.store.clone(), self.shared.clone(), Some(supervisor));
        // Round robin: consecutive activations land on different threads.
        let arbiter = (!self.arbiters.is_empty())
            .then(|| self.arbiters[(self.next_incarnation % self.arbiters.len() as u64) as usize].handle());
        let addr = start_unbounded(actor, arbiter.as_ref());
        Child {
            addr,
            incarnation: self.next_incarnation,
            last_used: self.ticks,
            phase: Phase::Active,
        }
    }

    fn report_resident(&self) {
        metrics::gauge!("persist_durable_resident_users", "entity" => E::ENTITY_TYPE).set(self.children.len() as f64);
    }
}

impl<E: DurableEntity> Actor for EntityManager<E> {
    type Context = Context<Self>;

    /// Starts the manager with an unbounded mailbox: callers burst far beyond
    /// actix's default of 16 queued messages.
    fn start(self) -> Addr<Self> {
        start_unbounded(self, None)
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.arbiters = (0..self.shared.config.arbiters).map(|_| Arbiter::new()).collect();
        // Children report through this one recipient, shared by all of them.
        let manager = Some(ctx.address().recipient());
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.manager = manager,
            None => {
                self.shared = Arc::new(Shared {
                    config: self.shared.config.clone(),
                    settings: self.shared.settings.clone(),
                    manager,
                })
            }
        }
        self.schedule_retention(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// Counts commands in flight until they are answered.
struct InFlight(Arc<AtomicUsize>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// The commands in `held`: what counts against [`Config::max_queued_per_user`].
fn held_commands<E: DurableEntity>(held: &[Held<E>]) -> usize {
    held.iter().map(Held::len).sum()
}

/// Keeps `delivery` in `held` for the entity's next actor and answers with
/// that actor's reply, counted in flight until then; `gone` says why if the
/// manager stops first.
fn hold<E: DurableEntity, D: Delivery<E>>(
    held: &mut Vec<Held<E>>,
    key: E::Key,
    delivery: D,
    in_flight: InFlight,
    gone: &'static str,
) -> ResponseFuture<D::Answer> {
    let (reply, answer) = oneshot::channel();
    let len = delivery.len();
    held.push(delivery.held(reply));
    Box::pin(async move {
        let _counted = in_flight;
        answer.await.unwrap_or_else(|_| D::undelivered(len, key, gone))
    })
}

impl<E: DurableEntity> Handler<EntityCommand<E>> for EntityManager<E> {
    type Result = ResponseFuture<Result<E, CommandError<E>>>;

    fn handle(&mut self, EntityCommand { key, event }: EntityCommand<E>, _ctx: &mut Self::Context) -> Self::Result {
        self.route(key, One(event))
    }
}

/// Records of one source partition for one entity, from an ingest: queued
/// at the entity together, answered one result per record.
pub(crate) struct EntityRecords<E: DurableEntity> {
    pub(crate) key: E::Key,
    pub(crate) records: Records<E>,
}

impl<E: DurableEntity> Message for EntityRecords<E> {
    type Result = Vec<Result<E, CommandError<E>>>;
}

impl<E: DurableEntity> Handler<EntityRecords<E>> for EntityManager<E> {
    type Result = ResponseFuture<Vec<Result<E, CommandError<E>>>>;

    fn handle(&mut self, EntityRecords { key, records }: EntityRecords<E>, _ctx: &mut Self::Context) -> Self::Result {
        self.route(key, Batch(records))
    }
}

/// Passivates these entities (those not passivating already) once what was
/// sent to them is committed, so that whoever writes them next finds the
/// committed state: what an ingest asks when its partitions move to another
/// node. Answered once every one of them has been told to passivate.
pub(crate) struct HandOver<E: DurableEntity>(pub(crate) Vec<E::Key>);

impl<E: DurableEntity> Message for HandOver<E> {
    type Result = ();
}

impl<E: DurableEntity> Handler<HandOver<E>> for EntityManager<E> {
    type Result = ();

    fn handle(&mut self, HandOver(keys): HandOver<E>, _ctx: &mut Self::Context) {
        for key in keys {
            self.begin_passivation(&key, PassivationCause::HandedOver);
        }
    }
}

impl<E: DurableEntity> EntityManager<E> {
    /// Routes `delivery` to `key`'s actor, starting one if needed, or holds
    /// it while the entity passivates or its row is purged.
    fn route<D: Delivery<E>>(&mut self, key: E::Key, delivery: D) -> ResponseFuture<D::Answer> {
        let len = delivery.len();
        if self.in_flight.load(Ordering::Relaxed) + len > self.shared.config.max_commands_in_flight {
            let limit = self.shared.config.max_commands_in_flight;
            return self.refuse(key, delivery, format!("{limit} commands are already in flight"));
        }
        self.in_flight.fetch_add(len, Ordering::Relaxed);
        let in_flight = InFlight(self.in_flight.clone(), len);
        self.ticks += 1;
        if self.is_being_purged(&key) {
            return self.hold_during_purge(key, delivery, in_flight);
        }
        if !self.children.contains_key(&key) {
            let child = self.spawn_child(&key);
            self.children.insert(key.clone(), child);
            self.evict_least_recently_used();
            self.report_resident();
        }
        let Some(child) = self.children.get_mut(&key) else {
            unreachable!("inserted above")
        };
        child.last_used = self.ticks;
        let max_held = self.shared.config.max_queued_per_user;
        match &mut child.phase {
            Phase::Active => {
                let answer = delivery.forward(key, &child.addr);
                Box::pin(async move {
                    let _counted = in_flight;
                    answer.await
                })
            }
            // The same bound as a live actor's queue: refused here, not by the successor.
            Phase::Passivating { held, .. } if held_commands(held) + len > max_held => self.refuse(
                key,
                delivery,
                format!("{max_held} commands are already queued for this entity while it passivates"),
            ),
            Phase::Passivating { held, .. } => {
                self.stats.commands_held_during_passivation += len as u64;
                hold(
                    held,
                    key,
                    delivery,
                    in_flight,
                    "the manager stopped while the entity was passivating",
                )
            }
        }
    }

    /// Refuses `delivery` with [`CommandError::Overloaded`], counted.
    fn refuse<D: Delivery<E>>(&mut self, key: E::Key, delivery: D, reason: String) -> ResponseFuture<D::Answer> {
        self.stats.commands_refused += delivery.len() as u64;
        let answer = delivery.refuse(key, reason);
        Box::pin(async move { answer })
    }
}

impl<E: DurableEntity> Handler<FromChild<E::Key>> for EntityManager<E> {
    type Result = ();

    fn handle(&mut self, message: FromChild<E::Key>, _ctx: &mut Self::Context) {
        // A message from an earlier incarnation is about an actor already replaced.
        let current = self
            .children
            .get(&message.key)
            .is_some_and(|child| child.incarnation == message.incarnation);
        if !current {
            return;
        }
        match message.event {
            ChildEvent::PassivationRequested => {
                self.begin_passivation(&message.key, PassivationCause::Idle);
            }
            ChildEvent::Stopped => self.child_stopped(message.key),
        }
    }
}

impl<E: DurableEntity> EntityManager<E> {
    /// Hands the commands held for a stopped child to its successor.
    fn child_stopped(&mut self, key: E::Key) {
        let Some(child) = self.children.remove(&key) else {
            return;
        };
        let held = match child.phase {
            Phase::Active => Vec::new(),
            Phase::Passivating { held, cause } => {
                self.passivating -= 1;
                self.stats.passivations += 1;
                metrics::counter!(
                    "persist_durable_passivations_total",
                    "entity" => E::ENTITY_TYPE,
                    "cause" => cause.label()
                )
                .increment(1);
                held
            }
        };
        self.report_resident();
        debug!(key = %key, held = held.len(), "entity actor stopped");
        if held.is_empty() {
            return;
        }
        self.start_with_held(key, held);
    }

    /// Starts a new actor for `key` (which restores what the store holds) and
    /// hands it the commands held for it, in order.
    fn start_with_held(&mut self, key: E::Key, held: Vec<Held<E>>) {
        let successor = self.spawn_child(&key);
        for delivery in held {
            // Counted in flight already, by the handler's future waiting on its reply.
            delivery.forward_to(key.clone(), &successor.addr);
        }
        self.children.insert(key, successor);
    }
}

impl<E: DurableEntity> Handler<GetManagerStats> for EntityManager<E> {
    type Result = MessageResult<GetManagerStats>;

    fn handle(&mut self, _: GetManagerStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(ManagerStats {
            resident_users: self.children.len(),
            ..self.stats
        })
    }
}
