use std::num::NonZeroU32;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::contain::{self, panic_message, Shown};
use super::protocol::{ChildEvent, FromChild, Passivate, ReplyTo};
use super::round::{self, Next, Queued, Rules, Work, Write};
use crate::config::Config;
use crate::entity::{Durable, DurableEntity, EntityEvent, EntityKey, RecordOrigin, Revision};
use crate::error::{CommandError, StoreError};
use crate::store::ext::{checked, entity_write};
use crate::store::fresh_generation;
use crate::store::{SharedStore, StoredTimer, TimerChange, WriteRow};
use crate::timers::SchedulerHandle;

pub(crate) use super::round::Answer;

/// A command (with its event's id and time) for the entity of an
/// [`EntityActor`]; answered with the state after it.
#[derive(Debug, Clone)]
pub struct Execute<E: DurableEntity>(pub EntityEvent<E::Command>);

impl<E: DurableEntity> Message for Execute<E> {
    type Result = Result<E, CommandError<E>>;
}

/// A command (or a timer's fire) from the entity's shard, with the
/// caller's reply: the actor answers the caller directly.
pub(crate) struct Deliver<E: DurableEntity> {
    pub(crate) work: Work<E::Command>,
    pub(crate) reply: ReplyTo<Answer<E>>,
}

impl<E: DurableEntity> Message for Deliver<E> {
    type Result = ();
}

/// Ingested records for one entity, from one source partition in offset
/// order: queued together (so no other command comes between them) and
/// answered one result per record. A record already applied (at or below the
/// entity's remembered offset of its partition) is answered without being
/// applied again.
pub(crate) struct ExecuteRecords<E: DurableEntity> {
    pub(crate) records: Records<E>,
    pub(crate) reply: ReplyTo<Vec<Answer<E>>>,
}

/// Records as an ingest hands them over: each command with where it came from.
pub(crate) type Records<E> = Vec<(EntityEvent<<E as DurableEntity>::Command>, RecordOrigin)>;

impl<E: DurableEntity> Message for ExecuteRecords<E> {
    type Result = ();
}

/// Keeps one entity's state in memory and every change of it in the store.
///
/// - It restores the entity's state before it applies any command.
/// - It answers a state-changing command only after the new state is
///   committed, and never reports a state the store does not hold: after a
///   failed or conflicting write it reloads before applying the next command.
/// - It keeps at most one write in flight. Commands that arrive meanwhile are
///   applied in order and committed together in the next write, so a busy
///   entity costs one row write per round trip, not one per command. The
///   revision still grows by one per state-changing command.
/// - When its write loses a revision conflict (another node wrote the
///   entity), it reloads and applies the same events again, up to
///   [`Config::conflict_retries`] times: the transition is pure, and event
///   ids keep a re-applied event from counting twice.
/// - Every [`Config::idle_check_interval`] it checks whether it has been idle
///   for [`Config::idle_timeout`]; if so it passivates. It never stops with a
///   load or write in flight.
///
/// Started on its own ([`EntityActor::new`]) it stops itself when idle;
/// messages sent to it after that fail with a mailbox error, so a stand-alone
/// actor suits one-off use and tests. Under an
/// [`EntityManager`](crate::EntityManager) it asks the manager to passivate
/// it instead, which makes passivation invisible to senders.
///
/// For users it is [`UserStateActor`](crate::UserStateActor), which also
/// takes a [`Command`](crate::Command) or an [`Event`](crate::Event) directly:
///
/// ```
/// use actix::Actor;
/// use persist_durable::{Command, Config, MemoryStore, UserKey, UserStateActor};
/// use std::sync::Arc;
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let key = UserKey::new("mall001", "user001")?;
///     let actor = UserStateActor::new(key, Arc::new(MemoryStore::new()), Config::default()).start();
///     actor.send(Command::UserLogin).await??;
///     let state = actor.send(Command::GetUserState).await??;
///     assert!(state.last_login.is_some());
///     Ok(())
/// }
/// ```
///
/// Its fields are kept few and small: a resident entity costs what its actor
/// costs, and actix and tokio keep the actor inside its task, whose
/// allocation grows in steps of 128 bytes.
pub struct EntityActor<E: DurableEntity> {
    key: E::Key,
    /// The store, configuration and manager: one per shard (or per
    /// stand-alone actor), 8 bytes per resident entity.
    shared: Arc<Shared<E>>,
    /// Where its state is: loaded, being loaded or written.
    phase: Phase<E>,
    /// Whether it runs on or is on its way out.
    lifecycle: Lifecycle,
    /// Commands received and not yet part of a write, in arrival order.
    queue: Vec<Queued<E>>,
    last_active: Instant,
    /// The [generation](crate::StoredRow::generation) of the row its state
    /// came from (or, before the row exists, the one it will create it with):
    /// checked with the revision by every write and freshness check, so a
    /// row purged and created again elsewhere is never taken for its own.
    generation: u64,
    /// Stand-alone, or which incarnation under its shard.
    owner: Owner,
}

/// Where an actor's state is.
enum Phase<E: DurableEntity> {
    /// Not known: restored before the next command (not restored yet, a
    /// write did not succeed, or a refusal must be checked on a fresh state).
    Unloaded,
    /// A restore is in flight.
    Restoring,
    /// What the store holds, at its revision: commands apply to it.
    Ready(Revision, Durable<E>),
    /// A write is in flight; once it commits, the state is reloaded first
    /// when `reload_after` (a command after it panicked).
    Writing { reload_after: bool },
}

/// Whether an actor runs on or stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Running,
    /// Under a shard: it asked to be passivated, and waits to be told.
    PassivationRequested,
    /// Told to passivate: it stops once nothing is queued or in flight.
    Draining,
    /// It stopped itself (passivated, or idle on its own); `stopping` lets it.
    Stopping,
}

/// Whom an actor answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Started on its own: it stops itself when idle.
    StandAlone,
    /// Under its shard, as the entity's incarnation `n` (from 1): the shard
    /// tells a message of this actor from one of an earlier incarnation.
    /// Never 0, which keeps `Owner` in 4 bytes beside the lifecycle.
    Shard { incarnation: NonZeroU32 },
}

/// What every actor of one shard shares.
pub(crate) struct Shared<E: DurableEntity> {
    pub(crate) store: SharedStore,
    pub(crate) config: Config,
    pub(crate) settings: E::Settings,
    /// The actor's shard, known only by what it receives; `None` for stand-alone actors.
    pub(crate) manager: Option<Recipient<FromChild<E::Key>>>,
    /// The manager's timer scheduler, told of the timers this node sets
    /// within its window; `None` for stand-alone actors, and with firing off.
    pub(crate) scheduler: Option<SchedulerHandle>,
}

impl<E: DurableEntity> EntityActor<E> {
    /// A stand-alone actor for `key` with the entity's default settings;
    /// start it with [`Actor::start`].
    pub fn new(key: E::Key, store: SharedStore, config: Config) -> Self {
        Self::with_settings(key, store, config, E::Settings::default())
    }

    /// A stand-alone actor for `key` whose transitions use `settings`.
    pub fn with_settings(key: E::Key, store: SharedStore, config: Config, settings: E::Settings) -> Self {
        let shared = Shared {
            store,
            settings,
            config,
            manager: None,
            scheduler: None,
        };
        Self::with_shared(key, Arc::new(shared), Owner::StandAlone)
    }

    /// The actor of `key`, incarnation `incarnation` (from 1) under its shard.
    pub(crate) fn under_shard(key: E::Key, shared: Arc<Shared<E>>, incarnation: NonZeroU32) -> Self {
        Self::with_shared(key, shared, Owner::Shard { incarnation })
    }

    fn with_shared(key: E::Key, shared: Arc<Shared<E>>, owner: Owner) -> Self {
        Self {
            key,
            shared,
            phase: Phase::Unloaded,
            lifecycle: Lifecycle::Running,
            queue: Vec::new(),
            last_active: Instant::now(),
            generation: 0,
            owner,
        }
    }

    /// Its shard and its incarnation there, unless it is stand-alone.
    fn shard(&self) -> Option<(&Recipient<FromChild<E::Key>>, u32)> {
        match self.owner {
            Owner::StandAlone => None,
            Owner::Shard { incarnation } => self.shared.manager.as_ref().map(|shard| (shard, incarnation.get())),
        }
    }

    /// Nothing queued, no load or write in flight.
    fn is_drained(&self) -> bool {
        self.queue.is_empty() && !matches!(self.phase, Phase::Restoring | Phase::Writing { .. })
    }

    /// Moves the actor forward: restore if needed, else write what is queued;
    /// then, if it is draining and nothing is left, stop.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.queue.is_empty() {
            match std::mem::replace(&mut self.phase, Phase::Unloaded) {
                Phase::Unloaded => self.restore(None, ctx),
                // May answer everything at once (reads, redeliveries) and stay idle.
                Phase::Ready(revision, durable) => self.run_round(revision, durable, ctx),
                busy => self.phase = busy,
            }
        }
        if self.lifecycle == Lifecycle::Draining && self.is_drained() {
            self.stop_self(ctx);
        }
    }

    fn stop_self(&mut self, ctx: &mut Context<Self>) {
        self.lifecycle = Lifecycle::Stopping;
        ctx.stop();
    }

    /// Loads the stored state. With `known`, the state this actor holds: kept
    /// (not decoded again) if the store is still at its revision.
    fn restore(&mut self, known: Option<(Revision, Durable<E>)>, ctx: &mut Context<Self>) {
        if known.is_none() {
            if let Err(error) = checked(&self.key) {
                // Nothing of this entity may reach the store: a row it could
                // not read back would stop every reader of its type.
                for queued in self.queue.drain(..) {
                    queued.answer(Err(CommandError::from_store(&self.key, error.clone())));
                }
                return;
            }
        }
        self.phase = Phase::Restoring;
        // The commands queued now meet what the store holds after they arrived.
        for queued in &mut self.queue {
            queued.awaiting_load = true;
        }
        let (store, key, generation) = (self.shared.store.clone(), self.key.persistence_id(), self.generation);
        let load = async move {
            let row = store.load_row(&key).await?;
            match (row, known) {
                (Some(row), Some((revision, durable))) if row.revision == revision && row.generation == generation => {
                    Ok(Some((revision, generation, durable)))
                }
                (None, Some((Revision::NONE, durable))) => Ok(Some((Revision::NONE, generation, durable))),
                (Some(row), _) => {
                    let generation = row.generation;
                    decode::<E>(&key, row).map(|(revision, durable)| Some((revision, generation, durable)))
                }
                (None, _) => Ok(None),
            }
        };
        ctx.spawn(
            caught(load, "loading a state")
                .into_actor(self)
                .map(move |restored, actor, ctx| actor.contained(ctx, |actor, ctx| {
                    // Idle time counts from the end of work, not its start.
                    actor.last_active = Instant::now();
                    match restored {
                        Ok(stored) => {
                            let (revision, generation, durable) =
                                stored.unwrap_or_else(|| (Revision::NONE, fresh_generation(), Durable::default()));
                            actor.generation = generation;
                            actor.phase = Phase::Ready(revision, durable);
                            for queued in &mut actor.queue {
                                queued.fresh |= std::mem::take(&mut queued.awaiting_load);
                            }
                        }
                        Err(error) => {
                            actor.phase = Phase::Unloaded;
                            warn!(key = %Shown(&actor.key), %error, "restore failed; queued commands fail, the next one retries");
                            for queued in actor.queue.drain(..) {
                                queued.answer(Err(CommandError::from_store(&actor.key, error.clone())));
                            }
                        }
                    }
                    actor.pump(ctx);
                })),
        );
    }

    /// Runs the queue over the state stored at `expected`, answers what it
    /// can, and writes, checks or reloads as the round decides.
    fn run_round(&mut self, expected: Revision, current: Durable<E>, ctx: &mut Context<Self>) {
        if let Some(ownership) = self.ownership() {
            if !ownership.owns(self.slice()) {
                // Its slice moved to another node: nothing is answered here.
                self.phase = Phase::Unloaded;
                for queued in std::mem::take(&mut self.queue) {
                    queued.answer(Err(self.not_owner()));
                }
                return;
            }
        }
        let rules = Rules {
            key: &self.key,
            settings: &self.shared.settings,
            event_id_memory: self.shared.config.event_id_memory,
            every_change: self.shared.store.keeps_change_feed(),
            // The only writer: a single-node choice, or the slice's owner
            // under a lease it may still trust.
            exclusive: self.shared.config.exclusive_writer
                || self
                    .ownership()
                    .is_some_and(|ownership| ownership.answers_from_memory(self.slice())),
            now: self.shared.config.clock.now(),
        };
        let round = round::run(&rules, expected, current, std::mem::take(&mut self.queue));
        for (queued, answer) in round.answered {
            queued.answer(answer);
        }
        self.queue = round.rest;
        match round.next {
            Next::Stay(revision, durable) => self.phase = Phase::Ready(revision, durable),
            Next::Check(revision, durable) => self.restore(Some((revision, durable)), ctx),
            Next::Reload => self.restore(None, ctx),
            Next::Write(write) => self.write(write, ctx),
        }
    }

    fn write(&mut self, write: Write<E>, ctx: &mut Context<Self>) {
        let Write {
            expected,
            revision,
            state,
            payloads,
            erases,
            waiting,
            reload_after,
            timers,
            fired,
        } = write;
        self.phase = Phase::Writing { reload_after };
        // The timers this write sets (or moves on) that fall within the
        // scheduler's window, handed to it once committed.
        let soon = self.timers_due_soon(&timers, fired.as_ref(), &waiting);
        let (store, key) = (self.shared.store.clone(), self.key.persistence_id());
        let expected = (expected, Some(self.generation));
        // In cluster mode, committed only under this node's ownership of the slice.
        let fence = self.ownership().map(|ownership| ownership.fence(self.slice()));
        let write = async move {
            if let Some(None) = fence {
                let slice = key.slice();
                return Err(StoreError::Fenced { key, slice, epoch: 0 });
            }
            let write = WriteRow {
                erases,
                fence: fence.flatten(),
                timers,
                fired,
                ..entity_write::<E>(key, expected, revision, payloads)
            };
            let written = caught(store.write_row(write), "writing a state");
            // A store that panicked mid-write may have committed.
            written.await.map_err(|error| match error {
                panicked @ StoreError::Panicked { .. } => StoreError::OutcomeUnknown(Arc::new(panicked)),
                other => other,
            })
        };
        let waiting = Unsettled {
            key: self.key.clone(),
            waiting,
        };
        ctx.spawn(write.into_actor(self).map(move |result, actor, ctx| {
            let waiting = waiting.settled();
            if let (Ok(_), Some(scheduler)) = (&result, &actor.shared.scheduler) {
                scheduler.expect(soon);
            }
            actor.contained(ctx, |actor, ctx| {
                actor.last_active = Instant::now();
                actor.settle(result.map(|revision| (revision, state)), waiting);
                actor.pump(ctx);
            })
        }));
    }

    /// Runs `work` on the actor; a panic in it (the entity's code outside
    /// what a round catches, such as its commands' names) stops the actor
    /// cleanly, failing what is queued, instead of unwinding through its
    /// context: the shard then starts the entity again from its stored state.
    fn contained(&mut self, ctx: &mut Context<Self>, work: impl FnOnce(&mut Self, &mut Context<Self>)) {
        let Err(panic) = catch_unwind(AssertUnwindSafe(|| work(self, ctx))) else {
            return;
        };
        let message = panic_message(&panic);
        error!(key = %Shown(&self.key), panic = %message, "an entity actor panicked; stopping it");
        // None of them ran: not applied, and worth sending again. A write
        // in flight answers its own commands, its outcome unknown.
        for queued in self.queue.drain(..) {
            queued.answer(Err(CommandError::NotDelivered {
                key: self.key.clone(),
                reason: format!("the entity's actor stopped after a panic in the entity's code: {message}"),
            }));
        }
        self.stop_self(ctx);
    }

    /// Answers the events of a finished write, or queues them again after a conflict.
    fn settle(&mut self, result: Result<(Revision, Durable<E>), StoreError>, written: Vec<(Queued<E>, Answer<E>)>) {
        let reload_after = matches!(self.phase, Phase::Writing { reload_after: true });
        let error = match result {
            Ok((revision, durable)) => {
                debug!(key = %Shown(&self.key), %revision, events = written.len(), "committed");
                // After a refusal on possibly stale state, the next command reloads.
                self.phase = if reload_after {
                    Phase::Unloaded
                } else {
                    Phase::Ready(revision, durable)
                };
                for (queued, answer) in written {
                    queued.answer(answer);
                }
                return;
            }
            Err(error) => error,
        };
        // The stored state is not what this actor believed: reload first.
        self.phase = Phase::Unloaded;
        if matches!(error, StoreError::RowRefused { .. }) {
            return self.refused(error, written);
        }
        if matches!(error, StoreError::Fenced { .. }) {
            // Nothing committed; the slice's new owner takes these.
            if let Some(cluster) = &self.shared.config.cluster {
                cluster.count_fenced();
            }
            for (queued, _) in written {
                queued.answer(Err(self.not_owner()));
            }
            return;
        }
        let mut retry = Vec::new();
        // Ingested records behind a failed one come later in their
        // partition: committed now, they would mark the failed one as
        // applied. They fail with it (written, retried or queued), and the
        // ingest sends them again in order.
        let mut ingested_record_failed = false;
        for (mut queued, _) in written {
            let behind_a_failed_record = ingested_record_failed && queued.origin.is_some();
            if matches!(error, StoreError::Conflict { .. })
                && queued.conflicts < self.shared.config.conflict_retries
                && !behind_a_failed_record
            {
                queued.conflicts += 1;
                retry.push(queued);
            } else {
                ingested_record_failed |= queued.origin.is_some();
                queued.answer(Err(CommandError::from_store(&self.key, error.clone())));
            }
        }
        if ingested_record_failed {
            let (failed, kept) = std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|queued| queued.origin.is_some());
            self.queue = kept;
            for queued in failed {
                queued.answer(Err(CommandError::from_store(&self.key, error.clone())));
            }
        }
        if retry.is_empty() {
            warn!(key = %Shown(&self.key), %error, "write failed; reloading before the next command");
        } else {
            debug!(key = %Shown(&self.key), retrying = retry.len(), "conflict; reloading to apply again");
            // Ahead of what arrived meanwhile: order is kept.
            retry.append(&mut self.queue);
            self.queue = retry;
        }
    }

    /// The database refused the row this write would have committed, for
    /// what a command's state holds. When the write held several commands'
    /// states, each goes again in a write of its own, to find which; the one
    /// refused alone fails with `Unstorable` (an ingested record is settled
    /// all the same, its offset noted as refused with the state before it,
    /// unless that too is refused). Answers decided after a refused state
    /// are decided again, on the state before it.
    fn refused(&mut self, error: StoreError, written: Vec<(Queued<E>, Answer<E>)>) {
        let changes = written.iter().filter(|(queued, _)| queued.changed).count();
        let mut again = Vec::with_capacity(written.len());
        for (mut queued, _) in written {
            if !queued.changed {
                again.push(queued);
            } else if changes > 1 {
                queued.alone = true;
                again.push(queued);
            } else if queued.origin.is_some() && queued.refused.is_none() {
                queued.refused = Some(error.clone());
                again.push(queued);
            } else {
                warn!(key = %Shown(&self.key), %error, "the database refused the state after a command; it fails alone");
                queued.answer(Err(CommandError::from_store(&self.key, error.clone())));
            }
        }
        again.append(&mut self.queue);
        self.queue = again;
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if !self.is_drained() || self.last_active.elapsed() < self.shared.config.idle_timeout {
            return;
        }
        if self.lifecycle != Lifecycle::Running {
            return;
        }
        let Some((shard, incarnation)) = self.shard() else {
            debug!(key = %Shown(&self.key), "idle; stopping");
            return self.stop_self(ctx);
        };
        debug!(key = %Shown(&self.key), "idle; asking the manager to passivate");
        shard.do_send(FromChild {
            key: self.key.clone(),
            incarnation,
            event: ChildEvent::PassivationRequested,
        });
        self.lifecycle = Lifecycle::PassivationRequested;
    }

    /// Queues `work`, answered through `reply` once it is applied and committed.
    fn accept(&mut self, work: Work<E::Command>, reply: ReplyTo<Answer<E>>, ctx: &mut Context<Self>) {
        if !self.has_room_for(1) {
            count_overloaded::<E>(&work);
            reply.send(Err(self.overloaded()));
            return;
        }
        self.enqueue(work, None, reply);
        self.pump(ctx);
    }

    /// Of the timers a write sets and the next occurrence of the one it
    /// fires, those due within the scheduler's window, as it will hold them.
    fn timers_due_soon(
        &self,
        changes: &[TimerChange],
        fired: Option<&crate::store::TimerFired>,
        waiting: &[(Queued<E>, Answer<E>)],
    ) -> Vec<StoredTimer> {
        let Some(scheduler) = &self.shared.scheduler else {
            return Vec::new();
        };
        let key = self.key.persistence_id();
        let mut soon: Vec<StoredTimer> = changes
            .iter()
            .filter_map(|change| match change {
                TimerChange::Set {
                    name,
                    due,
                    schedule,
                    command,
                    missed,
                } if scheduler.holds(*due) => Some(StoredTimer {
                    key: key.clone(),
                    name: name.clone(),
                    due: *due,
                    schedule: schedule.clone(),
                    command: command.clone(),
                    missed: *missed,
                }),
                _ => None,
            })
            .collect();
        let next = fired.and_then(|fired| fired.next.filter(|next| scheduler.holds(*next)));
        let fire = waiting.iter().find_map(|(queued, _)| match &queued.work {
            Work::Fire(fire) => Some(fire),
            Work::Command(_) => None,
        });
        if let (Some(next), Some(fire)) = (next, fire) {
            if !changes.iter().any(|change| change.name() == fire.name) {
                soon.push(fire.stored(key, next));
            }
        }
        soon
    }

    /// Queues `records` together, or refuses them all if they do not fit;
    /// `reply` gets one answer per record, in order.
    fn accept_records(&mut self, records: Records<E>, reply: ReplyTo<Vec<Answer<E>>>, ctx: &mut Context<Self>) {
        if !self.has_room_for(records.len()) {
            let refused = records
                .iter()
                .map(|(event, _)| {
                    count_overloaded::<E>(&Work::Command(event.clone()));
                    Err(self.overloaded())
                })
                .collect();
            reply.send(refused);
            return;
        }
        let answers: Vec<_> = records
            .into_iter()
            .map(|(event, origin)| {
                let (sender, answer) = oneshot::channel();
                self.enqueue(Work::Command(event), Some(origin), ReplyTo::new(sender, None));
                answer
            })
            .collect();
        self.pump(ctx);
        let key = self.key.clone();
        actix::spawn(async move {
            let mut results = Vec::with_capacity(answers.len());
            for answer in answers {
                results.push(answer.await.unwrap_or_else(|_| Err(stopped_before_answering(&key))));
            }
            reply.send(results);
        });
    }

    /// This node's ownership of slices, in cluster mode.
    fn ownership(&self) -> Option<&crate::cluster::Ownership> {
        self.shared
            .config
            .cluster
            .as_ref()
            .map(|cluster| &**cluster.ownership())
    }

    /// The entity's slice.
    fn slice(&self) -> crate::entity::Slice {
        self.key.persistence_id().slice()
    }

    /// That this node does not own the entity, with its owner as last known.
    fn not_owner(&self) -> CommandError<E> {
        let owner = self.ownership().and_then(|ownership| ownership.owner(self.slice()));
        CommandError::NotOwner {
            key: self.key.clone(),
            owner: owner.map(|owner| owner.address.to_string()),
        }
    }

    /// `count` more commands stay within [`Config::max_queued_per_entity`].
    fn has_room_for(&self, count: usize) -> bool {
        self.queue.len() + count <= self.shared.config.max_queued_per_entity
    }

    fn overloaded(&self) -> CommandError<E> {
        let limit = self.shared.config.max_queued_per_entity;
        CommandError::Overloaded {
            key: self.key.clone(),
            reason: format!("{limit} commands are already queued for this entity"),
        }
    }

    /// Queues one event, answered through `reply` once applied and committed.
    ///
    /// The entity's code names the command first: if that panics, the
    /// command fails with `Panicked` (an ingested record is settled all the
    /// same, noted as refused); nothing else does.
    fn enqueue(&mut self, work: Work<E::Command>, origin: Option<RecordOrigin>, reply: ReplyTo<Answer<E>>) {
        self.last_active = Instant::now();
        let named = match &work {
            Work::Command(event) => contain::command_name::<E>(&event.command),
            Work::Fire(_) => Ok(contain::TIMER),
        };
        let (name, refused) = match named {
            Ok(name) => (name, None),
            Err(message) => {
                let panicked = StoreError::Panicked {
                    during: "naming the command",
                    message,
                };
                (contain::UNNAMED, Some(panicked))
            }
        };
        let span = tracing::debug_span!(
            "command",
            entity = E::ENTITY_TYPE,
            key = %Shown(&self.key),
            command = name,
            revision = tracing::field::Empty
        );
        // A fire is written alone: the write that commits it consumes its
        // timer, and fails alone if the timer is gone.
        let alone = matches!(work, Work::Fire(_));
        let queued = Queued {
            work,
            origin,
            received_at: self.shared.config.clock.now(),
            reply,
            name,
            conflicts: 0,
            awaiting_load: false,
            fresh: false,
            alone,
            refused: None,
            changed: false,
            span,
        };
        match refused {
            None => self.queue.push(queued),
            Some(panicked) if queued.origin.is_some() => self.queue.push(Queued {
                refused: Some(panicked),
                ..queued
            }),
            Some(panicked) => {
                let error = CommandError::from_store(&self.key, panicked);
                queued.answer(Err(error));
            }
        }
    }
}

/// The commands waiting for a write in flight. Dropped unsettled (the actor
/// stopped under it), each is answered that its outcome is unknown: the
/// write goes on in the store and may commit.
struct Unsettled<E: DurableEntity> {
    key: E::Key,
    waiting: Vec<(Queued<E>, Answer<E>)>,
}

impl<E: DurableEntity> Unsettled<E> {
    /// The commands, to be answered by the write's outcome.
    fn settled(mut self) -> Vec<(Queued<E>, Answer<E>)> {
        std::mem::take(&mut self.waiting)
    }
}

impl<E: DurableEntity> Drop for Unsettled<E> {
    fn drop(&mut self) {
        for (queued, _) in self.waiting.drain(..) {
            queued.answer(Err(CommandError::OutcomeUnknown {
                key: self.key.clone(),
                source: StoreError::OutcomeUnknown(Arc::new(StoppedMidWrite)),
            }));
        }
    }
}

/// The entity's actor stopped while its write was in flight.
#[derive(Debug, thiserror::Error)]
#[error("the entity's actor stopped while its write was in flight")]
struct StoppedMidWrite;

/// A stored row decoded into the actor's form; a row that does not decode
/// fails with [`StoreError::Corrupt`] naming it.
fn decode<E: DurableEntity>(
    key: &crate::entity::PersistenceId,
    row: crate::store::StoredRow,
) -> Result<(Revision, Durable<E>), StoreError> {
    crate::store::payload::decode::<E>(&row.payload, row.schema_version)
        .map(|durable| (row.revision, durable))
        .map_err(|source| StoreError::Corrupt {
            key: key.clone(),
            revision: Some(row.revision),
            source,
        })
}

/// `work` with a panic in it (a store's code, an entity's serde or
/// `upgrade`) caught as an error: a panic must never unwind through the
/// actor, whose context would then be dropped mid-poll.
async fn caught<T>(
    work: impl std::future::Future<Output = Result<T, StoreError>>,
    during: &'static str,
) -> Result<T, StoreError> {
    AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
        Err(StoreError::Panicked {
            during,
            message: panic_message(&panic),
        })
    })
}

/// `interval`, or a millisecond if it is shorter: the setters clamp, but
/// the configuration's fields are public, and a zero interval would spin
/// its timer in one poll forever, and with it the arbiter.
pub(super) fn at_least_a_millisecond(interval: std::time::Duration) -> std::time::Duration {
    interval.max(std::time::Duration::from_millis(1))
}

/// What a caller hears when the entity's actor stopped before answering
/// (its mailbox closed under it): the command was not applied.
pub(crate) fn stopped_before_answering<E: DurableEntity>(key: &E::Key) -> CommandError<E> {
    CommandError::NotDelivered {
        key: key.clone(),
        reason: "the entity's actor stopped before answering".into(),
    }
}

/// Counts a command refused with [`CommandError::Overloaded`].
pub(super) fn count_overloaded<E: DurableEntity>(work: &Work<E::Command>) {
    let name = match work {
        Work::Command(event) => contain::command_name::<E>(&event.command).unwrap_or(contain::UNNAMED),
        Work::Fire(_) => contain::TIMER,
    };
    metrics::counter!(
        "persist_durable_commands_total",
        "entity" => E::ENTITY_TYPE,
        "command" => name,
        "outcome" => "overloaded"
    )
    .increment(1);
}

impl<E: DurableEntity> Actor for EntityActor<E> {
    type Context = Context<Self>;

    /// Starts the actor with an unbounded mailbox: nothing sent to it waits
    /// outside the mailbox, so the manager can rely on everything it
    /// forwarded being queued ahead of `Passivate`.
    fn start(self) -> Addr<Self> {
        super::start_unbounded(self, None)
    }

    /// Only when it stops itself. Under a shard no strong address is held
    /// between commands: actix would stop an actor with no address and
    /// nothing to do, and although the idle check always gives it something,
    /// this keeps that from ever becoming a reason to stop.
    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        if self.lifecycle == Lifecycle::Stopping {
            Running::Stop
        } else {
            Running::Continue
        }
    }

    /// The state is restored when the first command is queued, not here: a
    /// restore that starts after a command arrived is what lets the actor
    /// answer it from the restored state without asking the store again.
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(
            at_least_a_millisecond(self.shared.config.idle_check_interval),
            |actor, ctx| actor.contained(ctx, Self::check_idle),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some((shard, incarnation)) = self.shard() {
            shard.do_send(FromChild {
                key: self.key.clone(),
                incarnation,
                event: ChildEvent::Stopped,
            });
        }
    }
}

impl<E: DurableEntity> Handler<Execute<E>> for EntityActor<E> {
    /// Answered from a channel, so the mailbox keeps flowing while a write is
    /// in flight: that is what lets queued commands share the next write.
    type Result = ResponseFuture<Answer<E>>;

    fn handle(&mut self, Execute(event): Execute<E>, ctx: &mut Self::Context) -> Self::Result {
        let (sender, answer) = oneshot::channel();
        self.contained(ctx, |actor, ctx| {
            actor.accept(Work::Command(event), ReplyTo::new(sender, None), ctx)
        });
        let key = self.key.clone();
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(stopped_before_answering(&key))) })
    }
}

impl<E: DurableEntity> Handler<Deliver<E>> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, Deliver { work, reply }: Deliver<E>, ctx: &mut Self::Context) {
        self.contained(ctx, |actor, ctx| actor.accept(work, reply, ctx));
    }
}

impl<E: DurableEntity> Handler<Passivate> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        debug!(key = %Shown(&self.key), "passivating once drained");
        if self.lifecycle != Lifecycle::Stopping {
            self.lifecycle = Lifecycle::Draining;
        }
        self.contained(ctx, Self::pump);
    }
}

impl<E: DurableEntity> Handler<ExecuteRecords<E>> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, ExecuteRecords { records, reply }: ExecuteRecords<E>, ctx: &mut Self::Context) {
        self.contained(ctx, |actor, ctx| actor.accept_records(records, reply, ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Command, UserKey, UserState};

    /// Before, the commands of a write in flight when its actor stopped
    /// were dropped with it, and heard `NotDelivered` ("not applied"),
    /// though the write went on in the store and could commit.
    #[test]
    fn the_commands_of_a_write_dropped_unsettled_are_answered_outcome_unknown() {
        let (sender, answer) = oneshot::channel();
        let queued = Queued::<UserState> {
            work: Work::Command(Command::UserLogin.into()),
            origin: None,
            received_at: chrono::Utc::now(),
            reply: ReplyTo::new(sender, None),
            name: "user_login",
            conflicts: 0,
            awaiting_load: false,
            fresh: false,
            alone: false,
            refused: None,
            changed: true,
            span: tracing::Span::none(),
        };
        let key = UserKey::new("m", "u").unwrap();

        drop(Unsettled {
            key,
            waiting: vec![(queued, Ok(UserState::default()))],
        });

        let answer = answer.blocking_recv().expect("answered");
        assert!(
            matches!(&answer, Err(error @ CommandError::OutcomeUnknown { .. }) if error.is_retryable()),
            "{answer:?}"
        );
    }
}
