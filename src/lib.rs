//! # persist-durable
//!
//! The latest state of every entity of an application (first of all every
//! shop user), kept in an actix actor and persisted durably: the Rust
//! counterpart of Pekko's durable-state actors.
//!
//! Send user-behaviour events ([`Command`]s: login, cart use, product view,
//! marketing consent) for a [`UserKey`] (mall id + user id) through the typed
//! handle [`UserStates`] (or to a [`UserStateManager`]'s `Addr`). One
//! [`UserStateActor`] per user restores the user's state from the store,
//! answers each command only after the new state is committed, and
//! passivates after 30 idle minutes; the next command brings it back. Writes
//! are revision-checked, so no update is ever silently overwritten. Any other
//! entity type gets the same machinery by implementing [`DurableEntity`]
//! (see its
//! counter example, and [`cart`]).
//!
//! ```
//! use std::sync::Arc;
//! use persist_durable::{Command, Config, SqliteStore, UserKey, UserStates};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let dir = tempfile::tempdir()?;
//!     let store = SqliteStore::open(dir.path().join("state.db")).await?;
//!     let users = UserStates::start(Arc::new(store), Config::default());
//!
//!     let key = UserKey::new("mall001", "user001")?;
//!     users.send(key.clone(), Command::UserLogin).await?;
//!     let state = users.send(key, Command::GetUserState).await?;
//!     assert!(state.last_login.is_some());
//!     Ok(())
//! }
//! ```
//!
//! ## Layout
//! - the entity core ([`DurableEntity`], [`EntityKey`], [`EntityEvent`],
//!   [`Revision`]): what an application writes once per entity type;
//! - the user state, the first entity: [`UserState`], [`UserKey`],
//!   [`Command`], [`Event`] and the pure transition [`apply`]; the second,
//!   [`cart`], shows how small another one is;
//! - actors: [`EntityActor`] and [`EntityManager`] ([`UserStateActor`],
//!   [`UserStateManager`] for users), and the typed handle [`Entities`]
//!   ([`UserStates`]);
//! - store: the [`StateStore`] trait and its backends [`PostgresStore`],
//!   [`SqliteStore`], [`MemoryStore`]; the change feed [`EntityFeed`]
//!   ([`ChangeFeed`]);
//! - errors: [`InvalidInput`], [`StoreError`], [`CommandError`].
//!
//! ## Features
//! - `sqlite` (default): [`SqliteStore`], with a bundled libsqlite3.
//! - `postgres` (default): [`PostgresStore`], on diesel-async's pure-Rust driver.
//! - `http` (default): [`http::routes`], actix-web routes for the user states.
//! - `kafka` (off by default): `kafka::KafkaIngest`, exactly-once-in-effect
//!   ingestion from Kafka topics, on rdkafka with its bundled librdkafka.
//!
//! docs.rs documents every feature. A crate depending on this one sees the
//! `kafka` module in its own `cargo doc` once it enables the feature in its
//! dependency, or with `cargo doc --features persist-durable/kafka`.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod actors;
mod clock;
mod cluster;
mod config;
mod domain;
mod entity;
mod error;
mod feed;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod timers;
mod users;

pub use actors::{
    Entities, EntityActor, EntityCommand, EntityManager, Execute, GetManagerStats, ManagerStats, PurgeIdle,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use cluster::{Cluster, ClusterConfig, ClusterError, ClusterStats, NamedLease};
pub use config::Config;
pub use domain::cart;
pub use domain::{apply, apply_event, Command, Event, ProductId, StatePolicy, UserKey, UserState};
pub use entity::{
    decode_json, validate_id, CompositeId, DurableEntity, EntityEvent, EntityKey, EventId, Id, IdField, InvalidInput,
    Never, PersistenceId, Revision, Slice, SourceOffsets, MAX_ID_BYTES, SLICES,
};
pub use error::{Cause, CommandError, CorruptRow, ManagerStopped, StoreError};
pub use feed::{ChangeKind, EntityFeed, SkipRefused, StateChange};
#[cfg(all(feature = "postgres", feature = "sqlite"))]
pub use store::{open, open_with};
pub use store::{
    ChangeLog, ChangeLogExt, ChangeRow, ClusterView, FeedBounds, FeedRetention, Fence, Leases, Maintenance,
    MaintenanceExt, MemoryStore, NodeRow, Offsets, RowOutcome, SharedStore, StateStore, StateStoreExt, Store,
    StoreConfig, StoreStats, StoredRow, StoredState, StoredTimer, TimerChange, TimerFired, Timers, WriteRow,
};
#[cfg(feature = "postgres")]
pub use store::{PostgresBackend, PostgresStore};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use store::{SqlBackend, SqlStore};
#[cfg(feature = "sqlite")]
pub use store::{SqliteBackend, SqliteStore};
pub use timers::{Missed, PendingTimer, Schedule, Timer, TimerConfig, TimerError};
pub use users::{
    ChangeFeed, StoredUserState, UserCommand, UserCommandError, UserStateActor, UserStateChange, UserStateManager,
    UserStates,
};

/// The types most programs need: `use persist_durable::prelude::*;`.
///
/// The store types and their extension traits (typed `load`, `write`,
/// `count`, `purge_idle`, `trim_feed` on any store) are here, so a program
/// needs no second import to open a store and read from it.
pub mod prelude {
    #[cfg(all(feature = "postgres", feature = "sqlite"))]
    pub use crate::open;
    #[cfg(feature = "postgres")]
    pub use crate::PostgresStore;
    #[cfg(feature = "sqlite")]
    pub use crate::SqliteStore;
    pub use crate::{
        ChangeLogExt, Command, CommandError, CompositeId, Config, DurableEntity, Entities, EntityFeed, EntityKey, Id,
        InvalidInput, MaintenanceExt, ManagerStopped, MemoryStore, Revision, SharedStore, StateStoreExt, StoreConfig,
        StoreError, Timer, UserCommand, UserKey, UserState, UserStateActor, UserStateManager, UserStates,
    };
}

/// The README's code blocks, compiled (and run) as doctests by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The `docs/` pages' code blocks, compiled as the README's are.
#[cfg(doctest)]
mod docs_doctests {
    #[doc = include_str!("../docs/lifecycle.md")]
    struct Lifecycle;
    #[doc = include_str!("../docs/http.md")]
    struct Http;
    #[doc = include_str!("../docs/change-feed.md")]
    struct ChangeFeed;
    #[doc = include_str!("../docs/kafka-in.md")]
    struct KafkaIn;
    #[doc = include_str!("../docs/cluster.md")]
    struct Cluster;
    #[doc = include_str!("../docs/timers.md")]
    struct Timers;
}
