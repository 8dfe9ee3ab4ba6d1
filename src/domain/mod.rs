//! The user state, the crate's first entity: who a user is, what we
//! remember about them, and how each command changes it. Plain data and pure
//! functions; no actix, no diesel, so every rule here is testable without a
//! runtime or a database.

pub mod cart;
mod command;
pub(crate) mod key;
mod state;

pub use command::{Command, Event};
pub use key::{ProductId, UserKey};
pub use state::{apply, apply_event, StatePolicy, UserState};
