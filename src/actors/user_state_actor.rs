use std::sync::Arc;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::manager::{ChildStopped, PassivationRequested, UserStateManager};
use crate::config::Config;
use crate::domain::{apply, Command, UserKey, UserState};
use crate::error::{CommandError, StoreError};
use crate::store::{Revision, SharedStore, StoredState};

impl Message for Command {
    type Result = Result<UserState, CommandError>;
}

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
/// - Every [`Config::idle_check_interval`] it checks whether it has been idle
///   for [`Config::idle_timeout`]; if so it passivates. It never stops with a
///   load or write in flight.
///
/// Started on its own ([`UserStateActor::new`]) it stops itself when idle;
/// messages sent to it after that fail with a mailbox error, so a stand-alone
/// actor suits one-off use and tests. Under a [`UserStateManager`] it asks
/// the manager to passivate it instead, which makes passivation invisible to
/// senders.
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
    command: Command,
    received_at: DateTime<Utc>,
    reply: oneshot::Sender<Result<UserState, CommandError>>,
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

    /// Moves the actor forward: restore if needed, else write what is queued.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        if self.queue.is_empty() {
            if self.stop_when_drained {
                ctx.stop();
            }
            return;
        }
        match self.committed.clone() {
            None => self.restore(ctx),
            Some(committed) => self.write_queued(committed, ctx),
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
        let mut changes = 0;
        let mut replies = Vec::with_capacity(self.queue.len());
        for Queued {
            command,
            received_at,
            reply,
        } in self.queue.drain(..)
        {
            if command.is_read_only() {
                if changes == 0 {
                    let _ = reply.send(Ok(state.clone()));
                } else {
                    // Answered once the writes before it are committed.
                    replies.push((reply, state.clone()));
                }
            } else {
                state = apply(&state, &command, received_at, &policy);
                changes += 1;
                replies.push((reply, state.clone()));
            }
        }
        if changes == 0 {
            return;
        }
        let expected = committed.revision;
        let revision = Revision(expected.0 + changes);
        self.busy = true;
        let (store, key) = (self.store.clone(), self.key.clone());
        ctx.spawn(
            async move {
                let written = store.write(&key, expected, revision, &state).await;
                written.map(|revision| StoredState { revision, state })
            }
            .into_actor(self)
            .map(move |written, actor, ctx| {
                actor.busy = false;
                actor.last_active = Instant::now();
                actor.settle(written, replies);
                actor.pump(ctx);
            }),
        );
    }

    /// Answers the commands of a finished write.
    fn settle(
        &mut self,
        written: Result<StoredState, StoreError>,
        replies: Vec<(oneshot::Sender<Result<UserState, CommandError>>, UserState)>,
    ) {
        match written {
            Ok(stored) => {
                debug!(user = %self.key, revision = %stored.revision, commands = replies.len(), "committed");
                self.committed = Some(stored);
                for (reply, state) in replies {
                    let _ = reply.send(Ok(state));
                }
            }
            Err(error) => {
                warn!(user = %self.key, %error, "write failed; reloading before the next command");
                self.committed = None;
                for (reply, _) in replies {
                    let _ = reply.send(Err(CommandError::from_store(&self.key, error.clone())));
                }
            }
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

impl Handler<Command> for UserStateActor {
    /// Answered from a channel, so the mailbox keeps flowing while a write is
    /// in flight: that is what lets queued commands share the next write.
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, command: Command, ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        let (reply, answer) = oneshot::channel();
        self.queue.push(Queued {
            command,
            received_at: self.config.clock.now(),
            reply,
        });
        self.pump(ctx);
        let key = self.key.clone();
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(CommandError::NotDelivered {
                    key,
                    reason: "the user's actor stopped before answering".into(),
                })
            })
        })
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
