//! The domain: who a user is, what we remember about them, and how each
//! command changes it. Plain data and pure functions; no actix, no diesel,
//! so every rule here is testable without a runtime or a database.

mod clock;
mod command;
mod event;
mod key;
mod state;

pub use clock::{Clock, ManualClock, SystemClock};
pub use command::Command;
pub use event::{Event, EventId};
pub use key::{ProductId, UserKey, MAX_ID_BYTES};
pub use state::{apply, apply_event, StatePolicy, UserState};
