//! The entity core: what an application writes once per entity type, and the
//! machinery's own part of every event (ids for redelivery, times).
//!
//! An entity is its state: a serde struct with a `Default`, a command type
//! and a pure transition. Everything else (actors, passivation, the store,
//! group commit, the change feed) is generic over [`DurableEntity`] and is
//! written once.

mod event;
mod id;
mod invalid_input;
mod key;
mod revision;
mod slice;
mod source;
mod transition;

use std::fmt::{Debug, Display};
use std::hash::Hash;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use event::{decode_json, EntityEvent, EventId};
pub use id::{CompositeId, Id};
pub use invalid_input::{IdField, InvalidInput};
pub(crate) use key::{checked_persistence_id, join_parts, split_parts, validate};
pub use key::{validate_id, PersistenceId, MAX_ID_BYTES};
pub use revision::Revision;
pub use slice::{Slice, SLICES};
pub use source::SourceOffsets;
pub(crate) use source::{AppliedOffsets, RecordOrigin, Seen, StoredOffsets};
pub(crate) use transition::{Durable, Step};

/// One type of durable entity: its state (this type), its key, its commands
/// and the pure transition between states.
///
/// Implemented once per entity type, with no actix and no diesel: the
/// machinery adds restore, commit-before-answer, redelivery protection by
/// event id, passivation and revision-checked writes.
///
/// The state is stored as a JSON object (so it must serialize as a struct or
/// a map), under [`MANIFEST`](Self::MANIFEST). Give every field a serde
/// default and rows written by an older version keep loading. The field name
/// `recent_event_ids`, `source_offsets`, `refused_records`, `deleted` and `erased_at` are the
/// machinery's: it stores the entity's remembered event ids and ingest
/// positions beside the state.
///
/// A whole entity, a counter, run on the embedded SQLite store:
///
/// ```
/// use std::convert::Infallible;
/// use chrono::{DateTime, Utc};
/// use persist_durable::{Config, DurableEntity, Entities, Id, SharedStore, SqliteStore};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
/// struct Counter { value: i64 }
///
/// #[derive(Debug, Clone)]
/// enum CounterCommand { Add(i64), Get }
///
/// impl DurableEntity for Counter {
///     const ENTITY_TYPE: &'static str = "Counter";
///     const MANIFEST: &'static str = "Counter/v1";
///     type Key = Id<Counter>;                // a validated string; CompositeId<Counter, 2> for two
///     type Command = CounterCommand;
///     type Settings = ();
///     type Rejection = Infallible;
///
///     fn apply(&self, command: &CounterCommand, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
///         Ok(match command {
///             CounterCommand::Add(n) => Some(Counter { value: self.value + n }),
///             CounterCommand::Get => None,
///         })
///     }
/// }
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let dir = tempfile::tempdir()?;
///     let store: SharedStore = std::sync::Arc::new(SqliteStore::open(dir.path().join("counters.db")).await?);
///     let counters = Entities::<Counter>::start(store, Config::default());
///     let id = Id::new("visits")?;
///     counters.send(id.clone(), CounterCommand::Add(2)).await?;
///     assert_eq!(counters.send(id, CounterCommand::Add(3)).await?.value, 5);
///     Ok(())
/// }
/// ```
pub trait DurableEntity:
    Clone + Default + Debug + Serialize + DeserializeOwned + Send + Sync + Unpin + 'static
{
    /// The name of the entity type: the `entity_type` column and the prefix
    /// of every persistence id (`Counter|visits`). Never change it once rows exist.
    const ENTITY_TYPE: &'static str;
    /// What the stored payload is (`state_ser_manifest`), so that a later
    /// format can be told apart from this one.
    const MANIFEST: &'static str;

    /// Identifies one entity of this type.
    type Key: EntityKey<Entity = Self>;
    /// What can be asked of an entity.
    type Command: Clone + Debug + Send + Sync + Unpin + 'static;
    /// The knobs of the transition (limits, policies); `()` when there are none.
    type Settings: Clone + Debug + Default + Send + Sync + 'static;
    /// A command the domain refuses (an empty cart's checkout):
    /// [`CommandError::Rejected`](crate::CommandError::Rejected), nothing
    /// written. [`Infallible`](std::convert::Infallible) when every command applies.
    type Rejection: std::error::Error + Clone + Send + Sync + 'static;

    /// The state after `command`, `Ok(None)` when it changes nothing (a read),
    /// or the domain's refusal. `at` is when the event happened: its
    /// `event_time`, or the clock's now without one; the entity decides what
    /// a late event may still change.
    ///
    /// Pure: the machinery applies a command again after a revision conflict.
    fn apply(
        &self,
        command: &Self::Command,
        at: DateTime<Utc>,
        settings: &Self::Settings,
    ) -> Result<Option<Self>, Self::Rejection>;

    /// The version of the state's stored shape. Raise it when a change needs
    /// more than serde defaults (a renamed or restructured field), and teach
    /// [`upgrade`](Self::upgrade) the step from the previous version. Rows
    /// are stored with the version they were written at.
    const SCHEMA_VERSION: u32 = 1;

    /// Upgrades a stored state from `version` to `version + 1`, JSON to JSON
    /// (the state's own fields only; the machinery's are kept apart). Called
    /// once per step, oldest first, when a row older than
    /// [`SCHEMA_VERSION`](Self::SCHEMA_VERSION) is loaded; the state is written
    /// back at the current version by its next write. An `Err` marks the row
    /// corrupt for this entity alone.
    fn upgrade(version: u32, state: serde_json::Value) -> Result<serde_json::Value, String> {
        let _ = state;
        Err(format!("no upgrade from schema version {version} is defined"))
    }

    /// Whether `command` erases the entity: it is then committed as a
    /// tombstone (the state back to its default, the revision still counting
    /// up) instead of through [`apply`](Self::apply). See the crate's README,
    /// "Delete, retention and schema upgrades".
    fn is_delete(command: &Self::Command) -> bool {
        let _ = command;
        false
    }

    /// The command's name for metrics and spans: keep the set small and fixed.
    fn command_name(command: &Self::Command) -> &'static str {
        let _ = command;
        "command"
    }

    /// The durable timers this state wants, each delivering a command to
    /// the entity when due (see [`timers`](crate::timers)); none by default.
    ///
    /// Pure, as [`apply`](Self::apply) is. Only changes count: after each
    /// write the timers the new state wants are compared with the old
    /// state's, in the statement that commits it. A timer wanted alike is
    /// left as it is (a recurring timer keeps its next occurrence, a fired
    /// one-shot timer is not set again); one wanted differently is set anew;
    /// one no longer wanted is cancelled. A fire is delivered only while the
    /// state still wants its timer.
    fn timers(&self, settings: &Self::Settings) -> Vec<crate::timers::Timer<Self::Command>> {
        let _ = settings;
        Vec::new()
    }
}

/// The [`Rejection`](DurableEntity::Rejection) of an entity whose commands
/// are never refused: uninhabited, as [`Infallible`](std::convert::Infallible)
/// is, and serializable, which cluster mode needs to forward an entity's
/// answers between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub enum Never {}

impl std::fmt::Display for Never {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for Never {}

/// The key of one entity, and its injective encoding into the entity part of
/// a persistence id: two different keys must never encode to the same id.
pub trait EntityKey: Clone + Eq + Hash + Ord + Debug + Display + Send + Sync + Unpin + 'static {
    /// The entity type this key identifies.
    type Entity: DurableEntity<Key = Self>;

    /// The key encoded for the persistence id (`<entity type>|<entity id>`).
    fn entity_id(&self) -> String;

    /// Decodes [`entity_id`](Self::entity_id)'s output, validating it.
    fn from_entity_id(id: &str) -> Result<Self, InvalidInput>;

    /// The row key of this entity: `<entity type>|<entity id>`.
    fn persistence_id(&self) -> PersistenceId {
        PersistenceId::new(Self::Entity::ENTITY_TYPE, &self.entity_id())
    }
}
