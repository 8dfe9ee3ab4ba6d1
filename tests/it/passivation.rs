//! Passivation after 30 idle minutes and restore on the next command, in
//! paused tokio time: the Rust counterpart of Pekko's `manualTime.timePasses`.

use std::time::Duration;

use crate::common::{key, t0, view, Backend, TestDb};
use actix::{Actor, Addr};
use persist_durable::{
    Command, CommandError, Config, GetManagerStats, ManualClock, MemoryStore, ProductId, Revision, SharedStore,
    StateStoreExt, UserCommand, UserState, UserStateActor, UserStateManager,
};
use rstest::rstest;

const MINUTE: Duration = Duration::from_secs(60);

/// Paused time is per runtime: user actors must run on the test's own.
fn on_this_runtime() -> Config {
    Config::default().with_arbiters(0)
}

/// Lets the actors on this thread run until `actor` has stopped, without
/// moving the clock; fails if it does not stop.
async fn until_stopped(actor: &Addr<UserStateActor>) {
    for _ in 0..1_000 {
        if !actor.connected() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the actor did not stop");
}

/// Lets the actors on this thread run until the manager reports `resident` users.
async fn until_resident(manager: &Addr<UserStateManager>, resident: usize) {
    for _ in 0..1_000 {
        if manager.send(GetManagerStats).await.unwrap().resident_entities == resident {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the manager never had {resident} resident users");
}

#[rstest]
#[actix::test]
async fn idle_user_is_passivated_after_30_minutes_and_restored_field_by_field(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let store = db.connect().await;
    let config = Config::default().with_clock(ManualClock::new(t0()));
    let user = key("mall001", "user001");
    let actor = UserStateActor::new(user.clone(), store.clone(), config.clone()).start();
    actor.send(Command::UserLogin).await.unwrap().unwrap();
    for id in ["p1", "p2", "p3", "p4"] {
        actor.send(view(id)).await.unwrap().unwrap();
    }
    actor.send(Command::UseCart).await.unwrap().unwrap();
    let before = actor
        .send(Command::SetMarketingOptIn { opt_in: true })
        .await
        .unwrap()
        .unwrap();

    tokio::time::advance(29 * MINUTE).await;
    assert!(actor.connected(), "still alive after 29 idle minutes");

    tokio::time::advance(MINUTE + 5 * MINUTE).await;
    until_stopped(&actor).await;

    let restored = UserStateActor::new(user.clone(), store, config).start();
    let after = restored.send(Command::GetUserState).await.unwrap().unwrap();
    assert_eq!(after.last_login, Some(t0()));
    assert_eq!(after.last_cart_use, Some(t0()));
    let products: Vec<&str> = after.recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(products, ["p4", "p3", "p2"]);
    assert!(after.marketing_opt_in);
    assert_eq!(after.last_event_time, Some(t0()));
    assert_eq!(after, before);
}

#[rstest]
#[actix::test]
async fn each_command_restarts_the_idle_countdown(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let actor = UserStateActor::new(key("m", "u"), db.connect().await, Config::default()).start();

    for _ in 0..4 {
        tokio::time::advance(20 * MINUTE).await;
        actor.send(Command::UseCart).await.unwrap().unwrap();
    }

    assert!(actor.connected(), "80 minutes of use, never 30 idle");
}

#[rstest]
#[actix::test]
async fn idle_timeout_and_check_interval_are_configurable(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let config = Config::default()
        .with_idle_timeout(2 * MINUTE)
        .with_idle_check_interval(MINUTE);
    let actor = UserStateActor::new(key("m", "u"), db.connect().await, config).start();
    actor.send(Command::UserLogin).await.unwrap().unwrap();

    tokio::time::advance(MINUTE).await;
    assert!(actor.connected());
    tokio::time::advance(2 * MINUTE).await;
    until_stopped(&actor).await;
}

#[rstest]
#[actix::test]
async fn the_manager_forgets_a_passivated_user_and_restores_it_on_the_next_command(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let manager = UserStateManager::new(db.connect().await, on_this_runtime()).start();
    let user = key("mall001", "user001");
    let before = manager
        .send(UserCommand::new(user.clone(), view("p1")))
        .await
        .unwrap()
        .unwrap();

    tokio::time::advance(29 * MINUTE).await;
    assert_eq!(manager.send(GetManagerStats).await.unwrap().resident_entities, 1);
    tokio::time::advance(6 * MINUTE).await;
    until_resident(&manager, 0).await;
    assert_eq!(manager.send(GetManagerStats).await.unwrap().passivations, 1);

    let after = manager
        .send(UserCommand::new(user, Command::GetUserState))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, before);
    let stats = manager.send(GetManagerStats).await.unwrap();
    assert_eq!((stats.resident_entities, stats.activations), (1, 2));
}

#[rstest]
#[actix::test]
async fn commands_racing_with_passivation_are_all_applied_once_in_order(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), on_this_runtime()).start();
    let user = key("mall001", "user001");
    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    // The idle check fires; while the child asks to be passivated, is told to,
    // and stops, commands keep arriving, one per scheduler turn.
    tokio::time::advance(35 * MINUTE).await;
    let racing: Vec<_> = {
        let mut requests = Vec::new();
        for i in 0..20 {
            requests.push(manager.send(UserCommand::new(user.clone(), view(&format!("p{i}")))));
            tokio::task::yield_now().await;
        }
        requests
    };
    let mut replies = Vec::new();
    for request in racing {
        replies.push(request.await.expect("the manager answers"));
    }

    for (i, reply) in replies.iter().enumerate() {
        assert!(reply.is_ok(), "command {i} failed: {reply:?}");
    }
    let stats = manager.send(GetManagerStats).await.unwrap();
    assert!(stats.passivations >= 1, "the child did passivate: {stats:?}");
    assert!(
        stats.commands_held_during_passivation >= 1,
        "some commands hit the window: {stats:?}"
    );
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(21), "each command written exactly once");
    let products: Vec<&str> = stored.state.recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(products, ["p19", "p18", "p17"], "in the order sent");
    assert_eq!(Ok(&stored.state), replies.last().unwrap().as_ref().map_err(|_| ()));
}

#[rstest]
#[actix::test]
async fn reads_and_writes_racing_with_passivation_are_all_answered(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), on_this_runtime()).start();
    let user = key("mall001", "user001");
    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    // A write then a read at every scheduler turn while the child passivates:
    // a read left last in the queue must not keep the child from stopping.
    tokio::time::advance(35 * MINUTE).await;
    let mut requests = Vec::new();
    for i in 0..10 {
        requests.push(manager.send(UserCommand::new(user.clone(), view(&format!("p{i}")))));
        requests.push(manager.send(UserCommand::new(user.clone(), Command::GetUserState)));
        tokio::task::yield_now().await;
    }
    let replies = within_real_seconds(30, futures_util::future::join_all(requests)).await;

    assert!(replies.iter().all(|r| matches!(r, Ok(Ok(_)))), "{replies:?}");
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(11));
    // And the user is not stuck for later commands either.
    let later = within_real_seconds(30, manager.send(UserCommand::new(user, Command::GetUserState))).await;
    assert!(matches!(later, Ok(Ok(_))));
}

/// Awaits `work`, failing the test if it takes `seconds` of real time. Not a
/// tokio timer: paused time auto-advances through timers while the runtime
/// waits on the database thread, so a tokio timeout would fire spuriously.
async fn within_real_seconds<T>(seconds: u64, work: impl std::future::Future<Output = T>) -> T {
    let (expired, deadline) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        let _ = expired.send(());
    });
    tokio::select! {
        done = work => done,
        _ = deadline => panic!("not answered within {seconds} s of real time: the user is stuck"),
    }
}

#[rstest]
#[actix::test]
async fn a_user_passivated_twice_keeps_its_state(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let manager = UserStateManager::new(db.connect().await, on_this_runtime()).start();
    let user = key("mall001", "user001");

    let mut last = UserState::default();
    for id in ["a", "b"] {
        last = manager
            .send(UserCommand::new(user.clone(), view(id)))
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(40 * MINUTE).await;
        until_resident(&manager, 0).await;
    }

    let restored = manager
        .send(UserCommand::new(user, Command::GetUserState))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored, last);
    assert_eq!(manager.send(GetManagerStats).await.unwrap().passivations, 2);
}

#[actix::test]
async fn commands_held_while_a_user_passivates_beyond_its_queue_limit_are_refused_by_the_manager() {
    let store: SharedStore = std::sync::Arc::new(MemoryStore::new());
    let config = on_this_runtime().with_max_resident(1).with_max_queued_per_entity(3);
    let manager = UserStateManager::new(store.clone(), config).start();
    let (evicted, other) = (key("mall001", "evicted"), key("mall001", "other"));
    manager
        .send(UserCommand::new(evicted.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    // `other` takes the only resident place: `evicted` starts passivating at
    // once, and the ten commands queued behind are handled while it does.
    let activation = manager.send(UserCommand::new(other, Command::UserLogin));
    let held: Vec<_> = (0..10)
        .map(|i| manager.send(UserCommand::new(evicted.clone(), view(&format!("p{i}")))))
        .collect();
    let mut replies = Vec::new();
    for request in held {
        replies.push(request.await.unwrap());
    }
    activation.await.unwrap().unwrap();

    let accepted = replies.iter().filter(|r| r.is_ok()).count();
    let refused = replies
        .iter()
        .filter(|r| matches!(r, Err(CommandError::Overloaded { key, .. }) if *key == evicted))
        .count();
    assert_eq!((accepted, refused), (3, 7), "{replies:?}");
    let stats = manager.send(GetManagerStats).await.unwrap();
    assert_eq!(stats.commands_refused, 7, "refused by the manager: {stats:?}");
    assert_eq!(stats.commands_held_during_passivation, 3, "{stats:?}");
    assert_eq!(
        store.load(&evicted).await.unwrap().unwrap().revision,
        Revision(4),
        "the held commands were applied once each"
    );
}

#[actix::test]
async fn idle_passivations_and_evictions_are_counted_separately() {
    tokio::time::pause();
    let store: SharedStore = std::sync::Arc::new(MemoryStore::new());
    let manager = UserStateManager::new(store, on_this_runtime().with_max_resident(1)).start();
    let (first, second) = (key("mall001", "first"), key("mall001", "second"));

    manager
        .send(UserCommand::new(first, Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    // The second user takes the only resident place: the first is evicted.
    manager
        .send(UserCommand::new(second, Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    until_resident(&manager, 1).await;
    // The second goes idle and is passivated.
    tokio::time::advance(35 * MINUTE).await;
    until_resident(&manager, 0).await;

    let stats = manager.send(GetManagerStats).await.unwrap();
    assert_eq!(stats.evictions, 1, "{stats:?}");
    assert_eq!(stats.idle_passivations, 1, "{stats:?}");
    assert_eq!(stats.passivations, 2, "the total of both: {stats:?}");
}
