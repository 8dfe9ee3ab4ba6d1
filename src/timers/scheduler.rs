//! The scheduler of one manager's timers: a task that holds the timers due
//! within a bounded window, sleeps until the next is due, fires it through
//! the manager like a command, and reads the next window when it is through.
//!
//! What it holds is bounded by [`TimerConfig::batch`], whatever the number
//! pending: the store returns the earliest due first, and a full batch
//! narrows the window to its last due time. It reads again half a window
//! before the window ends (one query per half window at rest, no hot
//! polling and no LISTEN/NOTIFY), when a full batch is through, and when
//! this node's slices change in cluster mode. A timer this node sets within
//! the window is handed to it by the write that committed it. Nothing it
//! holds is needed for correctness: a fire commits only while its timer row
//! is still at the due time fired for, so firing twice, or from two nodes,
//! applies once; what it drops is read again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{Missed, Schedule, TimerConfig};
use crate::clock::Clock;
use crate::cluster::Ownership;
use crate::entity::{PersistenceId, Slice};
use crate::error::StoreError;
use crate::store::{SharedStore, StoredTimer, TimerFired};

/// A timer's fire, as the entity's actor decides it.
#[derive(Debug, Clone)]
pub(crate) struct Fire {
    pub(crate) name: String,
    /// The due time it fires for: its write commits only while the timer is still there.
    pub(crate) due: DateTime<Utc>,
    pub(crate) schedule: String,
    pub(crate) command: Vec<u8>,
    pub(crate) missed: i32,
}

impl Fire {
    /// The fire of a stored timer, and its entity.
    pub(crate) fn of(timer: StoredTimer) -> (PersistenceId, Fire) {
        let fire = Fire {
            name: timer.name,
            due: timer.due,
            schedule: timer.schedule,
            command: timer.command,
            missed: timer.missed,
        };
        (timer.key, fire)
    }

    /// Fired at `now`: whether its command is delivered (a missed
    /// occurrence may be skipped), and what its write does to the timer.
    pub(crate) fn outcome(&self, now: DateTime<Utc>) -> (bool, TimerFired) {
        // A schedule this version cannot read fires once.
        let (deliver, next) = Schedule::decode(&self.schedule).map_or((true, None), |schedule| {
            schedule.after_fire(self.due, now, Missed::from_code(self.missed))
        });
        let fired = TimerFired {
            name: self.name.clone(),
            due: self.due,
            next,
        };
        (deliver, fired)
    }

    /// The timer as stored once moved on to `due`.
    pub(crate) fn stored(&self, key: PersistenceId, due: DateTime<Utc>) -> StoredTimer {
        StoredTimer {
            key,
            name: self.name.clone(),
            due,
            schedule: self.schedule.clone(),
            command: self.command.clone(),
            missed: self.missed,
        }
    }
}

/// A fire on its way: answered `Err` with why, when it was not committed
/// (or committed a refusal); the scheduler then holds off that timer.
pub(crate) type Firing = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where a scheduler's fires go: its manager's shards, which deliver each
/// to its entity's actor.
pub(crate) trait FireTarget: Send + Sync + 'static {
    /// Delivers `fire` to the entity `key`.
    fn fire(&self, key: PersistenceId, fire: Fire) -> Firing;
}

/// What the writes and the testkit ask of a scheduler.
enum Request {
    /// Timers set on this node within the window.
    Expect(Vec<StoredTimer>),
    /// Fire everything due now, and answer once it is done.
    Flush(oneshot::Sender<()>),
    /// Fire nothing more.
    Stop,
}

/// The writes' and the manager's way to a scheduler.
#[derive(Clone)]
pub(crate) struct SchedulerHandle {
    requests: mpsc::UnboundedSender<Request>,
    /// Timers due before it (milliseconds since the epoch) are what the
    /// scheduler holds, or would have read.
    horizon: Arc<AtomicI64>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle").finish_non_exhaustive()
    }
}

impl SchedulerHandle {
    /// Whether a timer due at `due` falls within the scheduler's window, or
    /// may: before its first read, every timer is handed over (a read in
    /// flight may not see a timer committed meanwhile).
    pub(crate) fn holds(&self, due: DateTime<Utc>) -> bool {
        let horizon = self.horizon.load(Ordering::Acquire);
        horizon == i64::MIN || due.timestamp_millis() < horizon
    }

    /// Hands the scheduler timers committed on this node within its window.
    pub(crate) fn expect(&self, timers: Vec<StoredTimer>) {
        if !timers.is_empty() {
            let _ = self.requests.send(Request::Expect(timers));
        }
    }

    /// Fires every timer due by the clock's now, and returns once those
    /// fires (and any they made due now) are answered.
    pub(crate) async fn fire_due(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }

    /// Stops firing: the manager is stopping.
    pub(crate) fn stop(&self) {
        let _ = self.requests.send(Request::Stop);
    }
}

/// How many timers a flush fires at most: a recurring timer catching up
/// every missed occurrence fires again and again.
const FLUSH_LIMIT: usize = 1_000_000;

/// How long after a change of this node's slices their timers are read.
const OWNERSHIP_SETTLES_MS: i64 = 100;

/// The longest a failed fire is held off before it is tried again.
const MAX_HOLD_OFF: Duration = Duration::from_secs(60);

/// The scheduler of one entity type's timers on this node.
pub(crate) struct Scheduler {
    entity_type: &'static str,
    store: SharedStore,
    config: TimerConfig,
    clock: Arc<dyn Clock>,
    /// In cluster mode: only the timers of this node's slices are fired.
    ownership: Option<Arc<Ownership>>,
    target: Arc<dyn FireTarget>,
    requests: mpsc::UnboundedReceiver<Request>,
    horizon: Arc<AtomicI64>,
    state: Held,
}

/// A timer at one of its due times: what a fire is for.
type Occurrence = (PersistenceId, String, DateTime<Utc>);

/// What a scheduler holds.
#[derive(Default)]
struct Held {
    /// Due within the window, by due time.
    due: BTreeMap<(DateTime<Utc>, PersistenceId, String), StoredTimer>,
    /// Each held timer's due time, by entity and name.
    index: HashMap<(PersistenceId, String), DateTime<Utc>>,
    /// Fired, not yet answered.
    in_flight: HashSet<(PersistenceId, String)>,
    /// Fires that failed, held off until then, with how often they failed.
    held_off: HashMap<Occurrence, (DateTime<Utc>, u32)>,
    /// Every timer due before it is held (or was read); `None`: read now.
    horizon: Option<DateTime<Utc>>,
    /// The last read was a full batch: the window ends at its last due time.
    truncated: bool,
    /// No read before this, after one that found nothing to fire.
    quiet_until: Option<DateTime<Utc>>,
    /// The ownership version the last read saw.
    ownership_version: u64,
}

type Answered = (Occurrence, Result<(), String>);

impl Scheduler {
    /// A scheduler of `entity_type`'s timers in `store`, firing through
    /// `target`, and the handle its manager's writes reach it by.
    pub(crate) fn new(
        entity_type: &'static str,
        store: SharedStore,
        config: TimerConfig,
        clock: Arc<dyn Clock>,
        ownership: Option<Arc<Ownership>>,
        target: Arc<dyn FireTarget>,
    ) -> (Self, SchedulerHandle) {
        let (sender, requests) = mpsc::unbounded_channel();
        let horizon = Arc::new(AtomicI64::new(i64::MIN));
        let handle = SchedulerHandle {
            requests: sender,
            horizon: horizon.clone(),
        };
        let scheduler = Scheduler {
            entity_type,
            store,
            config,
            clock,
            ownership,
            target,
            requests,
            horizon,
            state: Held::default(),
        };
        (scheduler, handle)
    }

    /// Runs until stopped, or until every handle is gone.
    pub(crate) async fn run(mut self) {
        let mut fires: FuturesUnordered<Pin<Box<dyn Future<Output = Answered> + Send>>> = FuturesUnordered::new();
        loop {
            let now = self.clock.now();
            self.follow_ownership(now);
            if self.needs_read(now, fires.is_empty()) {
                self.read(now).await;
            }
            self.dispatch(now, &mut fires);
            let wake = self.next_wake(now, fires.len());
            let sleep = (wake - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(1));
            let ownership = self.ownership.clone();
            let changed = ownership.as_deref().map(Ownership::changed);
            tokio::select! {
                Some(answered) = fires.next(), if !fires.is_empty() => self.answered(answered),
                request = self.requests.recv() => match request {
                    None | Some(Request::Stop) => return,
                    Some(Request::Expect(timers)) => self.expect(timers),
                    Some(Request::Flush(reply)) => {
                        self.flush(&mut fires).await;
                        let _ = reply.send(());
                    }
                },
                () = tokio::time::sleep(sleep) => {}
                () = async { match changed { Some(changed) => changed.await, None => std::future::pending().await } } => {}
            }
        }
    }

    /// In cluster mode: the slices this node owns, when they changed since
    /// the last read (a read is due then, and timers of slices lost are
    /// dropped). A hand-over moves slices one by one: the read waits for
    /// them to settle, so it is one read, not one per slice.
    fn follow_ownership(&mut self, now: DateTime<Utc>) {
        let Some(ownership) = &self.ownership else { return };
        let version = ownership.version();
        if version == self.state.ownership_version {
            return;
        }
        self.state.ownership_version = version;
        self.state.horizon = None;
        self.state.quiet_until = Some(now + chrono::Duration::milliseconds(OWNERSHIP_SETTLES_MS));
        let lost: Vec<_> = self
            .state
            .due
            .keys()
            .filter(|(_, key, _)| !ownership.owns(key.slice()))
            .cloned()
            .collect();
        for slot in lost {
            self.state.due.remove(&slot);
            self.state.index.remove(&(slot.1, slot.2));
        }
    }

    /// The slices whose timers this node fires: `None` for all.
    fn slices(&self) -> Option<Vec<Slice>> {
        self.ownership
            .as_ref()
            .map(|ownership| ownership.owned().into_iter().map(|(slice, _)| slice).collect())
    }

    fn needs_read(&self, now: DateTime<Utc>, idle: bool) -> bool {
        if self.state.quiet_until.is_some_and(|quiet| now < quiet) {
            return false;
        }
        match self.state.horizon {
            None => true,
            // A full batch is through: the next one.
            Some(_) if self.state.truncated => self.state.due.is_empty() && idle,
            Some(horizon) => now + half(self.config.window) >= horizon,
        }
    }

    /// Reads the timers due within the window from now.
    async fn read(&mut self, now: DateTime<Utc>) {
        let until = now + chrono::Duration::from_std(self.config.window).unwrap_or(chrono::Duration::MAX);
        let slices = self.slices();
        let read = match &slices {
            Some(slices) if slices.is_empty() => Ok(Vec::new()),
            _ => {
                self.store
                    .due_timers(self.entity_type, until, slices.as_deref(), self.config.batch)
                    .await
            }
        };
        let timers = match read {
            Ok(timers) => timers,
            Err(error) => return self.read_failed(now, &error),
        };
        let truncated = timers.len() >= self.config.batch;
        let horizon = match timers.last() {
            Some(last) if truncated => last.due,
            _ => until,
        };
        let before = self.state.due.len();
        for timer in timers {
            self.hold(timer, now);
        }
        self.state.truncated = truncated;
        self.state.horizon = Some(horizon);
        self.horizon.store(horizon.timestamp_millis(), Ordering::Release);
        // A full batch of nothing to fire (all held off): not again at once.
        self.state.quiet_until =
            (truncated && self.state.due.len() == before).then(|| now + chrono::Duration::seconds(1));
    }

    fn read_failed(&mut self, now: DateTime<Utc>, error: &StoreError) {
        warn!(entity = self.entity_type, %error, "reading the due timers failed; trying again in a second");
        metrics::counter!("persist_durable_timer_read_failures_total", "entity" => self.entity_type).increment(1);
        self.state.quiet_until = Some(now + chrono::Duration::seconds(1));
    }

    /// Holds `timer` unless it is in flight or held off.
    fn hold(&mut self, timer: StoredTimer, now: DateTime<Utc>) {
        let slot = (timer.key.clone(), timer.name.clone());
        if self.state.in_flight.contains(&slot) {
            return;
        }
        let off = (timer.key.clone(), timer.name.clone(), timer.due);
        if self.state.held_off.get(&off).is_some_and(|(until, _)| now < *until) {
            return;
        }
        if let Some(previous) = self.state.index.insert(slot.clone(), timer.due) {
            // Moved: only its latest due time is held.
            self.state.due.remove(&(previous, slot.0.clone(), slot.1.clone()));
        }
        self.state.due.insert((timer.due, slot.0, slot.1), timer);
    }

    /// Timers committed on this node: held if within the window, or if no
    /// window is read yet (the read to come may have begun before their
    /// commit, and not see them).
    fn expect(&mut self, timers: Vec<StoredTimer>) {
        let now = self.clock.now();
        for timer in timers {
            let within = self.state.horizon.is_none_or(|horizon| timer.due < horizon);
            let owned = self
                .ownership
                .as_ref()
                .is_none_or(|ownership| ownership.owns(timer.key.slice()));
            if within && owned {
                self.hold(timer, now);
            }
        }
    }

    /// Fires what is due, up to the bound in flight.
    fn dispatch(
        &mut self,
        now: DateTime<Utc>,
        fires: &mut FuturesUnordered<Pin<Box<dyn Future<Output = Answered> + Send>>>,
    ) {
        while fires.len() < self.config.in_flight {
            let Some(entry) = self.state.due.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            self.state.index.remove(&(timer.key.clone(), timer.name.clone()));
            fires.push(self.fire(timer));
        }
    }

    fn fire(&mut self, timer: StoredTimer) -> Pin<Box<dyn Future<Output = Answered> + Send>> {
        let slot = (timer.key.clone(), timer.name.clone(), timer.due);
        self.state.in_flight.insert((timer.key.clone(), timer.name.clone()));
        let lag = (self.clock.now() - timer.due).to_std().unwrap_or(Duration::ZERO);
        metrics::histogram!("persist_durable_timer_lag_seconds", "entity" => self.entity_type)
            .record(lag.as_secs_f64());
        let (key, fire) = Fire::of(timer);
        let firing = self.target.fire(key, fire);
        Box::pin(async move { (slot, firing.await) })
    }

    fn answered(&mut self, ((key, name, due), result): Answered) {
        self.state.in_flight.remove(&(key.clone(), name.clone()));
        let outcome = if result.is_ok() { "fired" } else { "failed" };
        metrics::counter!("persist_durable_timer_fires_total", "entity" => self.entity_type, "outcome" => outcome)
            .increment(1);
        let Err(error) = result else { return };
        // Not committed, or committed as a refusal: either way not fired
        // again from here for a while; a read finds it if it is still due.
        let now = self.clock.now();
        let off = (key, name, due);
        let attempts = self.state.held_off.get(&off).map_or(0, |(_, attempts)| *attempts) + 1;
        let wait = Duration::from_millis(100)
            .saturating_mul(2u32.saturating_pow(attempts.min(16)))
            .min(MAX_HOLD_OFF);
        debug!(entity = self.entity_type, timer = %off.1, key = %off.0, %error, ?wait, "a timer's fire did not commit");
        self.state.held_off.insert(
            off,
            (now + chrono::Duration::from_std(wait).unwrap_or_default(), attempts),
        );
        // Bounded: the oldest hold-offs go first (they are read again).
        if self.state.held_off.len() > self.config.batch.saturating_mul(4) {
            self.state.held_off.retain(|_, (until, _)| *until > now);
        }
    }

    /// When to look again: the next due time if a fire has room, the end of
    /// the window's first half, or a quiet spell's end.
    fn next_wake(&self, now: DateTime<Utc>, in_flight: usize) -> DateTime<Utc> {
        let mut wake = match self.state.horizon {
            Some(horizon) if !self.state.truncated => horizon - half(self.config.window),
            Some(_) => now + chrono::Duration::from_std(self.config.window).unwrap_or(chrono::Duration::MAX),
            None => now,
        };
        if let Some(quiet) = self.state.quiet_until {
            wake = wake.max(quiet);
        }
        if in_flight < self.config.in_flight {
            if let Some(((due, _, _), _)) = self.state.due.first_key_value() {
                wake = wake.min(*due);
            }
        }
        wake
    }

    /// Fires every timer due by now, straight from the store, and waits
    /// for each: the testkit's `advance`.
    async fn flush(&mut self, fires: &mut FuturesUnordered<Pin<Box<dyn Future<Output = Answered> + Send>>>) {
        let mut failed: HashSet<Occurrence> = HashSet::new();
        let mut fired = 0;
        while fired < FLUSH_LIMIT {
            let now = self.clock.now();
            let slices = self.slices();
            let due = self
                .store
                .due_timers(
                    self.entity_type,
                    now + chrono::Duration::milliseconds(1),
                    slices.as_deref(),
                    self.config.batch,
                )
                .await;
            let due: Vec<StoredTimer> = match due {
                Ok(due) => due
                    .into_iter()
                    .filter(|timer| !failed.contains(&(timer.key.clone(), timer.name.clone(), timer.due)))
                    .filter(|timer| !self.state.in_flight.contains(&(timer.key.clone(), timer.name.clone())))
                    .collect(),
                Err(error) => {
                    warn!(entity = self.entity_type, %error, "reading the due timers failed");
                    Vec::new()
                }
            };
            if due.is_empty() && fires.is_empty() {
                break;
            }
            for timer in due {
                let slot = (timer.key.clone(), timer.name.clone());
                if let Some(previous) = self.state.index.remove(&slot) {
                    self.state.due.remove(&(previous, slot.0, slot.1));
                }
                fired += 1;
                fires.push(self.fire(timer));
            }
            while let Some(answered) = fires.next().await {
                if answered.1.is_err() {
                    failed.insert(answered.0.clone());
                }
                self.answered(answered);
            }
        }
        // What the fires set since is read with the next window.
        self.state.horizon = None;
    }
}

fn half(window: Duration) -> chrono::Duration {
    chrono::Duration::from_std(window / 2).unwrap_or(chrono::Duration::MAX)
}
