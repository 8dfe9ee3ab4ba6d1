use std::sync::Arc;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::manager::{ChildStopped, PassivationRequested, UserStateManager};
use crate::config::Config;
use crate::domain::{apply_event, Command, Event, UserKey, UserState};
use crate::error::{CommandError, StoreError};
use crate::store::{SharedStore, StoredState};

impl Message for Command {
    type Result = Result<UserState, CommandError>;
}

impl Message for Event {
    type Result = Result<UserState, CommandError>;
}

type Reply = oneshot::Sender<Result<UserState, CommandError>>;

/// Keeps one user's state in memory and every change of it in the store.
///
/// - It restores the user's state before it applies any command.
/// - It answers a state-changing command only after the new state is
///   committed, and never reports a state the store does not hold: after a
///   failed or conflicting write it reloads before applying the next command.
/// - It keeps at most one write in flight. Commands that arrive meanwhile are
///   applied in order and committed together in the next write, so a busy
///   user costs one row write per round trip, not one per command. The
///   revision still grows by one per state-changing command.
/// - When its write loses a revision conflict (another node wrote the user),
///   it reloads and applies the same events again, up to
///   [`Config::conflict_retries`] times: the transition is pure, and event
///   ids keep a re-applied event from counting twice.
/// - Every [`Config::idle_check_interval`] it checks whether it has been idle
///   for [`Config::idle_timeout`]; if so it passivates. It never stops with a
///   load or write in flight.
///
/// Started on its own ([`UserStateActor::new`]) it stops itself when idle;
/// messages sent to it after that fail with a mailbox error, so a stand-alone
/// actor suits one-off use and tests. Under a [`UserStateManager`] it asks
/// the manager to passivate it instead, which makes passivation invisible to
/// senders.
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
pub struct UserStateActor {
    key: UserKey,
    store: SharedStore,
    config: Arc<Config>,
    /// What the store holds, or `None` when it must be (re)loaded before the
    /// next write: not restored yet, or a write did not succeed.
    committed: Option<StoredState>,
    /// Commands received and not yet part of a write, in arrival order.
    queue: Vec<Queued>,
    /// A load or write is in flight.
    busy: bool,
    /// Stop as soon as nothing is queued or in flight.
    stop_when_drained: bool,
    last_active: Instant,
    supervisor: Option<Supervisor>,
}

struct Queued {
    event: Event,
    received_at: DateTime<Utc>,
    reply: Reply,
    /// Writes of this event lost to a conflict so far.
    conflicts: u32,
    /// The command's span: the user, the command, and the revision written.
    span: tracing::Span,
}

struct Supervisor {
    manager: Addr<UserStateManager>,
    incarnation: u64,
    passivation_requested: bool,
}

impl UserStateActor {
    /// A stand-alone actor for `key`; start it with [`Actor::start`].
    pub fn new(key: UserKey, store: SharedStore, config: Config) -> Self {
        Self::with_shared_config(key, store, Arc::new(config), None)
    }

    pub(crate) fn supervised(
        key: UserKey,
        store: SharedStore,
        config: Arc<Config>,
        manager: Addr<UserStateManager>,
        incarnation: u64,
    ) -> Self {
        let supervisor = Supervisor {
            manager,
            incarnation,
            passivation_requested: false,
        };
        Self::with_shared_config(key, store, config, Some(supervisor))
    }

    fn with_shared_config(
        key: UserKey,
        store: SharedStore,
        config: Arc<Config>,
        supervisor: Option<Supervisor>,
    ) -> Self {
        Self {
            key,
            store,
            config,
            committed: None,
            queue: Vec::new(),
            busy: false,
            stop_when_drained: false,
            last_active: Instant::now(),
            supervisor,
        }
    }

    fn is_drained(&self) -> bool {
        !self.busy && self.queue.is_empty()
    }

    /// Moves the actor forward: restore if needed, else write what is queued;
    /// then, if passivation was asked for and nothing is left, stop.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.busy && !self.queue.is_empty() {
            match self.committed.clone() {
                None => self.restore(ctx),
                // May answer everything at once (reads, redeliveries) and stay idle.
                Some(committed) => self.write_queued(committed, ctx),
            }
        }
        if self.stop_when_drained && self.is_drained() {
            ctx.stop();
        }
    }

    fn restore(&mut self, ctx: &mut Context<Self>) {
        self.busy = true;
        let (store, key) = (self.store.clone(), self.key.clone());
        ctx.spawn(
            async move { store.load(&key).await }
                .into_actor(self)
                .map(|restored, actor, ctx| {
                    actor.busy = false;
                    // Idle time counts from the end of work, not its start.
                    actor.last_active = Instant::now();
                    match restored {
                        Ok(stored) => actor.committed = Some(stored.unwrap_or_else(StoredState::initial)),
                        Err(error) => {
                            warn!(user = %actor.key, %error, "restore failed; queued commands fail, the next one retries");
                            for queued in actor.queue.drain(..) {
                                let _ = queued.reply.send(Err(CommandError::from_store(&actor.key, error.clone())));
                            }
                        }
                    }
                    actor.pump(ctx);
                }),
        );
    }

    fn write_queued(&mut self, committed: StoredState, ctx: &mut Context<Self>) {
        let policy = self.config.policy();
        let mut state = committed.state;
        // Every state this write commits, one per change: the feed gets each.
        let mut changes = Vec::new();
        let mut written = Vec::with_capacity(self.queue.len());
        for queued in std::mem::take(&mut self.queue) {
            match apply_event(&state, &queued.event, queued.received_at, &policy) {
                // A read or a redelivered event before any change: answer now.
                None if changes.is_empty() => {
                    let _ = queued.reply.send(Ok(state.clone()));
                }
                // Otherwise it is answered once the changes before it commit.
                None => written.push((queued, state.clone())),
                Some(next) => {
                    state = next;
                    changes.push(state.clone());
                    queued
                        .span
                        .record("revision", committed.revision.0 + changes.len() as u64);
                    written.push((queued, state.clone()));
                }
            }
        }
        if changes.is_empty() {
            return;
        }
        let expected = committed.revision;
        self.busy = true;
        let (store, key) = (self.store.clone(), self.key.clone());
        ctx.spawn(
            async move {
                let result = store.write_changes(&key, expected, &changes).await;
                result.map(|revision| StoredState { revision, state })
            }
            .into_actor(self)
            .map(move |result, actor, ctx| {
                actor.busy = false;
                actor.last_active = Instant::now();
                actor.settle(result, written);
                actor.pump(ctx);
            }),
        );
    }

    /// Answers the events of a finished write, or queues them again after a conflict.
    fn settle(&mut self, result: Result<StoredState, StoreError>, written: Vec<(Queued, UserState)>) {
        let error = match result {
            Ok(stored) => {
                debug!(user = %self.key, revision = %stored.revision, events = written.len(), "committed");
                self.committed = Some(stored);
                for (queued, state) in written {
                    let _ = queued.reply.send(Ok(state));
                }
                return;
            }
            Err(error) => error,
        };
        // The stored state is not what this actor believed: reload first.
        self.committed = None;
        let mut retry = Vec::new();
        for (mut queued, _) in written {
            if matches!(error, StoreError::Conflict { .. }) && queued.conflicts < self.config.conflict_retries {
                queued.conflicts += 1;
                retry.push(queued);
            } else {
                let _ = queued
                    .reply
                    .send(Err(CommandError::from_store(&self.key, error.clone())));
            }
        }
        if retry.is_empty() {
            warn!(user = %self.key, %error, "write failed; reloading before the next command");
        } else {
            debug!(user = %self.key, retrying = retry.len(), "conflict; reloading to apply again");
            // Ahead of what arrived meanwhile: order is kept.
            retry.append(&mut self.queue);
            self.queue = retry;
        }
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if !self.is_drained() || self.last_active.elapsed() < self.config.idle_timeout {
            return;
        }
        match &mut self.supervisor {
            None => {
                debug!(user = %self.key, "idle; stopping");
                ctx.stop();
            }
            Some(supervisor) if !supervisor.passivation_requested => {
                debug!(user = %self.key, "idle; asking the manager to passivate");
                supervisor.passivation_requested = true;
                supervisor.manager.do_send(PassivationRequested {
                    key: self.key.clone(),
                    incarnation: supervisor.incarnation,
                });
            }
            Some(_) => {}
        }
    }
}

impl Actor for UserStateActor {
    type Context = Context<Self>;

    /// Starts the actor with an unbounded mailbox: nothing sent to it waits
    /// outside the mailbox, so the manager can rely on everything it
    /// forwarded being queued ahead of `Passivate`.
    fn start(self) -> Addr<Self> {
        super::start_unbounded(self, None)
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restore(ctx);
        ctx.run_interval(self.config.idle_check_interval, Self::check_idle);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(supervisor) = &self.supervisor {
            supervisor.manager.do_send(ChildStopped {
                key: self.key.clone(),
                incarnation: supervisor.incarnation,
            });
        }
    }
}

impl UserStateActor {
    /// Queues `event` and answers once it is applied and committed.
    fn accept(&mut self, event: Event, ctx: &mut Context<Self>) -> ResponseFuture<Result<UserState, CommandError>> {
        self.last_active = Instant::now();
        let key = self.key.clone();
        if self.queue.len() >= self.config.max_queued_per_user {
            let limit = self.config.max_queued_per_user;
            metrics::counter!(
                "persist_durable_commands_total",
                "command" => event.command.name(),
                "outcome" => "overloaded"
            )
            .increment(1);
            return Box::pin(async move {
                Err(CommandError::Overloaded {
                    key,
                    reason: format!("{limit} commands are already queued for this user"),
                })
            });
        }
        let command = event.command.name();
        let span = tracing::debug_span!("command", user = %key, command, revision = tracing::field::Empty);
        let (reply, answer) = oneshot::channel();
        self.queue.push(Queued {
            event,
            received_at: self.config.clock.now(),
            reply,
            conflicts: 0,
            span: span.clone(),
        });
        self.pump(ctx);
        Box::pin(
            async move {
                let reply = answer.await.unwrap_or_else(|_| {
                    Err(CommandError::NotDelivered {
                        key,
                        reason: "the user's actor stopped before answering".into(),
                    })
                });
                let outcome = reply.as_ref().map_or_else(CommandError::kind, |_| "ok");
                metrics::counter!("persist_durable_commands_total", "command" => command, "outcome" => outcome)
                    .increment(1);
                reply
            }
            .instrument(span),
        )
    }
}

impl Handler<Command> for UserStateActor {
    /// Answered from a channel, so the mailbox keeps flowing while a write is
    /// in flight: that is what lets queued commands share the next write.
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, command: Command, ctx: &mut Self::Context) -> Self::Result {
        self.accept(command.into(), ctx)
    }
}

impl Handler<Event> for UserStateActor {
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, event: Event, ctx: &mut Self::Context) -> Self::Result {
        self.accept(event, ctx)
    }
}

/// Sent by the manager once it holds back further commands for this user:
/// everything it forwarded earlier is already in the mailbox ahead of this.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;

impl Handler<Passivate> for UserStateActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        debug!(user = %self.key, "passivating once drained");
        self.stop_when_drained = true;
        self.pump(ctx);
    }
}
