use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::debug;

use super::start_unbounded;
use super::user_state_actor::{Passivate, UserStateActor};
use crate::config::Config;
use crate::domain::{Command, Event, UserKey, UserState};
use crate::error::CommandError;
use crate::store::SharedStore;

/// A command for one user, sent to the [`UserStateManager`].
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<UserState, CommandError>")]
pub struct UserCommand {
    /// The user.
    pub key: UserKey,
    /// What they did or what is asked, with the event's id and time if known.
    pub event: Event,
}

impl UserCommand {
    /// `command` (a [`Command`] or an [`Event`]) for the user `key`.
    pub fn new(key: UserKey, command: impl Into<Event>) -> Self {
        Self {
            key,
            event: command.into(),
        }
    }

    /// The command itself.
    pub fn command(&self) -> &Command {
        &self.event.command
    }
}

/// Asks the manager for its counters.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ManagerStats")]
pub struct GetManagerStats;

/// What the manager has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Users with an actor now (passivating ones included).
    pub resident_users: usize,
    /// User actors started: first activations and restores after passivation.
    pub activations: u64,
    /// User actors passivated for idleness.
    pub passivations: u64,
    /// Commands that arrived while their user was passivating and were handed
    /// to the user's next actor.
    pub commands_held_during_passivation: u64,
    /// Users passivated early because [`Config::max_resident_users`] was reached.
    pub evictions: u64,
    /// Commands refused with [`CommandError::Overloaded`] by the manager.
    pub commands_refused: u64,
}

/// Routes each [`UserCommand`] to its user's [`UserStateActor`], starting
/// (and so restoring) the actor when the user has none.
///
/// Passivation is a handshake, as in Pekko's cluster sharding: an idle actor
/// asks to be passivated; from then on the manager holds back new commands
/// for that user and sends the actor a `Passivate` message behind everything already
/// forwarded. The actor handles those first, then stops; when it has stopped
/// (its last write committed), the held-back commands go to a new actor,
/// which restores the committed state first. No command is lost, bounced with
/// a mailbox error, or applied twice.
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
pub struct UserStateManager {
    store: SharedStore,
    config: Arc<Config>,
    /// Where user actors run; empty: on the manager's own arbiter.
    arbiters: Vec<Arbiter>,
    children: HashMap<UserKey, Child>,
    stats: ManagerStats,
    next_incarnation: u64,
    /// Commands forwarded and not yet answered, across all users.
    in_flight: Arc<AtomicUsize>,
    /// A logical clock: one tick per command, to find the least recently used users.
    ticks: u64,
    /// Children told to passivate that have not stopped yet.
    passivating: usize,
}

struct Child {
    addr: Addr<UserStateActor>,
    incarnation: u64,
    /// The tick of the last command for this user.
    last_used: u64,
    /// `Some` once the child was told to passivate: commands held for its successor.
    held: Option<Vec<HeldCommand>>,
}

struct HeldCommand {
    event: Event,
    reply: oneshot::Sender<Result<UserState, CommandError>>,
}

impl UserStateManager {
    /// A manager whose user actors persist to `store` and behave as `config` says.
    pub fn new(store: SharedStore, config: Config) -> Self {
        Self {
            store,
            arbiters: Vec::new(),
            config: Arc::new(config),
            children: HashMap::new(),
            stats: ManagerStats::default(),
            next_incarnation: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
            ticks: 0,
            passivating: 0,
        }
    }

    /// Passivates the least recently used users once there are more than
    /// [`Config::max_resident_users`]: a hundredth of the limit at a time, so
    /// the scan is paid once per many activations.
    fn evict_least_recently_used(&mut self) {
        let limit = self.config.max_resident_users;
        // Users already passivating are on their way out: they do not count.
        let active = self.children.len() - self.passivating;
        if active <= limit {
            return;
        }
        let excess = active - limit + limit / 100;
        let mut candidates: Vec<(u64, UserKey)> = self
            .children
            .iter()
            .filter(|(_, child)| child.held.is_none())
            .map(|(key, child)| (child.last_used, key.clone()))
            .collect();
        let excess = excess.min(candidates.len());
        if excess == 0 {
            return;
        }
        candidates.select_nth_unstable_by_key(excess - 1, |(last_used, _)| *last_used);
        for (_, key) in candidates.into_iter().take(excess) {
            if let Some(child) = self.children.get_mut(&key) {
                child.held = Some(Vec::new());
                child.addr.do_send(Passivate);
                self.passivating += 1;
                self.stats.evictions += 1;
            }
        }
    }

    fn spawn_child(&mut self, key: &UserKey, ctx: &mut Context<Self>) -> Child {
        self.next_incarnation += 1;
        self.stats.activations += 1;
        metrics::counter!("persist_durable_activations_total").increment(1);
        let actor = UserStateActor::supervised(
            key.clone(),
            self.store.clone(),
            self.config.clone(),
            ctx.address(),
            self.next_incarnation,
        );
        // Round robin: consecutive activations land on different threads.
        let arbiter = (!self.arbiters.is_empty())
            .then(|| self.arbiters[(self.next_incarnation % self.arbiters.len() as u64) as usize].handle());
        let addr = start_unbounded(actor, arbiter.as_ref());
        Child {
            addr,
            incarnation: self.next_incarnation,
            last_used: self.ticks,
            held: None,
        }
    }
}

impl Actor for UserStateManager {
    type Context = Context<Self>;

    /// Starts the manager with an unbounded mailbox: callers burst far beyond
    /// actix's default of 16 queued messages.
    fn start(self) -> Addr<Self> {
        start_unbounded(self, None)
    }

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.arbiters = (0..self.config.arbiters).map(|_| Arbiter::new()).collect();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// Counts a command in flight until it is answered.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Forwards `event` to `child` and answers with the child's reply.
fn forward(
    key: UserKey,
    child: &Addr<UserStateActor>,
    event: Event,
) -> ResponseFuture<Result<UserState, CommandError>> {
    // `send` queues the message now, in order; only the reply is awaited.
    let request = child.send(event);
    Box::pin(async move {
        request.await.unwrap_or_else(|error| {
            Err(CommandError::NotDelivered {
                key,
                reason: error.to_string(),
            })
        })
    })
}

impl Handler<UserCommand> for UserStateManager {
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, UserCommand { key, event }: UserCommand, ctx: &mut Self::Context) -> Self::Result {
        if self.in_flight.load(Ordering::Relaxed) >= self.config.max_commands_in_flight {
            self.stats.commands_refused += 1;
            metrics::counter!(
                "persist_durable_commands_total",
                "command" => event.command.name(),
                "outcome" => "overloaded"
            )
            .increment(1);
            let limit = self.config.max_commands_in_flight;
            return Box::pin(async move {
                Err(CommandError::Overloaded {
                    key,
                    reason: format!("{limit} commands are already in flight"),
                })
            });
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight(self.in_flight.clone());
        self.ticks += 1;
        if !self.children.contains_key(&key) {
            let child = self.spawn_child(&key, ctx);
            self.children.insert(key.clone(), child);
            self.evict_least_recently_used();
            metrics::gauge!("persist_durable_resident_users").set(self.children.len() as f64);
        }
        let Some(child) = self.children.get_mut(&key) else {
            unreachable!("inserted above")
        };
        child.last_used = self.ticks;
        match &mut child.held {
            None => {
                let answer = forward(key, &child.addr, event);
                Box::pin(async move {
                    let _counted = in_flight;
                    answer.await
                })
            }
            Some(held) => {
                self.stats.commands_held_during_passivation += 1;
                let (reply, answer) = oneshot::channel();
                held.push(HeldCommand { event, reply });
                Box::pin(async move {
                    let _counted = in_flight;
                    answer.await.unwrap_or_else(|_| {
                        Err(CommandError::NotDelivered {
                            key,
                            reason: "the manager stopped while the user was passivating".into(),
                        })
                    })
                })
            }
        }
    }
}

/// From a child: it has been idle long enough.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PassivationRequested {
    pub(crate) key: UserKey,
    pub(crate) incarnation: u64,
}

impl Handler<PassivationRequested> for UserStateManager {
    type Result = ();

    fn handle(&mut self, request: PassivationRequested, _ctx: &mut Self::Context) {
        let Some(child) = self.children.get_mut(&request.key) else {
            return;
        };
        if child.incarnation == request.incarnation && child.held.is_none() {
            child.held = Some(Vec::new());
            child.addr.do_send(Passivate);
            self.passivating += 1;
        }
    }
}

/// From a child's `stopped`: its mailbox is drained and its last write done.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChildStopped {
    pub(crate) key: UserKey,
    pub(crate) incarnation: u64,
}

impl Handler<ChildStopped> for UserStateManager {
    type Result = ();

    fn handle(&mut self, stopped: ChildStopped, ctx: &mut Self::Context) {
        let Some(child) = self.children.get(&stopped.key) else {
            return;
        };
        if child.incarnation != stopped.incarnation {
            return;
        }
        let Some(child) = self.children.remove(&stopped.key) else {
            return;
        };
        if child.held.is_some() {
            self.passivating -= 1;
            self.stats.passivations += 1;
            metrics::counter!("persist_durable_passivations_total").increment(1);
        }
        metrics::gauge!("persist_durable_resident_users").set(self.children.len() as f64);
        let held = child.held.unwrap_or_default();
        debug!(user = %stopped.key, held = held.len(), "user actor stopped");
        if held.is_empty() {
            return;
        }
        let successor = self.spawn_child(&stopped.key, ctx);
        for HeldCommand { event, reply } in held {
            // Counted in flight already, by the handler's future waiting on `reply`.
            let answer = forward(stopped.key.clone(), &successor.addr, event);
            actix::spawn(async move {
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(answer.await);
            });
        }
        self.children.insert(stopped.key, successor);
    }
}

impl Handler<GetManagerStats> for UserStateManager {
    type Result = MessageResult<GetManagerStats>;

    fn handle(&mut self, _: GetManagerStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(ManagerStats {
            resident_users: self.children.len(),
            ..self.stats
        })
    }
}
