//! A panic is contained to its command: the entity's `apply` panicking, its
//! store panicking in a load, or its code panicking outside a transition,
//! fails that command with a typed error, commits nothing of it, and the
//! entity goes on from its stored state; other entities never notice, under
//! the resident limit and across passivation too.

use std::convert::Infallible;
use std::time::Duration;

use crate::common::{Backend, TestDb};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use persist_durable::testkit::{TestEntities, TestStore};
use persist_durable::{
    ChangeLog, ChangeRow, CommandError, Config, DurableEntity, Entities, Id, Maintenance, MemoryStore, Offsets,
    PersistenceId, Revision, SharedStore, StateStore, StateStoreExt, StoreError, StoreStats, StoredRow, WriteRow,
};
use rstest::rstest;
use serde::{Deserialize, Serialize};

const MINUTE: Duration = Duration::from_secs(60);

/// The ready validated key: `FragileId::new("...")`.
type FragileId = Id<Fragile>;

fn id(name: &str) -> FragileId {
    FragileId::new(name).unwrap()
}

/// A counter whose transition panics on `Explode`, and whose command name
/// panics on `Unnameable` (outside the transition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Fragile {
    value: i64,
}

#[derive(Debug, Clone)]
enum FragileCommand {
    Add(i64),
    Explode,
    /// Panics on an odd value only: what it does depends on the state it meets.
    ExplodeIfOdd,
    Unnameable,
    Get,
}

impl DurableEntity for Fragile {
    const ENTITY_TYPE: &'static str = "Fragile";
    const MANIFEST: &'static str = "Fragile/v1";
    type Key = FragileId;
    type Command = FragileCommand;
    type Settings = ();
    type Rejection = Infallible;

    fn apply(&self, command: &FragileCommand, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
        match command {
            FragileCommand::Add(n) => Ok(Some(Fragile { value: self.value + n })),
            FragileCommand::Explode => panic!("the transition exploded"),
            FragileCommand::ExplodeIfOdd if self.value % 2 == 1 => panic!("the transition exploded on an odd value"),
            FragileCommand::ExplodeIfOdd | FragileCommand::Unnameable | FragileCommand::Get => Ok(None),
        }
    }

    fn command_name(command: &FragileCommand) -> &'static str {
        match command {
            FragileCommand::Unnameable => panic!("no name for this command"),
            _ => "fragile",
        }
    }
}

fn is_panicked(answer: &Result<Fragile, CommandError<Fragile>>) -> bool {
    matches!(answer, Err(error @ CommandError::Panicked { message, .. })
        if message.contains("exploded") && !error.is_retryable())
}

#[rstest]
#[actix::test]
async fn a_transition_that_panics_fails_its_command_alone_and_the_entity_goes_on(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let fragiles = Entities::<Fragile>::start(store.clone(), Config::default());
    fragiles.send(id("a"), FragileCommand::Add(1)).await.unwrap();

    let exploded = fragiles.send(id("a"), FragileCommand::Explode).await;

    assert!(is_panicked(&exploded), "{exploded:?}");
    let stored = store.load(&id("a")).await.unwrap().unwrap();
    assert_eq!(
        (stored.revision, stored.state.value),
        (Revision(1), 1),
        "nothing of it committed"
    );
    let after = fragiles.send(id("a"), FragileCommand::Add(2)).await.unwrap();
    assert_eq!(after.value, 3, "the entity goes on from its stored state");
    assert_eq!(fragiles.send(id("b"), FragileCommand::Add(5)).await.unwrap().value, 5);
}

#[rstest]
#[actix::test]
async fn commands_queued_with_one_that_panics_commit_around_it(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let fragiles = Entities::<Fragile>::start(store.clone(), Config::default());

    // Queued together while the new entity restores: one round.
    let (before, exploded, after) = tokio::join!(
        fragiles.send(id("a"), FragileCommand::Add(1)),
        fragiles.send(id("a"), FragileCommand::Explode),
        fragiles.send(id("a"), FragileCommand::Add(10)),
    );

    assert_eq!(before.unwrap().value, 1);
    assert!(is_panicked(&exploded), "{exploded:?}");
    assert_eq!(after.unwrap().value, 11);
    let stored = store.load(&id("a")).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state.value), (Revision(2), 11));
}

#[actix::test]
async fn a_panicked_entity_is_evicted_and_restored_like_any_other() {
    let store: SharedStore = std::sync::Arc::new(MemoryStore::new());
    let config = Config::default().with_arbiters(0).with_max_resident(1);
    let fragiles = Entities::<Fragile>::start(store.clone(), config);
    fragiles.send(id("a"), FragileCommand::Add(1)).await.unwrap();
    assert!(is_panicked(&fragiles.send(id("a"), FragileCommand::Explode).await));

    // Another entity takes the only resident place, then "a" comes back.
    fragiles.send(id("b"), FragileCommand::Add(1)).await.unwrap();
    let again = fragiles.send(id("a"), FragileCommand::Add(1)).await.unwrap();

    assert_eq!(again.value, 2);
    assert!(fragiles.stats().await.unwrap().evictions >= 1);
}

#[actix::test]
async fn a_panicked_entity_passivates_when_idle_and_restores_on_the_next_command() {
    let store = TestStore::memory();
    let fragiles = TestEntities::<Fragile>::start(&store);
    fragiles.send(id("a"), FragileCommand::Add(4)).await.unwrap();
    assert!(is_panicked(&fragiles.send(id("a"), FragileCommand::Explode).await));

    fragiles.advance(35 * MINUTE).await;
    fragiles.until_passivated(&id("a")).await;

    assert_eq!(fragiles.send(id("a"), FragileCommand::Get).await.unwrap().value, 4);
}

/// Before, a panic in `command_name` (outside the transition) stopped the
/// actor and failed every command queued with it as `Panicked`, though none
/// of them had run.
#[actix::test]
async fn a_command_whose_name_panics_fails_alone_and_the_commands_around_it_commit() {
    let store = TestStore::memory();
    let fragiles = TestEntities::<Fragile>::start(&store);

    // Queued together while the new entity restores: one round.
    let (before, unnamed, after) = tokio::join!(
        fragiles.send(id("a"), FragileCommand::Add(3)),
        fragiles.send(id("a"), FragileCommand::Unnameable),
        fragiles.send(id("a"), FragileCommand::Add(1)),
    );

    assert_eq!(before.unwrap().value, 3);
    assert!(
        matches!(&unnamed, Err(error @ CommandError::Panicked { message, .. })
            if message.contains("no name") && !error.is_retryable()),
        "{unnamed:?}"
    );
    assert_eq!(after.unwrap().value, 4);
    assert_eq!(store.row(&id("a")).await.unwrap().unwrap().payload["value"], 4);
    assert!(fragiles.is_resident(&id("a")).await, "the actor goes on");
}

/// A command decided on a state that then did not commit is decided again
/// on the state that did, like a refusal: before, the panic it met on the
/// refused state was its answer.
#[rstest]
#[actix::test]
async fn a_panic_met_on_a_state_that_was_not_committed_is_decided_again(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let holds_one = match backend {
        Backend::Postgres => "convert_from(NEW.state_payload, 'UTF8') LIKE '%\"value\":1%'",
        Backend::Sqlite => "CAST(NEW.state_payload AS TEXT) LIKE '%\"value\":1%'",
    };
    db.execute(&match backend {
        Backend::Postgres => format!(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF {holds_one} THEN RAISE EXCEPTION 'no ones'; \
             END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON durable_state FOR EACH ROW EXECUTE FUNCTION refuse();"
        ),
        Backend::Sqlite => format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON durable_state WHEN {holds_one} \
               BEGIN SELECT RAISE(ABORT, 'no ones'); END;"
        ),
    });
    let fragiles = Entities::<Fragile>::start(store.clone(), Config::default());

    // Queued together while the new entity restores: one round. The state
    // after `Add(1)` is refused; `ExplodeIfOdd` met it, and panicked.
    let (refused, decided_again, after) = tokio::join!(
        fragiles.send(id("a"), FragileCommand::Add(1)),
        fragiles.send(id("a"), FragileCommand::ExplodeIfOdd),
        fragiles.send(id("a"), FragileCommand::Add(2)),
    );

    assert!(matches!(refused, Err(CommandError::Unstorable { .. })), "{refused:?}");
    assert_eq!(
        decided_again.unwrap().value,
        0,
        "decided on the committed state: no panic"
    );
    assert_eq!(after.unwrap().value, 2);
    let stored = store.load(&id("a")).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state.value), (Revision(1), 2));
}

/// An entity whose key's `Display` panics: the machinery shows keys in its
/// log lines, which must never stop an actor, a shard or a manager.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Shy {
    value: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ShyKey(String);

impl std::fmt::Display for ShyKey {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("this key will not be shown")
    }
}

impl persist_durable::EntityKey for ShyKey {
    type Entity = Shy;
    fn entity_id(&self) -> String {
        self.0.clone()
    }
    fn from_entity_id(id: &str) -> Result<Self, persist_durable::InvalidInput> {
        Ok(ShyKey(id.to_owned()))
    }
}

impl DurableEntity for Shy {
    const ENTITY_TYPE: &'static str = "Shy";
    const MANIFEST: &'static str = "Shy/v1";
    type Key = ShyKey;
    type Command = i64;
    type Settings = ();
    type Rejection = Infallible;

    fn apply(&self, n: &i64, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
        Ok(Some(Shy { value: self.value + n }))
    }
}

/// Before, the first log line naming such a key (at debug, "committed")
/// panicked in the actor: the command's answer was lost with it.
#[actix::test]
async fn a_key_whose_display_panics_stops_no_actor_shard_or_manager() {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_test_writer()
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let store: SharedStore = std::sync::Arc::new(MemoryStore::new());
    // One shard, on this thread (where the log subscriber is), one resident entity.
    let shies = Entities::<Shy>::start(store.clone(), Config::default().with_arbiters(0).with_max_resident(1));

    for round in 1..=3 {
        for name in ["a", "b"] {
            let state = shies.send(ShyKey(name.into()), 1).await;
            assert_eq!(state.unwrap().value, round, "{name}");
        }
    }

    let stats = shies.stats().await.expect("the shard answers");
    assert!(stats.evictions >= 4, "evicted and restored each time: {stats:?}");
}
/// A store that panics whenever it loads the entity `bad`.
#[derive(Debug, Default)]
struct PanickingStore {
    inner: MemoryStore,
}

impl PanickingStore {
    fn check(key: &PersistenceId) {
        if key.entity_id() == "bad" {
            panic!("the store's driver panicked");
        }
    }
}

#[async_trait]
impl StateStore for PanickingStore {
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        Self::check(key);
        self.inner.load_row(key).await
    }

    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        self.inner.write_row(write).await
    }

    fn keeps_change_feed(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

#[async_trait]
impl Offsets for PanickingStore {
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        self.inner.load_offset(consumer).await
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        self.inner.save_offset(consumer, position).await
    }

    async fn offsets_under(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.offsets_under(prefix).await
    }

    async fn remove_offsets_below(&self, prefix: &str, below: u64) -> Result<u64, StoreError> {
        self.inner.remove_offsets_below(prefix, below).await
    }
}

#[async_trait]
impl ChangeLog for PanickingStore {
    async fn read_change_rows(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        self.inner.read_change_rows(entity_type, after, limit).await
    }

    async fn feed_bounds(&self) -> Result<persist_durable::FeedBounds, StoreError> {
        self.inner.feed_bounds().await
    }

    async fn trim_changes(
        &self,
        through: u64,
        committed_before: Option<chrono::DateTime<chrono::Utc>>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.inner.trim_changes(through, committed_before, limit).await
    }
}

#[async_trait]
impl Maintenance for PanickingStore {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        self.inner
            .purge_candidates(entity_type, written_before, after, limit)
            .await
    }

    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        self.inner.purge_rows(rows, written_before).await
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        self.inner.count_entities(entity_type).await
    }

    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        self.inner.entity_ids(entity_type, after, limit).await
    }
}

#[async_trait::async_trait]
impl persist_durable::Timers for PanickingStore {
    async fn due_timers(
        &self,
        entity_type: &str,
        before: chrono::DateTime<chrono::Utc>,
        slices: Option<&[persist_durable::Slice]>,
        limit: usize,
    ) -> Result<Vec<persist_durable::StoredTimer>, StoreError> {
        self.inner.due_timers(entity_type, before, slices, limit).await
    }

    async fn timers_of(&self, key: &PersistenceId) -> Result<Vec<persist_durable::StoredTimer>, StoreError> {
        self.inner.timers_of(key).await
    }

    async fn cancel_timer(&self, key: &PersistenceId, name: &str) -> Result<bool, StoreError> {
        self.inner.cancel_timer(key, name).await
    }
}

/// Before it was contained, this panic unwound through the actor, whose
/// context actix then polled once more while it was dropped: a second panic
/// there aborted the whole test process.
#[actix::test]
async fn a_store_that_panics_in_a_load_fails_that_entitys_command_and_aborts_nothing() {
    let store: SharedStore = std::sync::Arc::new(PanickingStore::default());
    let fragiles = Entities::<Fragile>::start(store, Config::default().with_arbiters(0));

    let first = fragiles.send(id("bad"), FragileCommand::Add(1)).await;
    let second = fragiles.send(id("bad"), FragileCommand::Add(1)).await;

    for answer in [&first, &second] {
        assert!(
            matches!(answer, Err(CommandError::Panicked { message, .. }) if message.contains("driver panicked")),
            "{answer:?}"
        );
    }
    assert_eq!(
        fragiles.send(id("good"), FragileCommand::Add(2)).await.unwrap().value,
        2
    );
}
