//! The change feed: every committed revision, in commit order per user and in
//! one stable global order, gapless, resumable without duplicates.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use actix::Actor;
use common::{key, test_store_config, view, Backend, TestDb};
use persist_durable::{
    ChangeFeed, Command, Config, Revision, SharedStore, StateChange, StoreError, UserCommand, UserKey, UserState,
    UserStateManager,
};
use rstest::rstest;

async fn feed_store(db: &TestDb) -> SharedStore {
    db.connect_with(test_store_config().with_change_feed(true)).await
}

async fn read_all(store: &SharedStore) -> Vec<StateChange> {
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
fn assert_gapless_and_ordered(changes: &[StateChange]) {
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
