use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::manager::{ChildStopped, PassivationRequested, UserStateManager};
use crate::config::Config;
use crate::domain::{apply, Command, StatePolicy, UserKey, UserState};
use crate::error::CommandError;
use crate::store::{SharedStore, StoredState};

impl Message for Command {
    type Result = Result<UserState, CommandError>;
}

/// Keeps one user's state in memory and every change of it in the store.
///
/// - It restores the user's state before it handles any command.
/// - It handles commands one at a time and answers a state-changing command
///   only after the new state is committed. Its in-memory state is always
///   what the store holds: after a failed or conflicting write it reloads
///   before the next command.
/// - Every [`Config::idle_check_interval`] it checks whether it has been idle
///   for [`Config::idle_timeout`]; if so it passivates.
///
/// Started on its own ([`UserStateActor::new`]) it stops itself when idle;
/// messages sent to it after that fail with a mailbox error, so a stand-alone
/// actor suits one-off use and tests. Under a [`UserStateManager`] it asks
/// the manager to passivate it instead, which makes passivation invisible to
/// senders.
pub struct UserStateActor {
    key: UserKey,
    store: SharedStore,
    config: Config,
    /// The committed state, or `None` when it must be (re)loaded before the
    /// next command: not restored yet, or a write's outcome was not success.
    committed: Option<StoredState>,
    last_active: Instant,
    supervisor: Option<Supervisor>,
}

struct Supervisor {
    manager: Addr<UserStateManager>,
    incarnation: u64,
    passivation_requested: bool,
}

impl UserStateActor {
    /// A stand-alone actor for `key`; start it with [`Actor::start`].
    pub fn new(key: UserKey, store: SharedStore, config: Config) -> Self {
        Self {
            key,
            store,
            config,
            committed: None,
            last_active: Instant::now(),
            supervisor: None,
        }
    }

    pub(crate) fn supervised(
        key: UserKey,
        store: SharedStore,
        config: Config,
        manager: Addr<UserStateManager>,
        incarnation: u64,
    ) -> Self {
        Self {
            supervisor: Some(Supervisor {
                manager,
                incarnation,
                passivation_requested: false,
            }),
            ..Self::new(key, store, config)
        }
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if self.last_active.elapsed() < self.config.idle_timeout {
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

/// The state after one command, and what the actor should remember.
struct Outcome {
    committed: Option<StoredState>,
    reply: Result<UserState, CommandError>,
}

async fn execute(
    key: UserKey,
    store: SharedStore,
    committed: Option<StoredState>,
    command: Command,
    now: DateTime<Utc>,
    policy: StatePolicy,
) -> Outcome {
    let current = match committed {
        Some(current) => current,
        None => match store.load(&key).await {
            Ok(stored) => stored.unwrap_or_else(StoredState::initial),
            Err(error) => {
                return Outcome {
                    committed: None,
                    reply: Err(CommandError::from_store(&key, error)),
                }
            }
        },
    };
    if command.is_read_only() {
        return Outcome {
            reply: Ok(current.state.clone()),
            committed: Some(current),
        };
    }
    let next = apply(&current.state, &command, now, &policy);
    match store.write(&key, current.revision, &next).await {
        Ok(revision) => {
            debug!(user = %key, command = command.name(), %revision, "committed");
            Outcome {
                reply: Ok(next.clone()),
                committed: Some(StoredState { revision, state: next }),
            }
        }
        Err(error) => {
            warn!(user = %key, command = command.name(), %error, "write failed; reloading before the next command");
            Outcome {
                committed: None,
                reply: Err(CommandError::from_store(&key, error)),
            }
        }
    }
}

impl Actor for UserStateActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Under a manager nothing may bounce off a full mailbox: the manager
        // relies on everything it forwarded being queued ahead of `Passivate`.
        ctx.set_mailbox_capacity(0); // 0: unbounded
        let (store, key) = (self.store.clone(), self.key.clone());
        // `wait` holds back every message until the state is restored.
        ctx.wait(
            async move { store.load(&key).await }
                .into_actor(self)
                .map(|restored, actor, _| match restored {
                    Ok(stored) => actor.committed = Some(stored.unwrap_or_else(StoredState::initial)),
                    // Not fatal: the first command retries and reports the error.
                    Err(error) => warn!(user = %actor.key, %error, "restore failed; will retry on the next command"),
                }),
        );
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
    /// Atomic: the next command waits until this one's write has committed.
    type Result = AtomicResponse<Self, Result<UserState, CommandError>>;

    fn handle(&mut self, command: Command, _ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        let work = execute(
            self.key.clone(),
            self.store.clone(),
            self.committed.take(),
            command,
            self.config.clock.now(),
            self.config.policy(),
        );
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|outcome, actor, _| {
            actor.committed = outcome.committed;
            actor.last_active = Instant::now();
            outcome.reply
        })))
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
        debug!(user = %self.key, "passivated");
        ctx.stop();
    }
}
