//! The testkit's time stands still unless the test moves it: waiting for the
//! store, for a passivation or for the application's own feed consumer
//! never moves tokio's paused clock or the recorded one.

use std::time::Duration;

use persist_durable::testkit::{TestEntities, TestStore};
use persist_durable::{Command, EntityFeed, UserKey, UserState};

fn user(i: usize) -> UserKey {
    UserKey::new("mall", format!("user{i}")).unwrap()
}

/// Before, each round trip to the store let tokio jump its paused clock to
/// the next idle check: 200 sends and 200 reads moved it by about a year,
/// and the entities passivated on their own.
#[actix::test]
async fn waiting_for_the_store_never_moves_paused_time() {
    let store = TestStore::sqlite().await.unwrap();
    let users = TestEntities::<UserState>::start(&store);
    let (started, recorded) = (tokio::time::Instant::now(), persist_durable::Clock::now(users.clock()));

    for i in 0..200 {
        users.send(user(i), Command::UserLogin).await.unwrap();
        store.row(&user(i)).await.unwrap().unwrap();
    }

    assert_eq!(
        tokio::time::Instant::now() - started,
        Duration::ZERO,
        "tokio's paused clock did not move"
    );
    assert_eq!(
        persist_durable::Clock::now(users.clock()),
        recorded,
        "nor the recorded one"
    );
    assert_eq!(
        users.stats().await.unwrap().resident_entities,
        200,
        "no entity passivated on its own"
    );
}

/// `until_passivated` returns once the actor has stopped (its last write
/// committed), not when its passivation begins.
#[actix::test]
async fn until_passivated_returns_once_the_passivation_is_done() {
    let store = TestStore::sqlite().await.unwrap();
    let users = TestEntities::<UserState>::start(&store);
    users.send(user(1), Command::UserLogin).await.unwrap();

    users.advance(Duration::from_secs(35 * 60)).await;
    users.until_passivated(&user(1)).await;

    let stats = users.stats().await.unwrap();
    assert_eq!((stats.resident_entities, stats.passivations), (0, 1), "{stats:?}");
}

/// The application's own change feed consumer, followed in paused time: it
/// is woken by each commit, and the test waits for the position it saves.
/// Before, its poll's sleep moved paused time whenever the feed was empty.
#[actix::test]
async fn a_test_waits_for_the_applications_own_feed_consumer_without_moving_time() {
    let store = TestStore::sqlite_with(persist_durable::StoreConfig::default().with_change_feed(true))
        .await
        .unwrap();
    let users = TestEntities::<UserState>::start(&store);
    let started = tokio::time::Instant::now();
    let mut feed = EntityFeed::<UserState>::resume(store.shared(), "indexer")
        .await
        .unwrap();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let consumer = actix::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let changes = feed.next().await.unwrap();
                seen.borrow_mut().extend(changes.into_iter().map(|change| change.key));
                feed.commit().await.unwrap();
            }
        }
    });

    for i in 0..3 {
        users.send(user(i), Command::UserLogin).await.unwrap();
    }
    store.until_consumer_reaches("indexer", 3).await;

    assert_eq!(*seen.borrow(), [user(0), user(1), user(2)]);
    assert_eq!(tokio::time::Instant::now() - started, Duration::ZERO);
    consumer.abort();
}
