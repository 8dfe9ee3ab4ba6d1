//! Testing an application's own entities: the Rust counterpart of Pekko's
//! `ManualTime` with a persistence testkit (feature `testkit`, on by default).
//!
//! - [`TestStore`]: a throwaway database (a SQLite file, the memory store,
//!   or a fresh PostgreSQL database), and its rows read back without SQL;
//! - [`TestEntities`]: a manager of one entity type on it, in paused tokio
//!   time, its shard on the test's own thread, and its clock anchored at
//!   [`t0`], so time moves only when the test says, with [`advance`]
//!   moving tokio's time and the recorded clock together;
//! - waits for what the library does ([`until_passivated`],
//!   [`until_resident`], [`TestStore::until_feed_reaches`],
//!   [`TestStore::until_consumer_reaches`]) by yielding to it, never by
//!   sleeping.
//!
//! Paused time moves only through [`advance`]. Left to itself, tokio moves
//! a paused clock on to the next timer whenever its runtime has nothing to
//! do, and a test waiting for the store (whose queries run on threads of
//! their own) is exactly that: every database round trip would jump the
//! clock to the next idle check, and entities would passivate on their
//! own. So while a [`TestEntities`] lives, its runtime is never left with
//! nothing to do. A test that sleeps in paused time (`tokio::time::sleep`)
//! waits until it advances the clock past the sleep; a change feed follower
//! of the test's own is woken by each commit through the store
//! ([`ChangeLog::feed_signal`](crate::ChangeLog::feed_signal)), not by its
//! poll.
//!
//! A passivate-and-restore test of a counter, the body of an
//! `#[actix::test] async fn`:
//!
//! ```
//! # use persist_durable::{DurableEntity, Id};
//! # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
//! # struct Counter { value: i64 }
//! # impl DurableEntity for Counter {
//! #     const ENTITY_TYPE: &'static str = "Counter";
//! #     const MANIFEST: &'static str = "Counter/v1";
//! #     type Key = Id<Counter>;
//! #     type Command = i64;
//! #     type Settings = ();
//! #     type Rejection = std::convert::Infallible;
//! #     fn apply(&self, n: &i64, _: chrono::DateTime<chrono::Utc>, _: &()) -> Result<Option<Self>, Self::Rejection> {
//! #         Ok(Some(Counter { value: self.value + n }))
//! #     }
//! # }
//! use std::time::Duration;
//! use persist_durable::testkit::{TestEntities, TestStore};
//!
//! # #[actix::main]
//! # async fn main() {
//! let store = TestStore::sqlite().await.unwrap();
//! let counters = TestEntities::<Counter>::start(&store);
//! let visits = Id::new("visits").unwrap();
//! counters.send(visits.clone(), 2).await.unwrap();
//!
//! counters.advance(Duration::from_secs(35 * 60)).await;
//! counters.until_passivated(&visits).await;
//!
//! assert_eq!(counters.send(visits.clone(), 3).await.unwrap().value, 5);
//! assert_eq!(store.row(&visits).await.unwrap().unwrap().revision.0, 2);
//! # }
//! ```
//!
//! [`advance`]: TestEntities::advance
//! [`until_passivated`]: TestEntities::until_passivated
//! [`until_resident`]: TestEntities::until_resident

use std::future::Future;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::clock::ManualClock;
use crate::config::Config;
use crate::entity::{DurableEntity, EntityKey, Revision};
use crate::error::StoreError;
use crate::store::{MemoryStore, SharedStore, StoreConfig};
use crate::Entities;

/// Where a [`TestEntities`]' clock starts: 2026-01-01 00:00:00 UTC.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default()
}

/// How long a wait goes on, in real time, before it fails the test.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A throwaway database for one test, gone when the value is dropped (a
/// PostgreSQL database is kept if the test failed, for inspection).
pub struct TestStore {
    store: SharedStore,
    place: Place,
}

enum Place {
    Memory,
    Directory(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres {
        admin_url: String,
        database: String,
    },
}

impl TestStore {
    /// A fresh SQLite file in a directory of its own.
    #[cfg(feature = "sqlite")]
    pub async fn sqlite() -> Result<Self, StoreError> {
        Self::sqlite_with(StoreConfig::default().with_pool_size(4)).await
    }

    /// A fresh SQLite file, opened with `config`.
    #[cfg(feature = "sqlite")]
    pub async fn sqlite_with(config: StoreConfig) -> Result<Self, StoreError> {
        let directory = fresh_directory().map_err(StoreError::unavailable)?;
        let store = crate::SqliteStore::open_with(directory.join("state.db"), config).await?;
        Ok(Self {
            store: Arc::new(store),
            place: Place::Directory(directory),
        })
    }

    /// The in-process store, without a change feed.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(MemoryStore::new()),
            place: Place::Memory,
        }
    }

    /// The in-process store, with a change feed.
    pub fn memory_with_feed() -> Self {
        Self {
            store: Arc::new(MemoryStore::with_change_feed()),
            place: Place::Memory,
        }
    }

    /// A fresh database on the PostgreSQL server of `url` (any database on
    /// it; the role must be allowed to create databases), migrated, and
    /// dropped when this is dropped unless the test is failing.
    #[cfg(feature = "postgres")]
    pub async fn postgres(url: &str) -> Result<Self, StoreError> {
        Self::postgres_with(url, StoreConfig::default()).await
    }

    /// [`postgres`](Self::postgres), the store opened with `config`.
    #[cfg(feature = "postgres")]
    pub async fn postgres_with(url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        let database = format!("persist_durable_test_{}", unique_suffix());
        admin(url, &format!("CREATE DATABASE {database}")).await?;
        let store = crate::PostgresStore::connect_with(&with_database(url, &database), config).await?;
        Ok(Self {
            store: Arc::new(store),
            place: Place::Postgres {
                admin_url: url.to_owned(),
                database,
            },
        })
    }

    /// The store, to start managers, feeds and ingests on.
    pub fn shared(&self) -> SharedStore {
        self.store.clone()
    }

    /// `key`'s stored row, read back without SQL: its revision, the schema
    /// version it was written at, and its payload as JSON.
    pub async fn row<K: EntityKey>(&self, key: &K) -> Result<Option<StoredEntity>, StoreError> {
        let Some(row) = self.store.load_row(&key.persistence_id()).await? else {
            return Ok(None);
        };
        let payload = serde_json::from_slice(&row.payload).unwrap_or(serde_json::Value::Null);
        Ok(Some(StoredEntity {
            revision: row.revision,
            schema_version: row.schema_version,
            payload,
        }))
    }

    /// Waits until `consumer` (a change feed follower's name, as given to
    /// [`EntityFeed::resume`](crate::EntityFeed::resume)) has saved a
    /// position of at least `position`: the application's own consumer has
    /// processed and committed that far. Fails the test if it does not
    /// within 10 s of real time.
    pub async fn until_consumer_reaches(&self, consumer: &str, position: u64) {
        let store = self.store.clone();
        wait("the feed consumer to reach its position", || {
            let store = store.clone();
            async move {
                store
                    .load_offset(consumer)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|saved| saved >= position)
            }
        })
        .await;
    }

    /// Waits until the change feed reaches `position` (a change committed
    /// there); fails the test if it does not within 10 s of real time.
    pub async fn until_feed_reaches(&self, position: u64) {
        let store = self.store.clone();
        wait("the change feed to reach its position", || {
            let store = store.clone();
            async move { store.feed_bounds().await.is_ok_and(|bounds| bounds.head >= position) }
        })
        .await;
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        match &self.place {
            Place::Memory => {}
            Place::Directory(directory) => {
                let _ = std::fs::remove_dir_all(directory);
            }
            #[cfg(feature = "postgres")]
            Place::Postgres { admin_url, database } => {
                if std::thread::panicking() {
                    eprintln!("test failed: PostgreSQL database {database} kept for inspection");
                    return;
                }
                let (url, sql) = (
                    admin_url.clone(),
                    format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
                );
                // Its own thread and runtime: a drop may happen inside any runtime.
                let _ = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                    if let Ok(runtime) = runtime {
                        let _ = runtime.block_on(admin(&url, &sql));
                    }
                })
                .join();
            }
        }
    }
}

/// A stored row as [`TestStore::row`] reads it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredEntity {
    /// The committed revision.
    pub revision: Revision,
    /// The schema version the state was written at.
    pub schema_version: u32,
    /// The stored payload: the state's fields with the machinery's beside them.
    pub payload: serde_json::Value,
}

/// A manager of `E` for a test: its handle ([`Entities`], by `Deref`), in
/// paused tokio time, with one shard on the test's thread and a clock that
/// moves only with [`advance`](Self::advance).
pub struct TestEntities<E: DurableEntity> {
    entities: Entities<E>,
    clock: ManualClock,
    _awake: KeepAwake,
}

impl<E: DurableEntity> TestEntities<E> {
    /// Starts a manager of `E` on `store`, with the default configuration
    /// and settings. Pauses tokio's clock (it must be a current-thread
    /// runtime, as `#[actix::test]`'s is).
    pub fn start(store: &TestStore) -> Self {
        Self::start_with(store, Config::default(), E::Settings::default())
    }

    /// Starts a manager of `E` on `store` with `config` and `settings`; the
    /// configuration's shards and clock are the testkit's.
    pub fn start_with(store: &TestStore, config: Config, settings: E::Settings) -> Self {
        // Already paused (`start_paused`, a second manager): as good.
        let _ = std::panic::catch_unwind(tokio::time::pause);
        let clock = ManualClock::new(t0());
        let config = config.with_arbiters(0).with_clock(clock.clone());
        Self {
            entities: Entities::start_with(store.shared(), config, settings),
            clock,
            _awake: KeepAwake::new(),
        }
    }

    /// The clock the entities record times by.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Moves time forward by `by`: tokio's paused clock (idle timers fire)
    /// and the recorded clock alike; then fires every durable timer due by
    /// the new time and returns once each fire is committed (and any timer
    /// those fires made due by then, too).
    pub async fn advance(&self, by: Duration) {
        self.clock
            .advance(chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX));
        tokio::time::advance(by).await;
        self.entities.fire_due().await;
    }

    /// Whether `key` has an actor that is not passivating.
    pub async fn is_resident(&self, key: &E::Key) -> bool {
        self.entities.is_resident(key).await
    }

    /// Waits until `key` has no actor: its passivation is done (its last
    /// write committed, its actor stopped), not only begun. Fails the test
    /// if it does not within 10 s of real time. Time does not move meanwhile.
    pub async fn until_passivated(&self, key: &E::Key) {
        let (entities, key) = (&self.entities, key.clone());
        wait("the entity to passivate", || {
            let key = key.clone();
            async move { !entities.has_actor(&key).await }
        })
        .await;
    }

    /// Waits until `key` has an actor that is not passivating.
    pub async fn until_resident(&self, key: &E::Key) {
        let (entities, key) = (&self.entities, key.clone());
        wait("the entity to be resident", || {
            let key = key.clone();
            async move { entities.is_resident(&key).await }
        })
        .await;
    }
}

impl<E: DurableEntity> Deref for TestEntities<E> {
    type Target = Entities<E>;

    fn deref(&self) -> &Entities<E> {
        &self.entities
    }
}

/// Checks `done`, yielding in between so that the library runs (its shard
/// is on this thread, its store on threads of its own) while tokio's paused
/// clock does not move; fails the test after 10 s of real time. Nothing on
/// the library's hot path tells a test of its changes: a check costs a
/// message to one shard.
async fn wait<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if done().await {
            return;
        }
        assert!(started.elapsed() < WAIT_LIMIT, "waited {WAIT_LIMIT:?} for {what}");
        tokio::task::yield_now().await;
    }
}

/// Keeps the thread's runtime from ever having nothing to do while a
/// [`TestEntities`] lives, so tokio never moves its paused clock on its own
/// (see the module's documentation): one task per thread, which yields and
/// runs again, resting the thread a little each turn so that a waiting test
/// does not spin a core the store's threads and the database need.
struct KeepAwake;

thread_local! {
    /// The thread's keeper task and how many `KeepAwake`s want it.
    static KEEPER: std::cell::RefCell<(usize, Option<tokio::task::JoinHandle<()>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// How long the keeper rests the thread each turn.
const KEEPER_REST: Duration = Duration::from_micros(200);

impl KeepAwake {
    fn new() -> Self {
        KEEPER.with_borrow_mut(|(wanted, keeper)| {
            *wanted += 1;
            if keeper.is_none() {
                *keeper = Some(tokio::task::spawn_local(async {
                    loop {
                        std::thread::sleep(KEEPER_REST);
                        tokio::task::yield_now().await;
                    }
                }));
            }
        });
        KeepAwake
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        KEEPER.with_borrow_mut(|(wanted, keeper)| {
            *wanted -= 1;
            if *wanted == 0 {
                if let Some(keeper) = keeper.take() {
                    keeper.abort();
                }
            }
        });
    }
}

/// A fresh, empty directory under the system's temporary one.
fn fresh_directory() -> std::io::Result<PathBuf> {
    let directory = std::env::temp_dir().join(format!("persist-durable-test-{}", unique_suffix()));
    std::fs::create_dir_all(&directory)?;
    Ok(directory)
}

/// A name no other test of any process has taken: the process, a counter
/// and the time.
fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database name replaced by `database`.
#[cfg(feature = "postgres")]
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{database}?{query}"),
        None => format!("{host_part}/{database}"),
    }
}

/// Runs `sql` on the server of `url`, on a connection of its own.
#[cfg(feature = "postgres")]
async fn admin(url: &str, sql: &str) -> Result<(), StoreError> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(StoreError::unavailable)?;
    conn.batch_execute(sql).await?;
    Ok(())
}
