//! Redelivered and late events, bounded resources and bounded waits. The
//! process-level guarantees (kill -9, database outages, two nodes) are
//! proven by `cargo run -p persist-durable-bench --bin reliability`; see RELIABILITY.md.

use std::time::{Duration, Instant};

use crate::common::{key, t0, test_store_config, view, Backend, TestDb};
use actix::Actor;
use chrono::Duration as Minutes;
use persist_durable::{
    Command, CommandError, Config, Event, EventId, GetManagerStats, ManualClock, Revision, StateStoreExt, UserCommand,
    UserKey, UserStateManager,
};
use rstest::rstest;

#[rstest]
#[actix::test]
async fn replaying_a_whole_event_stream_applies_nothing_twice(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let users: Vec<UserKey> = (0..20).map(|i| key("mall001", &format!("user{i}"))).collect();
    // 400 events, 20 per user: within the 32 ids each user remembers.
    let stream: Vec<(UserKey, Event)> = (0..400)
        .map(|i| {
            let event = Event::from(view(&format!("p{i}"))).with_id(EventId::new(format!("topic-0-{i}")).unwrap());
            (users[i % users.len()].clone(), event)
        })
        .collect();
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let mut final_states = std::collections::HashMap::new();
    for (user, event) in &stream {
        let state = manager
            .send(UserCommand::new(user.clone(), event.clone()))
            .await
            .unwrap()
            .unwrap();
        final_states.insert(user.clone(), state);
    }

    // The whole stream again, after a restart (the ids live in the stored state).
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    for (user, event) in &stream {
        let replayed = manager
            .send(UserCommand::new(user.clone(), event.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &replayed, &final_states[user],
            "a redelivered event answers the current state, unchanged"
        );
    }

    for user in &users {
        let stored = store.load(user).await.unwrap().unwrap();
        assert_eq!(stored.revision, Revision(20), "{user}: each event applied once");
    }
}

#[rstest]
#[actix::test]
async fn a_late_event_never_moves_recorded_times_backwards(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let clock = ManualClock::new(t0() + Minutes::hours(1));
    let manager = UserStateManager::new(db.connect().await, Config::default().with_clock(clock)).start();
    let user = key("mall001", "user001");
    let newer = t0() + Minutes::minutes(30);
    let older = t0() + Minutes::minutes(10);

    manager
        .send(UserCommand::new(
            user.clone(),
            Event::from(Command::UserLogin).at(newer),
        ))
        .await
        .unwrap()
        .unwrap();
    let after_late = manager
        .send(UserCommand::new(
            user.clone(),
            Event::from(Command::UserLogin).at(older),
        ))
        .await
        .unwrap()
        .unwrap();
    let without_time = manager
        .send(UserCommand::new(user, Command::UseCart))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(after_late.last_login, Some(newer));
    assert_eq!(after_late.last_event_time, Some(newer));
    assert_eq!(
        without_time.last_cart_use,
        Some(t0() + Minutes::hours(1)),
        "no event time: the clock's now"
    );
}

#[actix::test]
async fn commands_beyond_a_users_queue_bound_are_refused_and_the_rest_committed_once() {
    let store = std::sync::Arc::new(persist_durable::MemoryStore::new());
    let config = Config::default().with_arbiters(0).with_max_queued_per_entity(5);
    let manager = UserStateManager::new(store.clone(), config).start();
    let user = key("mall001", "busy");

    let requests: Vec<_> = (0..50)
        .map(|i| manager.send(UserCommand::new(user.clone(), view(&format!("p{i}")))))
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for request in requests {
        match request.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(CommandError::Overloaded { key, .. }) => {
                assert_eq!(key, user);
                refused += 1;
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }

    assert!(refused > 0, "the bound was reached");
    assert_eq!(accepted + refused, 50);
    assert_eq!(
        store.load(&user).await.unwrap().unwrap().revision,
        Revision(accepted),
        "accepted ones committed once"
    );
}

#[actix::test]
async fn commands_beyond_the_total_bound_are_refused_by_the_manager() {
    let store = std::sync::Arc::new(persist_durable::MemoryStore::new());
    let config = Config::default().with_arbiters(0).with_max_commands_in_flight(10);
    let manager = UserStateManager::new(store, config).start();

    let requests: Vec<_> = (0..100)
        .map(|i| {
            manager.send(UserCommand::new(
                key("mall001", &format!("user{i}")),
                Command::UserLogin,
            ))
        })
        .collect();
    let mut refused = 0;
    for request in requests {
        if let Err(CommandError::Overloaded { .. }) = request.await.unwrap() {
            refused += 1;
        }
    }

    assert!(refused > 0);
    assert_eq!(manager.send(GetManagerStats).await.unwrap().commands_refused, refused);
}

#[rstest]
#[actix::test]
async fn past_the_resident_limit_the_least_recently_used_users_are_passivated_keeping_their_state(
    #[values(Backend::Sqlite)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let config = Config::default().with_arbiters(0).with_max_resident(10);
    let manager = UserStateManager::new(store.clone(), config).start();
    let users: Vec<UserKey> = (0..30).map(|i| key("mall001", &format!("user{i}"))).collect();

    for user in &users {
        manager
            .send(UserCommand::new(user.clone(), Command::UserLogin))
            .await
            .unwrap()
            .unwrap();
    }
    // Let the evicted actors finish stopping.
    let mut stats = manager.send(GetManagerStats).await.unwrap();
    for _ in 0..1_000 {
        if stats.resident_entities <= 11 {
            break;
        }
        tokio::task::yield_now().await;
        stats = manager.send(GetManagerStats).await.unwrap();
    }

    assert!(stats.resident_entities <= 11, "{stats:?}");
    assert_eq!(stats.evictions, 20, "exactly the excess, no cascade: {stats:?}");
    for user in &users {
        let state = manager
            .send(UserCommand::new(user.clone(), Command::GetUserState))
            .await
            .unwrap()
            .unwrap();
        assert!(state.last_login.is_some(), "{user} kept its state");
    }
}

#[rstest]
#[actix::test]
async fn a_restore_that_hangs_fails_within_the_operation_timeout(#[values(Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db
        .connect_with(test_store_config().with_operation_timeout(Duration::from_millis(300)))
        .await;
    let manager = UserStateManager::new(store, Config::default()).start();
    let user = key("mall001", "user001");
    let lock = db.lock_table();

    let started = Instant::now();
    let reply = manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap();

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        started.elapsed()
    );
    // Whichever gives up first, the client or the server's statement timeout.
    assert!(
        matches!(&reply, Err(CommandError::StoreUnavailable { .. })),
        "{reply:?}"
    );
    drop(lock);
    manager
        .send(UserCommand::new(user, Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
}
