//! # persist-durable
//!
//! The latest state of every shop user, kept in an actix actor and persisted
//! durably: the Rust counterpart of Pekko's durable-state actors.
//!
//! Send user-behaviour events ([`Command`]s: login, cart use, product view,
//! marketing consent) for a [`UserKey`] (mall id + user id) to a
//! [`UserStateManager`]. It starts one [`UserStateActor`] per user, which
//! restores the user's state from the store, answers each command only after
//! the new state is committed, and passivates after 30 idle minutes; the next
//! command brings it back. Writes are revision-checked, so no update is ever
//! silently overwritten.
//!
//! ```
//! use std::sync::Arc;
//! use actix::Actor;
//! use persist_durable::{Command, Config, SqliteStore, UserCommand, UserKey, UserStateManager};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let dir = tempfile::tempdir()?;
//!     let store = SqliteStore::open(dir.path().join("state.db")).await?;
//!     let manager = UserStateManager::new(Arc::new(store), Config::default()).start();
//!
//!     let key = UserKey::new("mall001", "user001")?;
//!     manager.send(UserCommand::new(key.clone(), Command::UserLogin)).await??;
//!     let state = manager.send(UserCommand::new(key, Command::GetUserState)).await??;
//!     assert!(state.last_login.is_some());
//!     Ok(())
//! }
//! ```
//!
//! ## Layout
//! - [`domain`](crate::UserState): state, commands and the pure transition [`apply`];
//! - actors: [`UserStateActor`], [`UserStateManager`];
//! - store: the [`StateStore`] trait and its backends [`PostgresStore`],
//!   [`SqliteStore`], [`MemoryStore`];
//! - errors: [`InvalidInput`], [`StoreError`], [`CommandError`].
//!
//! ## Features
//! - `sqlite` (default): [`SqliteStore`], with a bundled libsqlite3.
//! - `postgres` (default): [`PostgresStore`], on diesel-async's pure-Rust driver.
//! - `http` (default): [`http::configure`], actix-web routes for the manager.
#![warn(missing_docs)]

mod actors;
mod config;
mod domain;
mod error;
mod feed;
#[cfg(feature = "http")]
pub mod http;
mod store;

pub use actors::{GetManagerStats, ManagerStats, UserCommand, UserStateActor, UserStateManager};
pub use config::Config;
pub use domain::{
    apply, apply_event, Clock, Command, Event, EventId, ManualClock, ProductId, StatePolicy, SystemClock, UserKey,
    UserState, MAX_ID_BYTES,
};
pub use error::{CommandError, IdField, InvalidInput, StoreError};
pub use feed::ChangeFeed;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{
    persistence_id, MemoryStore, Revision, SharedStore, StateChange, StateStore, StoreConfig, StoreStats, StoredState,
    ENTITY_TYPE, JSON_SERIALIZER_ID, STATE_MANIFEST,
};

/// The types most programs need: `use persist_durable::prelude::*;`.
pub mod prelude {
    pub use crate::{Command, CommandError, Config, UserCommand, UserKey, UserState, UserStateActor, UserStateManager};
}
