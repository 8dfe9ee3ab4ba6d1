//! Durable timers: "deliver this command to this entity at time T", as part
//! of the entity's own revision-checked state changes.
//!
//! An entity says which timers its state wants
//! ([`DurableEntity::timers`](crate::DurableEntity::timers)): after each
//! write the machinery compares what the state before and after it want,
//! and sets, moves or cancels their rows in the same statement that commits
//! the state, so a timer exists exactly when the state that set it
//! committed. A timer carries a command, delivered to its entity at or after
//! its due time through the ordinary path (restored first if passivated). A
//! fire commits the timer's deletion (or its next occurrence) in the same
//! revision-checked statement as the state it produces, and only if the
//! timer row is still at the due time it fired for: two nodes firing one
//! timer apply it once, a node killed mid-fire leaves it to fire again, and
//! a fire is late at worst, never early (by the firing node's clock).
//!
//! Pending timers live in the database (`entity_timers`, indexed by due
//! time), not in memory: a scheduler per manager holds the timers due within
//! a bounded window ([`TimerConfig::window`], 60 s by default; at most
//! [`TimerConfig::batch`] of them), sleeps until the next due time, and
//! reads the next window when it is through. A timer set on this node
//! within the window goes straight in. In cluster mode only the owner of a
//! timer's entity (its slice) fires it. See `docs/timers.md`.
//!
//! ```
//! use chrono::{DateTime, Duration, Utc};
//! use persist_durable::{DurableEntity, Id, Never, Timer};
//!
//! #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
//! struct Watch { since: Option<DateTime<Utc>>, stale: bool }
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! enum WatchCommand { Watch, MarkStale }
//!
//! impl DurableEntity for Watch {
//!     const ENTITY_TYPE: &'static str = "Watch";
//!     const MANIFEST: &'static str = "Watch/v1";
//!     type Key = Id<Watch>;
//!     type Command = WatchCommand;
//!     type Settings = ();
//!     type Rejection = Never;
//!
//!     fn apply(&self, command: &WatchCommand, at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Never> {
//!         Ok(Some(match command {
//!             WatchCommand::Watch => Watch { since: Some(at), stale: false },
//!             WatchCommand::MarkStale => Watch { stale: true, ..self.clone() },
//!         }))
//!     }
//!
//!     // 24 hours after a watch, unless it is stale already.
//!     fn timers(&self, _: &()) -> Vec<Timer<WatchCommand>> {
//!         match self.since {
//!             Some(since) if !self.stale => vec![Timer::at("stale", since + Duration::hours(24), WatchCommand::MarkStale)],
//!             _ => Vec::new(),
//!         }
//!     }
//! }
//! ```

mod declared;
mod schedule;
pub(crate) mod scheduler;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) use declared::{changes, command_of, declared, Declared};
pub use schedule::{Missed, Schedule};
pub(crate) use scheduler::{Fire, FireTarget, Firing, Scheduler, SchedulerHandle};

/// One timer an entity's state wants ([`DurableEntity::timers`](crate::DurableEntity::timers)):
/// a name, when it fires, and the command it then delivers to the entity.
///
/// The command is encoded (as JSON) when the timer is made, and decoded
/// when it fires: a command that does not encode fails the command whose
/// state wants the timer, with [`TimerError::Command`], and stores nothing.
pub struct Timer<C> {
    pub(crate) name: String,
    pub(crate) schedule: Schedule,
    pub(crate) missed: Missed,
    /// The command as JSON, or why it did not encode.
    pub(crate) command: Result<Vec<u8>, String>,
    pub(crate) decode: fn(&[u8]) -> Result<C, String>,
}

impl<C: Serialize + DeserializeOwned> Timer<C> {
    /// Fires once, at `due` (at once if that has passed).
    pub fn at(name: impl Into<String>, due: DateTime<Utc>, command: C) -> Self {
        Self::new(name, Schedule::At(due), &command)
    }

    /// Fires every `period` (at least a millisecond), at `first` and each
    /// `period` after it: set later than `first`, at the first of those
    /// times not yet past.
    pub fn every(name: impl Into<String>, first: DateTime<Utc>, period: Duration, command: C) -> Self {
        Self::new(name, Schedule::Every { first, period }, &command)
    }

    /// Fires at each time the cron `expression` names, in UTC: five fields
    /// (minute, hour, day of month, month, day of week: `"0 9 * * MON-FRI"`),
    /// or six or seven with seconds first and a year last. An expression that
    /// does not parse fails the command whose state wants it, with
    /// [`TimerError::Cron`], and stores nothing.
    pub fn cron(name: impl Into<String>, expression: impl Into<String>, command: C) -> Self {
        Self::new(name, Schedule::Cron(expression.into()), &command)
    }

    fn new(name: impl Into<String>, schedule: Schedule, command: &C) -> Self {
        Self {
            name: name.into(),
            schedule,
            missed: Missed::Once,
            command: serde_json::to_vec(command).map_err(|error| error.to_string()),
            decode: decode_json::<C>,
        }
    }
}

impl<C> Timer<C> {
    /// What a recurring timer does with occurrences missed while no node
    /// could fire it: [`Missed::Once`] by default.
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
}

impl<C> fmt::Debug for Timer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("missed", &self.missed)
            .finish_non_exhaustive()
    }
}

fn decode_json<C: DeserializeOwned>(command: &[u8]) -> Result<C, String> {
    serde_json::from_slice(command).map_err(|error| error.to_string())
}

/// Why a timer an entity's state wants cannot be stored: the command that
/// led to that state fails with
/// [`CommandError::InvalidTimer`](crate::CommandError::InvalidTimer), and
/// nothing of it is stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TimerError {
    /// The name is empty or longer than 128 bytes, or two timers share it.
    #[error("the timer name {0:?} is empty, too long or given twice")]
    Name(String),
    /// The due time is outside what the database stores (years 1970 to 9999).
    #[error("timer {name}: {due} is out of range")]
    DueOutOfRange {
        /// The timer.
        name: String,
        /// Its due time.
        due: DateTime<Utc>,
    },
    /// A period of zero (or beyond what is stored).
    #[error("timer {name}: the period {period:?} is not a positive duration")]
    Period {
        /// The timer.
        name: String,
        /// Its period.
        period: Duration,
    },
    /// The cron expression does not parse.
    #[error("timer {name}: the cron expression {expression:?} does not parse: {reason}")]
    Cron {
        /// The timer.
        name: String,
        /// The expression.
        expression: String,
        /// What the parser said.
        reason: String,
    },
    /// The cron expression names no time to come.
    #[error("timer {name}: the cron expression {expression:?} never fires again")]
    Exhausted {
        /// The timer.
        name: String,
        /// The expression.
        expression: String,
    },
    /// The entity's `timers` panicked.
    #[error("the entity's timers panicked: {0}")]
    Panicked(String),
    /// Refused so on the node that owns the entity (a forwarded command),
    /// as that node said.
    #[error("refused by the entity's owner: {0}")]
    Remote(String),
    /// The timer's command does not encode (or, stored, no longer decodes).
    #[error("timer {name}: its command does not encode or decode: {reason}")]
    Command {
        /// The timer.
        name: String,
        /// The encoder's error.
        reason: String,
    },
}

/// A timer waiting to fire, as [`Entities::timers`](crate::Entities::timers) lists it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PendingTimer<C> {
    /// Its name.
    pub name: String,
    /// When it fires next.
    pub due: DateTime<Utc>,
    /// Its schedule.
    pub schedule: Schedule,
    /// What it does with missed occurrences.
    pub missed: Missed,
    /// The command it delivers.
    pub command: C,
}

/// How a manager's timers are fired.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TimerConfig {
    /// How far ahead the scheduler reads the due timers: 60 s by default.
    pub window: Duration,
    /// Timers read per query, and so held at most: 1,000 by default.
    pub batch: usize,
    /// Fires in flight at most (after downtime, the rate the overdue catch
    /// up at): 512 by default.
    pub in_flight: usize,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            batch: 1_000,
            in_flight: 512,
        }
    }
}

impl TimerConfig {
    /// Sets [`window`](Self::window); at least a millisecond.
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self
    }

    /// Sets [`batch`](Self::batch); at least 1.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets [`in_flight`](Self::in_flight); at least 1.
    pub fn with_in_flight(mut self, in_flight: usize) -> Self {
        self.in_flight = in_flight.max(1);
        self
    }
}
