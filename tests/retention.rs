//! Retention and admin reads: rows not written for a configured period are
//! purged in chunks (never a resident entity, never a row written after the
//! purge looked at it), purged entities appear in the change feed as
//! deleted, and an operator can count and page through a type's entities
//! without starting an actor.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::Actor;
use common::{age, key, test_store_config, view, Backend, TestDb};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use persist_durable::cart::{Cart, CartCommand, CartId};
use persist_durable::{
    ChangeKind, ChangeLog, ChangeRow, Config, DurableEntity, EntityFeed, EntityKey, GetManagerStats, Maintenance,
    MaintenanceExt, MemoryStore, Offsets, PersistenceId, PurgeIdle, Revision, SharedStore, StateChange, StateStore,
    StateStoreExt, StoreError, StoreStats, StoredRow, UserCommand, UserKey, UserState, UserStateManager, WriteRow,
};
use rstest::rstest;

/// The retention period of these tests: the example.
const RETENTION: Duration = Duration::from_secs(400 * 24 * 60 * 60);

fn users(prefix: &str, n: usize) -> Vec<UserKey> {
    (0..n).map(|i| key("mall001", &format!("{prefix}{i:02}"))).collect()
}

fn carts(prefix: &str, n: usize) -> Vec<CartId> {
    (0..n)
        .map(|i| CartId::new(format!("{prefix}{i:02}")).unwrap())
        .collect()
}

async fn write_users(store: &SharedStore, keys: &[UserKey]) {
    for user in keys {
        store
            .write(user, Revision::NONE, Revision(1), &UserState::default())
            .await
            .unwrap();
    }
}

async fn write_carts(store: &SharedStore, keys: &[CartId]) {
    for cart in keys {
        store
            .write(cart, Revision::NONE, Revision(1), &Cart::default())
            .await
            .unwrap();
    }
}

async fn exists<K: EntityKey>(store: &SharedStore, key: &K) -> bool {
    store.load(key).await.unwrap().is_some()
}

/// Every change of `E` in the feed, from the beginning.
async fn read_feed<E: DurableEntity>(store: &SharedStore) -> Vec<StateChange<E>> {
    let mut feed = EntityFeed::<E>::from_position(store.clone(), 0).with_batch_size(7);
    let mut all = Vec::new();
    loop {
        let batch = feed.next_batch().await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// A manager configuration whose own purges run only when asked (`PurgeIdle`).
fn purge_on_demand() -> Config {
    Config::default()
        .with_arbiters(0)
        .with_retention(Some(RETENTION))
        .with_retention_check_interval(Duration::from_secs(24 * 60 * 60))
}

#[rstest]
#[actix::test]
async fn idle_rows_are_purged_in_chunks_and_fresh_rows_and_other_types_are_kept(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let (idle, fresh) = (users("idle", 25), users("fresh", 5));
    let idle_carts = carts("idle", 4);
    write_users(&store, &idle).await;
    write_users(&store, &fresh).await;
    write_carts(&store, &idle_carts).await;
    age(&db, &idle);
    age(&db, &idle_carts);

    let purged = store.purge_idle::<UserState>(RETENTION, 10).await.unwrap();

    assert_eq!(purged, 25, "three chunks of at most 10 remove all 25 idle users");
    for user in &idle {
        assert!(!exists(&store, user).await, "{user} was purged");
    }
    for user in &fresh {
        assert!(exists(&store, user).await, "{user} was written recently and is kept");
    }
    for cart in &idle_carts {
        assert!(exists(&store, cart).await, "{cart} is another type and is kept");
    }
    assert_eq!(store.count::<UserState>().await.unwrap(), 5);
    assert_eq!(store.count::<Cart>().await.unwrap(), 4);
    assert_eq!(
        store.purge_idle::<UserState>(RETENTION, 10).await.unwrap(),
        0,
        "nothing is left to purge"
    );
}

#[rstest]
#[actix::test]
async fn the_manager_purges_idle_rows_periodically_in_chunks(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let (idle, fresh) = (users("idle", 25), users("fresh", 5));
    let idle_carts = carts("idle", 3);
    write_users(&store, &idle).await;
    write_users(&store, &fresh).await;
    write_carts(&store, &idle_carts).await;
    age(&db, &idle);
    age(&db, &idle_carts);

    let config = Config::default()
        .with_arbiters(0)
        .with_retention(Some(RETENTION))
        .with_retention_check_interval(Duration::from_millis(50))
        .with_retention_chunk_size(10);
    let manager = UserStateManager::new(store.clone(), config).start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let stats = manager.send(GetManagerStats).await.unwrap();
        if stats.purged >= 25 || tokio::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Later runs find nothing more.
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(stats.purged, 25, "{stats:?}");
    assert_eq!(manager.send(GetManagerStats).await.unwrap().purged, 25);
    assert_eq!(store.count::<UserState>().await.unwrap(), 5, "the fresh users are kept");
    assert_eq!(
        store.count::<Cart>().await.unwrap(),
        3,
        "carts are not the users' manager's to purge"
    );
}

#[rstest]
#[actix::test]
async fn a_row_written_after_the_purge_looked_at_it_is_kept(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let (written_meanwhile, still_idle) = (key("mall001", "busy"), key("mall001", "idle"));
    write_users(&store, &[written_meanwhile.clone(), still_idle.clone()]).await;
    age(&db, &[written_meanwhile.clone(), still_idle.clone()]);
    let written_before = chrono::Utc::now() - chrono::Duration::days(400);

    let candidates = store
        .purge_candidates(UserState::ENTITY_TYPE, written_before, None, 10)
        .await
        .unwrap();
    assert_eq!(
        candidates
            .iter()
            .map(|(id, revision)| (id.as_str(), *revision))
            .collect::<Vec<_>>(),
        [
            (written_meanwhile.persistence_id().as_str(), Revision(1)),
            (still_idle.persistence_id().as_str(), Revision(1))
        ],
        "both idle rows, in persistence id order"
    );
    // Another node writes one of them after the purge looked; so that only
    // the revision check can keep it, the row is made to look old again.
    store
        .write(&written_meanwhile, Revision(1), Revision(2), &UserState::default())
        .await
        .unwrap();
    age(&db, std::slice::from_ref(&written_meanwhile));
    let purged = store.purge_rows(candidates, written_before).await.unwrap();

    assert_eq!(purged, [still_idle.persistence_id()]);
    assert_eq!(
        store.load(&written_meanwhile).await.unwrap().unwrap().revision,
        Revision(2)
    );
    assert!(!exists(&store, &still_idle).await);
}

#[rstest]
#[actix::test]
async fn a_row_written_since_the_cutoff_is_kept_even_at_the_revision_given(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let user = key("mall001", "fresh");
    write_users(&store, std::slice::from_ref(&user)).await;
    let written_before = chrono::Utc::now() - chrono::Duration::days(400);

    let purged = store
        .purge_rows(vec![(user.persistence_id(), Revision(1))], written_before)
        .await
        .unwrap();

    assert!(purged.is_empty(), "the statement checks the row's age itself");
    assert!(exists(&store, &user).await);
}

#[rstest]
#[actix::test]
async fn a_resident_entity_survives_the_managers_purge(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let (resident, idle) = (key("mall001", "resident"), key("mall001", "idle"));
    let manager = UserStateManager::new(store.clone(), purge_on_demand()).start();
    manager
        .send(UserCommand::new(resident.clone(), view("p1")))
        .await
        .unwrap()
        .unwrap();
    write_users(&store, std::slice::from_ref(&idle)).await;
    age(&db, &[resident.clone(), idle.clone()]);

    let purged = manager.send(PurgeIdle).await.unwrap().unwrap();

    assert_eq!(purged, 1, "only the entity without an actor");
    assert!(exists(&store, &resident).await, "the resident entity's row is kept");
    assert!(!exists(&store, &idle).await);
    let stats = manager.send(GetManagerStats).await.unwrap();
    assert_eq!((stats.purged, stats.resident_entities), (1, 1));
    // The resident actor goes on from its revision; the purged entity starts over.
    let state = manager
        .send(UserCommand::new(resident.clone(), view("p2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.recent_products.len(), 2);
    assert_eq!(store.load(&resident).await.unwrap().unwrap().revision, Revision(2));
    let state = manager
        .send(UserCommand::new(idle.clone(), view("p3")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        state.recent_products.len(),
        1,
        "the purged entity starts from the default state"
    );
    assert_eq!(store.load(&idle).await.unwrap().unwrap().revision, Revision(1));
}

#[rstest]
#[actix::test]
async fn purged_entities_appear_in_the_feed_as_deleted_and_start_over_at_revision_1(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(true)).await;
    let (twice, once) = (key("mall001", "twice"), key("mall001", "once"));
    let opted_in = UserState {
        marketing_opt_in: true,
        ..UserState::default()
    };
    store
        .write_changes(&twice, Revision::NONE, &[UserState::default(), opted_in.clone()])
        .await
        .unwrap();
    store
        .write(&once, Revision::NONE, Revision(1), &opted_in)
        .await
        .unwrap();
    let cart = CartId::new("mall001-twice").unwrap();
    write_carts(&store, std::slice::from_ref(&cart)).await;
    age(&db, &[twice.clone(), once.clone()]);
    age(&db, std::slice::from_ref(&cart));

    assert_eq!(store.purge_idle::<UserState>(RETENTION, 1).await.unwrap(), 2);

    let changes = read_feed::<UserState>(&store).await;
    let deletions: Vec<(&UserKey, Revision, u64)> = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Deleted)
        .map(|c| (&c.key, c.revision, c.position))
        .collect();
    assert_eq!(
        deletions,
        [(&once, Revision(2), 5), (&twice, Revision(3), 6)],
        "each purged entity's next revision is its deletion, at the next positions"
    );
    for deletion in changes.iter().filter(|c| c.kind == ChangeKind::Deleted) {
        assert_eq!(deletion.state, UserState::default(), "a deletion carries no data");
    }
    let before: Vec<ChangeKind> = changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Deleted)
        .map(|c| c.kind)
        .collect();
    assert_eq!(
        before,
        [ChangeKind::Redacted; 3],
        "the purge erased the purged entities' earlier changes in its statement"
    );
    assert!(
        read_feed::<Cart>(&store)
            .await
            .iter()
            .all(|c| c.kind == ChangeKind::Updated),
        "the cart was not purged"
    );

    // Nothing of the purged entity is left: its next write starts over at revision 1.
    store
        .write(&twice, Revision::NONE, Revision(1), &UserState::default())
        .await
        .unwrap();
    let last = read_feed::<UserState>(&store).await.pop().unwrap();
    assert_eq!(
        (&last.key, last.revision, last.position, last.kind),
        (&twice, Revision(1), 7, ChangeKind::Updated)
    );
}

#[actix::test]
async fn a_concrete_store_counts_entities_as_a_shared_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = persist_durable::SqliteStore::open(dir.path().join("count.db"))
        .await
        .unwrap();
    let memory = MemoryStore::new();
    let user = key("mall001", "counted");

    sqlite
        .write(&user, Revision(0), Revision(1), &UserState::default())
        .await
        .unwrap();
    memory
        .write(&user, Revision(0), Revision(1), &UserState::default())
        .await
        .unwrap();

    assert_eq!(sqlite.count::<UserState>().await.unwrap(), 1);
    assert_eq!(memory.count::<UserState>().await.unwrap(), 1);
}

#[rstest]
#[actix::test]
async fn entities_are_counted_and_paged_per_type_without_actors(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let all_users = users("user", 23);
    // Carts whose entity ids are the users' own: only the type tells them apart.
    let all_carts: Vec<CartId> = all_users
        .iter()
        .take(7)
        .map(|user| CartId::new(user.entity_id()).unwrap())
        .collect();
    write_users(&store, &all_users).await;
    write_carts(&store, &all_carts).await;

    assert_eq!(store.count::<UserState>().await.unwrap(), 23);
    assert_eq!(store.count::<Cart>().await.unwrap(), 7);
    assert_eq!(store.count_entities("NoSuchType").await.unwrap(), 0);

    let mut listed = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = store.entity_keys::<UserKey>(listed.last(), 5).await.unwrap();
        pages.push(page.len());
        let done = page.len() < 5;
        listed.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(listed, all_users, "every user once, in order");
    assert_eq!(pages, [5, 5, 5, 5, 3]);
    assert_eq!(store.entity_keys::<CartId>(None, 100).await.unwrap(), all_carts);

    // The untyped form pages the same way, with the persistence id as the cursor.
    let mut ids = Vec::new();
    loop {
        let after = ids
            .last()
            .map(|id: &persist_durable::PersistenceId| id.as_str().to_owned());
        let page = store.entity_ids("Cart", after.as_deref(), 3).await.unwrap();
        let done = page.len() < 3;
        ids.extend(page);
        if done {
            break;
        }
    }
    let expected: Vec<_> = all_carts.iter().map(EntityKey::persistence_id).collect();
    assert_eq!(ids, expected);
}

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder of this test binary");
        snapshotter
    })
}

/// `persist_durable_purged_total` for `entity` since the last snapshot
/// (taking one drains the counters). Only this test purges carts.
fn purged_metric(entity: &str) -> u64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == "persist_durable_purged_total"
                && key.key().labels().any(|l| l.key() == "entity" && l.value() == entity)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

#[actix::test]
async fn purges_are_counted_in_the_metric_and_the_managers_stats() {
    purged_metric(Cart::ENTITY_TYPE);
    let store: SharedStore = Arc::new(MemoryStore::new());
    // The memory store cannot be aged: a zero retention makes every row old.
    let config = Config::default()
        .with_arbiters(0)
        .with_retention(Some(Duration::ZERO))
        .with_retention_check_interval(Duration::from_secs(24 * 60 * 60))
        .with_retention_chunk_size(2);
    let carts_manager = persist_durable::EntityManager::<Cart>::new(store.clone(), config).start();
    let resident = CartId::new("resident").unwrap();
    carts_manager
        .send(persist_durable::EntityCommand::new(
            resident.clone(),
            CartCommand::AddItem {
                sku: "p1".into(),
                quantity: 1,
            },
        ))
        .await
        .unwrap()
        .unwrap();
    write_carts(&store, &carts("idle", 5)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let purged = carts_manager.send(PurgeIdle).await.unwrap().unwrap();

    assert_eq!(purged, 5);
    assert_eq!(carts_manager.send(GetManagerStats).await.unwrap().purged, 5);
    assert_eq!(purged_metric(Cart::ENTITY_TYPE), 5);
    assert_eq!(store.count::<Cart>().await.unwrap(), 1, "the resident cart is kept");
    write_carts(&store, &carts("later", 3)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.purge_idle::<Cart>(Duration::ZERO, 2).await.unwrap(), 4);
    assert_eq!(purged_metric(Cart::ENTITY_TYPE), 4, "the store's purge counts too");
}

#[actix::test]
async fn a_manager_without_retention_refuses_to_purge() {
    let manager = UserStateManager::new(Arc::new(MemoryStore::new()), Config::default().with_arbiters(0)).start();
    let refused = manager.send(PurgeIdle).await.unwrap();
    assert!(
        matches!(refused, Err(persist_durable::StoreError::InvalidConfig(_))),
        "{refused:?}"
    );
}

/// A memory store whose deletes wait until the test lets them through.
#[derive(Debug)]
struct GatedStore {
    inner: MemoryStore,
    /// Signalled when a delete starts.
    entered: tokio::sync::Notify,
    /// A permit lets one delete through.
    gate: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl StateStore for GatedStore {
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        self.inner.load_row(key).await
    }

    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        self.inner.write_row(write).await
    }

    fn keeps_change_feed(&self) -> bool {
        self.inner.keeps_change_feed()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

#[async_trait::async_trait]
impl Offsets for GatedStore {
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

#[async_trait::async_trait]
impl ChangeLog for GatedStore {
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

#[async_trait::async_trait]
impl Maintenance for GatedStore {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: chrono::DateTime<chrono::Utc>,
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
        written_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        self.entered.notify_one();
        self.gate.acquire().await.unwrap().forget();
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
impl persist_durable::Timers for GatedStore {
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

#[actix::test]
async fn a_command_for_an_entity_whose_row_is_being_purged_waits_for_the_delete() {
    let gated = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let store: SharedStore = gated.clone();
    let user = key("mall001", "idle");
    store
        .write(
            &user,
            Revision::NONE,
            Revision(1),
            &UserState {
                marketing_opt_in: true,
                ..UserState::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let config = Config::default()
        .with_arbiters(0)
        .with_retention(Some(Duration::ZERO))
        .with_retention_check_interval(Duration::from_secs(24 * 60 * 60));
    let manager = UserStateManager::new(store.clone(), config).start();

    let purge = manager.send(PurgeIdle);
    let purge = actix::spawn(purge);
    gated.entered.notified().await;
    let command = actix::spawn(manager.send(UserCommand::new(user.clone(), view("p1"))));
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert!(
        !command.is_finished(),
        "the command waits while the entity's row may be deleted"
    );
    let stats = manager.send(GetManagerStats).await.unwrap();
    assert_eq!(
        stats.resident_entities, 0,
        "no actor restored the row about to disappear"
    );
    gated.gate.add_permits(1);
    assert_eq!(purge.await.unwrap().unwrap().unwrap(), 1);
    let state = command.await.unwrap().unwrap().unwrap();
    assert!(
        !state.marketing_opt_in,
        "the command met the entity as purged: the default state"
    );
    assert_eq!(state.recent_products.len(), 1);
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(1));
}
