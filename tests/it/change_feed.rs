//! The change feed: every committed revision, in commit order per user and in
//! one stable global order, gapless, resumable without duplicates.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{key, test_store_config, view, Backend, TestDb};
use actix::Actor;
use persist_durable::{
    ChangeFeed, Command, Config, CorruptRow, EntityKey, Revision, SharedStore, SkipRefused, StateStoreExt, StoreError,
    UserCommand, UserKey, UserState, UserStateChange, UserStateManager,
};
use rstest::rstest;

async fn feed_store(db: &TestDb) -> SharedStore {
    db.connect_with(test_store_config().with_change_feed(true)).await
}

async fn read_all(store: &SharedStore) -> Vec<UserStateChange> {
    let mut feed = ChangeFeed::from_position(store.clone(), 0).with_batch_size(64);
    let mut all = Vec::new();
    loop {
        let batch = feed.next_batch().await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Positions are 1, 2, 3, ... with none missing or repeated, and each user's
/// revisions are 1, 2, 3, ... in position order.
fn assert_gapless_and_ordered(changes: &[UserStateChange]) {
    let positions: Vec<u64> = changes.iter().map(|c| c.position).collect();
    let expected: Vec<u64> = (1..=changes.len() as u64).collect();
    assert_eq!(positions, expected, "positions are gapless and in order");
    let mut last_revision: BTreeMap<&UserKey, u64> = BTreeMap::new();
    for change in changes {
        let last = last_revision.entry(&change.key).or_insert(0);
        assert_eq!(
            change.revision,
            Revision(*last + 1),
            "{}: revisions in order, none skipped",
            change.key
        );
        *last += 1;
    }
}

#[rstest]
#[actix::test]
async fn every_committed_revision_is_delivered_in_order_even_when_commands_share_a_write(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let users: Vec<UserKey> = (0..5).map(|i| key("mall001", &format!("user{i}"))).collect();

    // 20 commands per user sent at once: many share a row write.
    let requests: Vec<_> = (0..100)
        .map(|i| {
            let user = users[i % 5].clone();
            (
                user.clone(),
                manager.send(UserCommand::new(user, view(&format!("p{i}")))),
            )
        })
        .collect();
    let mut replies: BTreeMap<UserKey, Vec<UserState>> = BTreeMap::new();
    for (user, request) in requests {
        replies.entry(user).or_default().push(request.await.unwrap().unwrap());
    }

    let changes = read_all(&store).await;
    assert_eq!(changes.len(), 100);
    assert_gapless_and_ordered(&changes);
    for user in &users {
        let delivered: Vec<&UserState> = changes.iter().filter(|c| &c.key == user).map(|c| &c.state).collect();
        let acknowledged: Vec<&UserState> = replies[user].iter().collect();
        assert_eq!(
            delivered, acknowledged,
            "{user}: the feed carries each acknowledged state"
        );
    }
    assert!(
        store.stats().rows_written < 100,
        "commands did share writes: {:?}",
        store.stats()
    );
}

#[rstest]
#[actix::test]
async fn a_consumer_restarted_from_its_offset_continues_without_gaps_or_duplicates(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    for i in 0..60 {
        let user = key("mall001", &format!("user{}", i % 4));
        manager
            .send(UserCommand::new(user, Command::UseCart))
            .await
            .unwrap()
            .unwrap();
    }

    let mut consumed = Vec::new();
    {
        let mut feed = ChangeFeed::resume(store.clone(), "search-index")
            .await
            .unwrap()
            .with_batch_size(7);
        for _ in 0..3 {
            consumed.extend(feed.next_batch().await.unwrap());
        }
        feed.commit().await.unwrap();
        // Read further but crash before committing: these come again.
        feed.next_batch().await.unwrap();
    }
    // A new process: the store is opened again and the consumer resumes.
    let reopened = feed_store(&db).await;
    let mut feed = ChangeFeed::resume(reopened, "search-index")
        .await
        .unwrap()
        .with_batch_size(7);
    assert_eq!(feed.position(), 21, "resumes after the committed offset");
    loop {
        let batch = feed.next_batch().await.unwrap();
        if batch.is_empty() {
            break;
        }
        consumed.extend(batch);
    }

    assert_eq!(
        consumed,
        read_all(&store).await,
        "no gap and no duplicate across the restart"
    );
    assert_eq!(consumed.len(), 60);
}

#[rstest]
#[actix::test]
async fn writers_committing_concurrently_leave_no_gap_for_a_consumer_reading_meanwhile(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let node_a = UserStateManager::new(feed_store(&db).await, Config::default()).start();
    let node_b = UserStateManager::new(feed_store(&db).await, Config::default()).start();
    let reader_store = feed_store(&db).await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = actix::spawn(async move {
        let mut feed = ChangeFeed::from_position(reader_store, 0).with_batch_size(50);
        let mut consumed = Vec::new();
        loop {
            let batch = feed.next_batch().await.unwrap();
            let idle = batch.is_empty();
            consumed.extend(batch);
            if idle {
                if stopped.try_recv().is_ok() {
                    return consumed;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    // Both nodes write the same 30 users at once: statements commit out of order and conflict.
    let mut requests = Vec::new();
    for i in 0..600 {
        let node = if i % 2 == 0 { &node_a } else { &node_b };
        let user = key("mall001", &format!("user{}", i % 30));
        requests.push(node.send(UserCommand::new(user, view(&format!("p{i}")))));
    }
    let mut acknowledged = 0;
    for request in requests {
        if request.await.unwrap().is_ok() {
            acknowledged += 1;
        }
    }
    stop.send(()).unwrap();
    let consumed = reader.await.unwrap();

    assert_eq!(consumed.len(), acknowledged, "one change per acknowledged command");
    assert_gapless_and_ordered(&consumed);
    assert_eq!(consumed, read_all(&feed_store(&db).await).await, "the order is stable");
}

#[rstest]
#[actix::test]
async fn a_conflicting_write_leaves_nothing_in_the_feed(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let user = key("mall001", "user001");
    store
        .write(&user, Revision::NONE, Revision(1), &UserState::default())
        .await
        .unwrap();

    let conflict = store
        .write(&user, Revision::NONE, Revision(1), &UserState::default())
        .await;

    assert!(matches!(conflict, Err(StoreError::Conflict { .. })));
    let changes = read_all(&store).await;
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].position, changes[0].revision), (1, Revision(1)));
}

#[rstest]
#[actix::test]
async fn a_store_opened_without_the_feed_says_how_to_enable_it(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;

    let error = ChangeFeed::from_position(store, 0).next_batch().await.unwrap_err();

    assert!(error.to_string().contains("with_change_feed"), "{error}");
}

/// SQL that overwrites the payload of the change at `position` with bytes that are not a state.
fn corrupt_change_payload(backend: Backend, position: u64) -> String {
    match backend {
        Backend::Sqlite => {
            format!("UPDATE state_changes SET state_payload = X'7B6E6F74206A736F6E' WHERE position = {position}")
        }
        Backend::Postgres => {
            format!("UPDATE state_changes SET state_payload = '\\x7b6e6f74206a736f6e' WHERE position = {position}")
        }
    }
}

/// Three users written once each: feed positions 1, 2 and 3.
async fn three_changes(store: &SharedStore) -> Vec<UserKey> {
    let users: Vec<UserKey> = (1..=3).map(|i| key("mall001", &format!("user{i}"))).collect();
    for user in &users {
        store
            .write(user, Revision::NONE, Revision(1), &UserState::default())
            .await
            .unwrap();
    }
    users
}

fn positions(changes: &[UserStateChange]) -> Vec<u64> {
    changes.iter().map(|c| c.position).collect()
}

#[rstest]
#[actix::test]
async fn changes_before_an_undecodable_one_are_delivered_then_the_feed_stops_at_it_naming_position_and_user(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let users = three_changes(&store).await;
    db.execute(&corrupt_change_payload(backend, 2));
    let mut feed = ChangeFeed::resume(store.clone(), "search-index")
        .await
        .unwrap()
        .with_batch_size(10);

    let first = feed
        .next_batch()
        .await
        .expect("the change before the corrupt one is delivered");
    assert_eq!(positions(&first), [1]);
    for _ in 0..2 {
        match feed.next_batch().await {
            Err(StoreError::CorruptChange {
                position,
                key,
                source: CorruptRow::Payload(_),
            }) => {
                assert_eq!(position, 2);
                assert_eq!(key, users[1].persistence_id(), "names the user");
            }
            other => panic!("expected the feed to stop at position 2: {other:?}"),
        }
        assert_eq!(
            feed.position(),
            1,
            "the position does not move over an undelivered change"
        );
        assert_eq!(feed.stopped_at(), Some(2));
    }
    let error = feed.next().await.expect_err("next() stops too, rather than waiting");
    assert!(error.to_string().contains("position 2"), "{error}");
    assert!(error.to_string().contains("skip_corrupt"), "says how to go on: {error}");

    feed.commit().await.unwrap();
    let resumed = ChangeFeed::resume(store, "search-index").await.unwrap();
    assert_eq!(
        resumed.position(),
        1,
        "the committed offset is the last change delivered"
    );
}

#[rstest]
#[actix::test]
async fn a_consumer_skips_an_undecodable_change_only_deliberately_and_only_that_one(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    three_changes(&store).await;
    db.execute(&corrupt_change_payload(backend, 2));
    let mut feed = ChangeFeed::resume(store.clone(), "search-index")
        .await
        .unwrap()
        .with_batch_size(10);

    let before_any_read = feed.skip_corrupt(2).unwrap_err();
    assert_eq!(
        before_any_read,
        SkipRefused {
            requested: 2,
            stopped_at: None
        }
    );
    assert_eq!(positions(&feed.next_batch().await.unwrap()), [1]);
    feed.next_batch().await.unwrap_err();
    let not_the_corrupt_one = feed.skip_corrupt(3).unwrap_err();
    assert_eq!(not_the_corrupt_one.stopped_at, Some(2));
    assert_eq!(feed.position(), 1, "a refused skip skips nothing");

    feed.skip_corrupt(2).unwrap();
    assert_eq!(feed.position(), 2);
    assert_eq!(feed.stopped_at(), None);
    assert_eq!(positions(&feed.next_batch().await.unwrap()), [3], "the rest follows");
    feed.commit().await.unwrap();

    let resumed = ChangeFeed::resume(store.clone(), "search-index").await.unwrap();
    assert_eq!(resumed.position(), 3, "the skip is committed with the offset");
    let mut other_consumer = ChangeFeed::from_position(store, 0);
    other_consumer.next_batch().await.unwrap();
    assert!(
        matches!(
            other_consumer.next_batch().await,
            Err(StoreError::CorruptChange { position: 2, .. })
        ),
        "a skip is one consumer's decision: the row is still corrupt for the others"
    );
}

/// Damage to a feed row that the store itself cannot read (not the payload).
#[derive(Debug, Clone, Copy)]
enum RowDamage {
    Revision,
    PersistenceId,
    /// SQLite keeps the commit time as text; PostgreSQL's column cannot hold a bad one.
    Timestamp,
}

#[rstest]
#[actix::test]
async fn a_feed_row_the_store_cannot_read_stops_the_feed_at_its_position_too(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(RowDamage::Revision, RowDamage::PersistenceId, RowDamage::Timestamp)] damage: RowDamage,
) {
    if matches!((backend, damage), (Backend::Postgres, RowDamage::Timestamp)) {
        return;
    }
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    three_changes(&store).await;
    db.execute(match damage {
        RowDamage::Revision => "UPDATE state_changes SET revision = 0 WHERE position = 2",
        RowDamage::PersistenceId => "UPDATE state_changes SET persistence_id = 'no entity type' WHERE position = 2",
        RowDamage::Timestamp => "UPDATE state_changes SET committed_at = 'yesterday' WHERE position = 2",
    });
    let mut feed = ChangeFeed::from_position(store, 0).with_batch_size(10);

    let first = feed
        .next_batch()
        .await
        .expect("the change before the damaged one is delivered");
    assert_eq!(positions(&first), [1]);
    let error = feed.next_batch().await.unwrap_err();
    assert!(
        matches!(error, StoreError::CorruptChange { position: 2, .. }),
        "{damage:?}: {error:?}"
    );
    feed.skip_corrupt(2).unwrap();
    assert_eq!(positions(&feed.next_batch().await.unwrap()), [3]);
}

/// Ten changes of ten users, at positions 1 to 10.
async fn ten_changes(store: &SharedStore) {
    let users = persist_durable::UserStates::start(store.clone(), Config::default());
    for i in 0..10 {
        users.send(key("mall001", &format!("u{i}")), view("p1")).await.unwrap();
    }
}

/// Before, the feed had no retention: `state_changes` grew without bound.
#[rstest]
#[actix::test]
async fn the_feed_is_trimmed_by_position_in_chunks_never_past_the_slowest_consumer(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    use persist_durable::{ChangeLogExt, FeedRetention};
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    ten_changes(&store).await;
    let mut slow = ChangeFeed::resume(store.clone(), "slow-consumer")
        .await
        .unwrap()
        .with_batch_size(4);
    slow.next_batch().await.unwrap();
    slow.commit().await.unwrap(); // at position 4

    let kept_for_the_consumer = store
        .trim_feed(&FeedRetention::keep_last(2).with_chunk_size(3))
        .await
        .unwrap();

    assert_eq!(
        kept_for_the_consumer, 4,
        "up to the slowest consumer's position, in chunks of 3"
    );
    assert_eq!(positions(&read_all(&store).await), (5..=10).collect::<Vec<_>>());
    assert_eq!(
        positions(&slow.next_batch().await.unwrap()),
        [5, 6, 7, 8],
        "the consumer misses nothing"
    );

    let past = store
        .trim_feed(&FeedRetention::keep_last(2).beyond_consumers())
        .await
        .unwrap();
    assert_eq!(past, 4, "told to, it trims past the consumer down to the last two");
    assert_eq!(positions(&read_all(&store).await), [9, 10]);
}

#[rstest]
#[actix::test]
async fn the_feed_keeps_changes_younger_than_its_age(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    use persist_durable::{ChangeLogExt, FeedRetention};
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    ten_changes(&store).await;

    let young = store
        .trim_feed(&FeedRetention::keep_for(Duration::from_secs(3600)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await; // committed_at has millisecond precision
    let old = store.trim_feed(&FeedRetention::keep_for(Duration::ZERO)).await.unwrap();

    assert_eq!((young, old), (0, 10));
    assert!(read_all(&store).await.is_empty());
}

#[actix::test]
async fn a_manager_with_feed_retention_trims_the_feed_on_its_interval() {
    use persist_durable::{FeedRetention, MemoryStore};
    tokio::time::pause();
    let store: SharedStore = std::sync::Arc::new(MemoryStore::with_change_feed());
    ten_changes(&store).await;
    let retention = FeedRetention::keep_last(3).every(Duration::from_secs(60));
    let users = persist_durable::UserStates::start(
        store.clone(),
        Config::default().with_arbiters(0).with_feed_retention(Some(retention)),
    );
    users.send(key("mall001", "u10"), view("p1")).await.unwrap();
    assert_eq!(read_all(&store).await.len(), 11);

    tokio::time::advance(Duration::from_secs(61)).await;
    let mut left = read_all(&store).await.len();
    for _ in 0..100 {
        if left == 3 {
            break;
        }
        tokio::task::yield_now().await;
        left = read_all(&store).await.len();
    }

    assert_eq!(positions(&read_all(&store).await), [9, 10, 11]);
}

#[actix::test]
async fn a_feed_consumer_cannot_take_a_kafka_position_name() {
    let store: SharedStore = std::sync::Arc::new(persist_durable::MemoryStore::with_change_feed());
    let refused = ChangeFeed::resume(store, "kafka/group/topic/0").await;
    assert!(
        matches!(refused, Err(StoreError::InvalidConfig(_))),
        "{:?}",
        refused.err()
    );
}

/// An entity whose state has one field, `redacted`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Flag {
    redacted: bool,
}

impl persist_durable::DurableEntity for Flag {
    const ENTITY_TYPE: &'static str = "Flag";
    const MANIFEST: &'static str = "Flag/v1";
    type Key = persist_durable::Id<Flag>;
    type Command = bool;
    type Settings = ();
    type Rejection = std::convert::Infallible;

    fn apply(&self, set: &bool, _: chrono::DateTime<chrono::Utc>, _: &()) -> Result<Option<Self>, Self::Rejection> {
        Ok(Some(Flag { redacted: *set }))
    }
}

/// Before, the feed marked redacted rows with the payload
/// `{"redacted":true}`: exactly what this state encodes to, so its change
/// read as a redaction and its data was lost to the consumer.
#[rstest]
#[actix::test]
async fn a_state_that_looks_like_the_old_redaction_marker_is_read_as_itself(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let flags = persist_durable::Entities::<Flag>::start(store.clone(), Config::default());
    let flag = persist_durable::Id::new("f").unwrap();
    flags.send(flag, true).await.unwrap();

    let changes = persist_durable::EntityFeed::<Flag>::from_position(store, 0)
        .next_batch()
        .await
        .unwrap();

    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].kind, persist_durable::ChangeKind::Updated);
    assert_eq!(changes[0].state, Flag { redacted: true });
}
