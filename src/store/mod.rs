//! Durable storage of entity states behind one seam, with a backend per
//! database.
//!
//! Rows follow Pekko's `durable_state` table: one row per entity, keyed by
//! its persistence id (`<entity type>|<entity id>`), with the entity type,
//! a revision that every write must name, and the state as bytes. A write
//! that finds another revision fails with [`StoreError::Conflict`] instead
//! of overwriting.
//!
//! - `capability`: the traits, one per capability ([`StateStore`],
//!   [`Offsets`], [`ChangeLog`], [`Maintenance`]) and [`Store`], all of them;
//! - `ext`: typed access for every store ([`StateStoreExt`], [`MaintenanceExt`]);
//! - `rows`, `payload`: what crosses the seam, and how a state is encoded;
//! - `sql`: the one SQL store, over PostgreSQL or SQLite, with group commit;
//! - `memory`: the in-process store for unit tests of actor logic.
//!
//! The store knows no entity: the typed methods encode and decode through
//! [`DurableEntity`](crate::DurableEntity), so a new entity type needs no
//! store code.

use std::sync::Arc;

mod capability;
mod config;
pub(crate) mod ext;
mod memory;
pub(crate) mod payload;
mod rows;
mod runtime;
mod schema;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;

pub use capability::{
    ChangeLog, ClusterView, JoinedNode, Leases, Maintenance, NodeRow, Offsets, StateStore, Store, Timers,
};
pub use config::StoreConfig;
pub use ext::{ChangeLogExt, MaintenanceExt, StateStoreExt};
pub use memory::MemoryStore;
pub use rows::{
    ChangeRow, FeedBounds, FeedRetention, Fence, RowOutcome, StoreStats, StoredRow, StoredState, StoredTimer,
    TimerChange, TimerFired, WriteRow,
};
#[cfg(feature = "postgres")]
pub use sql::postgres::{PostgresBackend, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sql::sqlite::{SqliteBackend, SqliteStore};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use sql::{SqlBackend, SqlStore};

pub(crate) use rows::{fresh_generation, good_prefix};

/// A shared, type-erased store with every capability, as the managers, the
/// feed and the ingest hold it. Any of the crate's stores coerces to it:
/// `let store: SharedStore = Arc::new(SqliteStore::open(path).await?)`.
pub type SharedStore = Arc<dyn Store>;

/// The start of the position names a Kafka ingest saves (partition offsets,
/// not feed positions): every other name is a feed consumer's.
pub(crate) const KAFKA_POSITIONS: &str = "kafka/";

/// The serializer id of every row this crate writes: the payload is serde JSON.
pub(crate) const JSON_SERIALIZER_ID: i32 = 1;

/// Opens the store at `location`: a `postgres://` or `postgresql://` URL
/// connects to PostgreSQL ([`PostgresStore`]), anything else is a SQLite
/// file path, with or without a `sqlite://` prefix ([`SqliteStore`]); with
/// [`StoreConfig::default`], and pending migrations applied.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let location = std::env::var("DATABASE_URL").unwrap_or(dir.path().join("state.db").display().to_string());
/// let store: persist_durable::SharedStore = persist_durable::open(&location).await?;
/// # Ok(()) }
/// ```
#[cfg(all(feature = "postgres", feature = "sqlite"))]
pub async fn open(location: &str) -> Result<SharedStore, crate::StoreError> {
    open_with(location, StoreConfig::default()).await
}

/// [`open`] with `config`. For SQLite, a `config` with PostgreSQL's default
/// pool size of 8 is given SQLite's 4.
#[cfg(all(feature = "postgres", feature = "sqlite"))]
pub async fn open_with(location: &str, config: StoreConfig) -> Result<SharedStore, crate::StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresStore::connect_with(location, config).await?));
    }
    let path = location.strip_prefix("sqlite://").unwrap_or(location);
    let config = if config.pool_size == StoreConfig::default().pool_size {
        config.with_pool_size(4)
    } else {
        config
    };
    Ok(Arc::new(SqliteStore::open_with(path, config).await?))
}
