//! One shard of an [`EntityManager`](crate::EntityManager): it owns the
//! entities whose keys hash to it, runs their actors on its own thread, and
//! hides their passivation from callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakAddr;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::contain::Shown;
use super::entity_actor::{Answer, EntityActor, Shared};
use super::messages::{EntityRecords, GetManagerStats, HandOver, ManagerStats};
use super::placement::Placement;
use super::protocol::{ChildEvent, FromChild, InFlight, Passivate, ReplyTo};
use super::round::Work;
use super::start_unbounded;
use crate::entity::DurableEntity;

mod delivery;
mod retention;

/// The most children a shard reserves room for when it starts: a table of
/// 2^20 buckets, whose control bytes (1 MiB) are the only part touched
/// before use, so a very large resident limit on many cores stays cheap.
const MAX_RESERVED: usize = 1 << 19;

/// What the shards of one manager count together.
#[derive(Clone, Default)]
pub(crate) struct ShardCounters {
    /// Commands forwarded and not yet answered: what
    /// [`Config::max_commands_in_flight`](crate::Config::max_commands_in_flight) bounds.
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Entities with an actor that is not passivating.
    pub(crate) active: Arc<AtomicUsize>,
}

use delivery::{Batch, Delivery, Held, One};

/// Owns the entities of one shard: routes each command to its entity's
/// [`EntityActor`], starting (and so restoring) the actor when the entity
/// has none, on the shard's own thread.
///
/// Passivation is a handshake, as in Pekko's cluster sharding: an idle actor
/// asks to be passivated; from then on the shard holds back new commands
/// for that entity and sends the actor a `Passivate` message behind
/// everything already forwarded. The actor handles those first, then stops;
/// when it has stopped (its last write committed), the held-back commands go
/// to a new actor, which restores the committed state first. No command is
/// lost, bounced with a mailbox error, or applied twice. At most
/// [`Config::max_queued_per_entity`](crate::Config::max_queued_per_entity)
/// commands are held per entity, the bound of a live actor's queue: beyond
/// it the shard refuses them at once with
/// [`CommandError::Overloaded`](crate::CommandError::Overloaded).
pub(crate) struct Shard<E: DurableEntity> {
    /// The store, configuration, settings and this shard's recipient, shared by every child.
    shared: Arc<Shared<E>>,
    /// Which keys are this shard's.
    placement: Placement,
    /// Keyed by ids from outside (HTTP paths, Kafka keys): std's
    /// DoS-resistant hasher, not a faster one. Sized for the shard's share
    /// of the resident limit from the start: growing would copy every entry
    /// and leave the old table's pages behind in the allocator. Untouched
    /// pages of the reserved table cost no memory.
    children: HashMap<E::Key, Child<E>>,
    /// The children told to passivate (the others are active).
    passivating: HashMap<E::Key, Passivating<E>>,
    stats: ManagerStats,
    next_incarnation: u32,
    /// Commands forwarded and not yet answered, across all shards of the manager.
    in_flight: Arc<AtomicUsize>,
    /// A logical clock: one tick per command, to find the least recently used entities.
    ticks: u32,
    /// Entities with an actor that is not passivating, across all shards:
    /// what [`Config::max_resident`](crate::Config::max_resident) bounds.
    active: Arc<AtomicUsize>,
    /// The retention purge under way and the commands it holds back.
    retention: retention::Retention<E>,
    /// Stopping gracefully ([`Drain`]): who waits for the last child to
    /// stop. Commands that arrive meanwhile are not delivered.
    draining: Option<Vec<oneshot::Sender<()>>>,
}

/// A child in the shard's map: with its key, a 24-byte entry, most of what a
/// resident entity costs the shard.
struct Child<E: DurableEntity> {
    /// Weak: a strong address holds two allocations of its own per entity.
    /// The actor lives on without it, as its idle check keeps its context
    /// busy until the actor stops itself.
    addr: WeakAddr<EntityActor<E>>,
    incarnation: u32,
    /// The tick of the last command for this entity (ticks wrap; ages do not).
    last_used: u32,
}

impl<E: DurableEntity> Child<E> {
    /// The actor's address; `None` once it has stopped, when whatever is
    /// sent to it would be dropped unanswered anyway.
    fn addr(&self) -> Option<Addr<EntityActor<E>>> {
        self.addr.upgrade()
    }
}

/// A child told to passivate: commands wait here for its successor. Kept
/// beside the children, not in them, so that the resident majority pays
/// nothing for it.
struct Passivating<E: DurableEntity> {
    /// Commands for the successor, at most
    /// [`Config::max_queued_per_entity`](crate::Config::max_queued_per_entity).
    held: Vec<Held<E>>,
    cause: PassivationCause,
}

/// Why a child is passivated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassivationCause {
    /// It was idle and asked for it.
    Idle,
    /// [`Config::max_resident`](crate::Config::max_resident) was reached and it was least recently used.
    Evicted,
    /// The ingest that fed it lost its source partition to another node,
    /// which must find the state as committed.
    HandedOver,
    /// Its manager stops gracefully.
    Stopped,
}

impl PassivationCause {
    /// The `cause` label of `persist_durable_passivations_total`.
    fn label(self) -> &'static str {
        match self {
            PassivationCause::Idle => "idle",
            PassivationCause::Evicted => "evicted",
            PassivationCause::HandedOver => "handed_over",
            PassivationCause::Stopped => "stopped",
        }
    }
}

impl<E: DurableEntity> Shard<E> {
    /// The shard at `placement`, its actors persisting to `store`, sharing
    /// `in_flight` with the other shards; `shared` is completed with the
    /// shard's own address when it starts.
    pub(crate) fn new(shared: Arc<Shared<E>>, placement: Placement, counters: &ShardCounters) -> Self {
        let ShardCounters { in_flight, active } = counters.clone();
        let children = HashMap::with_capacity(placement.share_of(shared.config.max_resident).min(MAX_RESERVED));
        Self {
            shared,
            placement,
            children,
            passivating: HashMap::new(),
            stats: ManagerStats::default(),
            next_incarnation: 0,
            in_flight,
            ticks: 0,
            active,
            retention: retention::Retention::default(),
            draining: None,
        }
    }

    /// Tells `key`'s child to passivate, holding its later commands, and
    /// counts it under `cause`; false if it is unknown or already passivating.
    fn begin_passivation(&mut self, key: &E::Key, cause: PassivationCause) -> bool {
        let begun = self.passivate_child(key, cause);
        if begun {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        begun
    }

    /// [`begin_passivation`](Self::begin_passivation) without counting the
    /// child out of [`active`](Self::active): for children already counted out.
    fn passivate_child(&mut self, key: &E::Key, cause: PassivationCause) -> bool {
        let Some(child) = self.children.get(key) else {
            return false;
        };
        if self.passivating.contains_key(key) {
            return false;
        }
        let passivating = Passivating {
            held: Vec::new(),
            cause,
        };
        let alive = child.addr();
        self.passivating.insert(key.clone(), passivating);
        match alive {
            Some(addr) => addr.do_send(Passivate),
            // Gone already: it will never report having stopped.
            None => self.child_stopped(key.clone()),
        }
        match cause {
            PassivationCause::Idle => self.stats.idle_passivations += 1,
            PassivationCause::Evicted => self.stats.evictions += 1,
            PassivationCause::HandedOver => self.stats.handovers += 1,
            PassivationCause::Stopped => {}
        }
        true
    }

    /// Passivates least recently used entities of this shard, other than
    /// `started` (the one whose activation brought this about), once all
    /// shards together hold more than
    /// [`Config::max_resident`](crate::Config::max_resident):
    /// the excess and a hundredth of the limit more, so the scan is paid once
    /// per many activations. A shard with nothing to evict leaves the excess
    /// to the next activation.
    fn evict_least_recently_used(&mut self, started: &E::Key) {
        let limit = self.shared.config.max_resident;
        if self.active.load(Ordering::Relaxed) <= limit {
            return;
        }
        let now = self.ticks;
        let mut candidates: Vec<(std::cmp::Reverse<u32>, E::Key)> = self
            .children
            .iter()
            .filter(|(key, _)| *key != started && !self.passivating.contains_key(key))
            .map(|(key, child)| (std::cmp::Reverse(now.wrapping_sub(child.last_used)), key.clone()))
            .collect();
        // Claimed at once, so that shards evicting at the same time never
        // evict the same excess twice.
        let claim = |active: usize| {
            let excess = (active.saturating_sub(limit) + limit / 100).min(candidates.len());
            (active > limit && excess > 0).then(|| active - excess)
        };
        let Ok(before) = self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, claim) else {
            return;
        };
        let excess = before - claim(before).unwrap_or(before);
        // The oldest first.
        candidates.select_nth_unstable_by_key(excess - 1, |(age, _)| *age);
        for (_, key) in candidates.into_iter().take(excess) {
            self.passivate_child(&key, PassivationCause::Evicted);
        }
    }

    fn spawn_child(&mut self, key: &E::Key) -> Child<E> {
        // 0 is never an incarnation.
        let incarnation =
            std::num::NonZeroU32::new(self.next_incarnation.wrapping_add(1)).unwrap_or(std::num::NonZeroU32::MIN);
        self.next_incarnation = incarnation.get();
        self.active.fetch_add(1, Ordering::Relaxed);
        self.stats.activations += 1;
        metrics::counter!("persist_durable_activations_total", "entity" => E::ENTITY_TYPE).increment(1);
        // Each shard adds its own: the gauge is the sum of all shards'.
        metrics::gauge!("persist_durable_resident_entities", "entity" => E::ENTITY_TYPE).increment(1);
        let actor = EntityActor::under_shard(key.clone(), self.shared.clone(), incarnation);
        let addr = start_unbounded(actor, None);
        Child {
            addr: addr.downgrade(),
            incarnation: self.next_incarnation,
            last_used: self.ticks,
        }
    }
}

impl<E: DurableEntity> Actor for Shard<E> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Children report through this one recipient, shared by all of them.
        let manager = Some(ctx.address().recipient());
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.manager = manager,
            None => {
                self.shared = Arc::new(Shared {
                    store: self.shared.store.clone(),
                    config: self.shared.config.clone(),
                    settings: self.shared.settings.clone(),
                    manager,
                    scheduler: self.shared.scheduler.clone(),
                })
            }
        }
        self.schedule_retention(ctx);
    }
}

/// The commands in `held`: what counts against [`Config::max_queued_per_entity`](crate::Config::max_queued_per_entity).
fn held_commands<E: DurableEntity>(held: &[Held<E>]) -> usize {
    held.iter().map(Held::len).sum()
}

/// A command for one entity of this shard, with the caller's reply: sent
/// with `do_send`, answered by the entity's actor directly.
pub(crate) struct RouteCommand<E: DurableEntity> {
    pub(crate) key: E::Key,
    pub(crate) work: Work<E::Command>,
    pub(crate) reply: oneshot::Sender<Answer<E>>,
}

impl<E: DurableEntity> Message for RouteCommand<E> {
    type Result = ();
}

impl<E: DurableEntity> Handler<RouteCommand<E>> for Shard<E> {
    type Result = ();

    fn handle(&mut self, RouteCommand { key, work, reply }: RouteCommand<E>, _ctx: &mut Self::Context) {
        let reply = ReplyTo::new(reply, None);
        self.route(key, One { work, reply });
    }
}

impl<E: DurableEntity> Handler<EntityRecords<E>> for Shard<E> {
    type Result = ResponseFuture<Vec<Answer<E>>>;

    fn handle(&mut self, EntityRecords { key, records }: EntityRecords<E>, _ctx: &mut Self::Context) -> Self::Result {
        let (sender, answer) = oneshot::channel();
        let len = records.len();
        let reply = ReplyTo::new(sender, None);
        self.route(key.clone(), Batch { records, reply });
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                (0..len)
                    .map(|_| Err(super::entity_actor::stopped_before_answering(&key)))
                    .collect()
            })
        })
    }
}

impl<E: DurableEntity> Handler<HandOver<E>> for Shard<E> {
    type Result = ();

    fn handle(&mut self, HandOver(keys): HandOver<E>, _ctx: &mut Self::Context) {
        for key in keys {
            self.begin_passivation(&key, PassivationCause::HandedOver);
        }
    }
}

impl<E: DurableEntity> Shard<E> {
    /// Routes `delivery` to `key`'s actor, starting one if needed, or holds
    /// it while the entity passivates or its row is purged.
    fn route<D: Delivery<E>>(&mut self, key: E::Key, delivery: D) {
        let len = delivery.len();
        let limit = self.shared.config.max_commands_in_flight;
        let Some(slot) = InFlight::acquire(&self.in_flight, len, limit) else {
            return self.refuse(key, delivery, format!("{limit} commands are already in flight"));
        };
        let delivery = delivery.holding(slot);
        if self.draining.is_some() {
            // The caller hears `NotDelivered`: not applied.
            return drop(delivery);
        }
        self.ticks = self.ticks.wrapping_add(1);
        if self.is_being_purged(&key) {
            return self.hold_during_purge(key, delivery);
        }
        // One lookup for a resident entity; a weak address is cloned
        // without allocating, and upgraded only if the delivery goes to it.
        let ticks = self.ticks;
        let addr = match self.children.get_mut(&key) {
            Some(child) => {
                child.last_used = ticks;
                child.addr.clone()
            }
            None => {
                let child = self.spawn_child(&key);
                let addr = child.addr.clone();
                self.children.insert(key.clone(), child);
                self.evict_least_recently_used(&key);
                addr
            }
        };
        let Some(alive) = addr.upgrade() else {
            // It stopped without saying so (it never does, unless its task
            // died): as if it had, with this delivery for its successor.
            warn!(key = %Shown(&key), "an entity actor is gone without having stopped; starting it again");
            self.child_stopped(key.clone());
            // A successor may have started already, with commands held for it.
            return match self.children.get(&key).and_then(Child::addr) {
                Some(successor) => delivery.forward(Some(successor)),
                None => self.start_with(key, vec![delivery.held()]),
            };
        };
        let max_held = self.shared.config.max_queued_per_entity;
        let Some(passivating) = self.passivating.get_mut(&key) else {
            return delivery.forward(Some(alive));
        };
        // The same bound as a live actor's queue: refused here, not by the successor.
        if held_commands(&passivating.held) + len > max_held {
            return self.refuse(
                key,
                delivery,
                format!("{max_held} commands are already queued for this entity while it passivates"),
            );
        }
        self.stats.commands_held_during_passivation += len as u64;
        passivating.held.push(delivery.held());
    }

    /// Refuses `delivery` with [`CommandError::Overloaded`](crate::CommandError::Overloaded), counted.
    fn refuse<D: Delivery<E>>(&mut self, key: E::Key, delivery: D, reason: String) {
        self.stats.commands_refused += delivery.len() as u64;
        delivery.refuse(key, reason);
    }
}

impl<E: DurableEntity> Handler<FromChild<E::Key>> for Shard<E> {
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

impl<E: DurableEntity> Shard<E> {
    /// Hands the commands held for a stopped child to its successor.
    fn child_stopped(&mut self, key: E::Key) {
        if self.children.remove(&key).is_none() {
            return;
        }
        let held = match self.passivating.remove(&key) {
            None => {
                self.active.fetch_sub(1, Ordering::Relaxed);
                Vec::new()
            }
            Some(Passivating { held, cause }) => {
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
        metrics::gauge!("persist_durable_resident_entities", "entity" => E::ENTITY_TYPE).decrement(1);
        debug!(key = %Shown(&key), held = held.len(), "entity actor stopped");
        if self.draining.is_some() {
            // Held back, never queued at the actor: not applied, and heard as `NotDelivered`.
            drop(held);
            return self.answer_drained();
        }
        if held.is_empty() {
            return;
        }
        self.start_with(key, held);
    }

    /// Answers those waiting for the drain once no child is left.
    fn answer_drained(&mut self) {
        if !self.children.is_empty() {
            return;
        }
        for waiting in self.draining.iter_mut().flat_map(std::mem::take) {
            let _ = waiting.send(());
        }
    }

    /// Starts a new actor for `key` (which restores what the store holds) and
    /// hands it the commands held for it, in order.
    fn start_with(&mut self, key: E::Key, held: Vec<Held<E>>) {
        let successor = self.spawn_child(&key);
        for delivery in held {
            // Counted in flight already, by the handler's future waiting on its reply.
            delivery.forward_to(successor.addr());
        }
        self.children.insert(key.clone(), successor);
        self.evict_least_recently_used(&key);
    }
}

/// Whether an entity has an actor that is not passivating.
pub(crate) struct IsResident<K>(pub(crate) K);

impl<K: 'static> Message for IsResident<K> {
    type Result = bool;
}

impl<E: DurableEntity> Handler<IsResident<E::Key>> for Shard<E> {
    type Result = bool;

    fn handle(&mut self, IsResident(key): IsResident<E::Key>, _ctx: &mut Self::Context) -> bool {
        self.children.contains_key(&key) && !self.passivating.contains_key(&key)
    }
}

/// Passivates the entities of these slices: in cluster mode, this node no
/// longer owns them.
pub(crate) struct HandOverSlices(pub(crate) std::sync::Arc<[crate::entity::Slice]>);

impl Message for HandOverSlices {
    type Result = ();
}

impl<E: DurableEntity> Handler<HandOverSlices> for Shard<E> {
    type Result = ();

    fn handle(&mut self, HandOverSlices(slices): HandOverSlices, _ctx: &mut Self::Context) {
        use crate::entity::EntityKey;
        let moved: Vec<E::Key> = self
            .children
            .keys()
            .filter(|key| slices.contains(&key.persistence_id().slice()))
            .cloned()
            .collect();
        for key in moved {
            self.begin_passivation(&key, PassivationCause::HandedOver);
        }
    }
}

/// Whether an entity has an actor at all, passivating or not.
pub(crate) struct HasActor<K>(pub(crate) K);

impl<K: 'static> Message for HasActor<K> {
    type Result = bool;
}

impl<E: DurableEntity> Handler<HasActor<E::Key>> for Shard<E> {
    type Result = bool;

    fn handle(&mut self, HasActor(key): HasActor<E::Key>, _ctx: &mut Self::Context) -> bool {
        self.children.contains_key(&key)
    }
}

/// Stops a shard gracefully: every child passivates once what is queued at
/// it is committed, commands arriving from now on are not delivered, and
/// the reply comes once no child is left.
pub(crate) struct Drain(pub(crate) oneshot::Sender<()>);

impl Message for Drain {
    type Result = ();
}

impl<E: DurableEntity> Handler<Drain> for Shard<E> {
    type Result = ();

    fn handle(&mut self, Drain(reply): Drain, _ctx: &mut Self::Context) {
        self.draining.get_or_insert_with(Vec::new).push(reply);
        // Held for rows a purge is deleting, never queued at an actor: not
        // applied, and heard as `NotDelivered` now.
        self.drop_held_during_purge();
        let keys: Vec<E::Key> = self.children.keys().cloned().collect();
        for key in keys {
            self.begin_passivation(&key, PassivationCause::Stopped);
        }
        self.answer_drained();
    }
}

impl<E: DurableEntity> Handler<GetManagerStats> for Shard<E> {
    type Result = MessageResult<GetManagerStats>;

    fn handle(&mut self, _: GetManagerStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(ManagerStats {
            resident_entities: self.children.len(),
            ..self.stats
        })
    }
}

#[cfg(test)]
pub(crate) fn child_size() -> usize {
    std::mem::size_of::<Child<crate::domain::UserState>>()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix::prelude::*;
    use tokio::sync::oneshot;

    use super::{Child, RouteCommand, Shard, ShardCounters, Work};
    use crate::actors::entity_actor::{EntityActor, Shared};
    use crate::actors::placement::{Placement, Spread};
    use crate::domain::{Command, UserKey, UserState};
    use crate::store::{MemoryStore, StateStoreExt};
    use crate::Config;

    /// An entity's actor whose task died without running its `stopped`
    /// (and so without telling its shard) is noticed on the next command
    /// for it, and started again with that command.
    #[actix_rt::test]
    async fn a_child_gone_without_saying_so_is_started_again_with_the_next_command() {
        let store = Arc::new(MemoryStore::new());
        let shared = Shared::<UserState> {
            store: store.clone(),
            config: Config::default(),
            settings: Default::default(),
            manager: None,
            scheduler: None,
        };
        let counters = ShardCounters::default();
        let mut shard = Shard::new(Arc::new(shared), Placement::new(0, Spread::new(1)), &counters);
        let key = UserKey::new("m", "u").unwrap();
        // A context never run and dropped: its address can no longer be upgraded.
        let gone = {
            let context = Context::<EntityActor<UserState>>::new();
            context.address().downgrade()
        };
        shard.children.insert(
            key.clone(),
            Child {
                addr: gone,
                incarnation: 1,
                last_used: 0,
            },
        );
        shard.next_incarnation = 1;
        // Counted as a started child is.
        counters.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shard = shard.start();

        let (reply, answer) = oneshot::channel();
        shard.do_send(RouteCommand {
            key: key.clone(),
            work: Work::Command(Command::UserLogin.into()),
            reply,
        });

        let state = answer.await.expect("answered").expect("applied");
        assert!(state.last_login.is_some());
        assert_eq!(store.load(&key).await.unwrap().unwrap().revision.0, 1);
        let stats = shard.send(crate::actors::messages::GetManagerStats).await.unwrap();
        assert_eq!((stats.resident_entities, stats.activations), (1, 1), "{stats:?}");
    }
}
