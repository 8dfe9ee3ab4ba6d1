//! Every command, and the state it leaves, committed on SQLite and PostgreSQL.

use crate::common::{key, t0, view, Backend, TestDb};
use actix::Actor;
use chrono::Duration;
use persist_durable::{
    Command, CommandError, Config, ManualClock, ProductId, Revision, StatePolicy, StateStoreExt, UserCommand, UserKey,
    UserState, UserStateActor, UserStateManager,
};
use rstest::rstest;

fn product_ids(state: &UserState) -> Vec<&str> {
    state.recent_products.iter().map(ProductId::as_str).collect()
}

/// The state as a freshly connected store reads it: committed, not cached.
async fn committed(db: &TestDb, key: &UserKey) -> (Revision, UserState) {
    let stored = db.connect().await.load(key).await.unwrap().expect("a stored row");
    (stored.revision, stored.state)
}

#[rstest]
#[actix::test]
async fn a_user_never_seen_reads_the_default_state_and_nothing_is_written(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let user = key("mall001", "new-user");

    let state = manager
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(state, UserState::default());
    assert_eq!(db.connect().await.load(&user).await.unwrap(), None);
}

#[rstest]
#[actix::test]
async fn user_login_records_the_login_time(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let clock = ManualClock::new(t0());
    let manager = UserStateManager::new(db.connect().await, Config::default().with_clock(clock)).start();
    let user = key("mall001", "user001");

    let state = manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(state.last_login, Some(t0()));
    assert_eq!(state.last_event_time, Some(t0()));
    assert_eq!(committed(&db, &user).await, (Revision(1), state));
}

#[rstest]
#[actix::test]
async fn use_cart_records_the_cart_time(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let clock = ManualClock::new(t0());
    let manager = UserStateManager::new(db.connect().await, Config::default().with_clock(clock.clone())).start();
    let user = key("mall001", "user001");

    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    clock.advance(Duration::minutes(3));
    let state = manager
        .send(UserCommand::new(user.clone(), Command::UseCart))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(state.last_cart_use, Some(t0() + Duration::minutes(3)));
    assert_eq!(state.last_login, Some(t0()), "the login survives the cart use");
    assert_eq!(committed(&db, &user).await, (Revision(2), state));
}

#[rstest]
#[actix::test]
async fn view_product_keeps_the_three_most_recent_first(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let user = key("mall001", "user001");

    let mut last = UserState::default();
    for id in ["p1", "p2", "p3", "p4", "p2"] {
        last = manager
            .send(UserCommand::new(user.clone(), view(id)))
            .await
            .unwrap()
            .unwrap();
    }

    assert_eq!(product_ids(&last), ["p2", "p4", "p3"]);
    assert_eq!(committed(&db, &user).await, (Revision(5), last));
}

#[rstest]
#[actix::test]
async fn set_marketing_opt_in_is_stored_and_can_be_withdrawn(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let user = key("mall001", "user001");

    let opted_in = manager
        .send(UserCommand::new(
            user.clone(),
            Command::SetMarketingOptIn { opt_in: true },
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(opted_in.marketing_opt_in);
    assert_eq!(committed(&db, &user).await.1, opted_in);

    let opted_out = manager
        .send(UserCommand::new(
            user.clone(),
            Command::SetMarketingOptIn { opt_in: false },
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(!opted_out.marketing_opt_in);
    assert_eq!(committed(&db, &user).await, (Revision(2), opted_out));
}

#[rstest]
#[actix::test]
async fn get_user_state_answers_the_committed_state_without_writing(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let user = key("mall001", "user001");
    let after_login = manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    let read = manager
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(read, after_login);
    assert_eq!(committed(&db, &user).await.0, Revision(1), "a read writes nothing");
}

#[rstest]
#[actix::test]
async fn the_recent_products_limit_is_configurable(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let policy = StatePolicy::default().with_recent_products_limit(5);
    let manager = UserStateManager::with_settings(db.connect().await, Config::default(), policy).start();
    let user = key("mall001", "user001");

    let mut last = UserState::default();
    for id in ["a", "b", "c", "d", "e", "f"] {
        last = manager
            .send(UserCommand::new(user.clone(), view(id)))
            .await
            .unwrap()
            .unwrap();
    }

    assert_eq!(product_ids(&last), ["f", "e", "d", "c", "b"]);
}

#[rstest]
#[actix::test]
async fn ids_that_join_to_the_same_string_never_share_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let left = key("a-b", "c");
    let right = key("a", "b-c");

    manager
        .send(UserCommand::new(left.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    manager
        .send(UserCommand::new(right.clone(), view("p9")))
        .await
        .unwrap()
        .unwrap();

    let (left_revision, left_state) = committed(&db, &left).await;
    let (right_revision, right_state) = committed(&db, &right).await;
    assert_eq!((left_revision, right_revision), (Revision(1), Revision(1)));
    assert!(left_state.last_login.is_some() && left_state.recent_products.is_empty());
    assert!(right_state.last_login.is_none() && product_ids(&right_state) == ["p9"]);
}

#[rstest]
#[actix::test]
async fn a_stand_alone_actor_serves_one_user_as_in_the_original_example(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let clock = ManualClock::new(t0());
    let user = key("mall001", "user001");
    let actor = UserStateActor::new(user.clone(), db.connect().await, Config::default().with_clock(clock)).start();

    actor.send(Command::UserLogin).await.unwrap().unwrap();
    actor.send(view("product123")).await.unwrap().unwrap();
    actor.send(Command::UseCart).await.unwrap().unwrap();
    actor
        .send(Command::SetMarketingOptIn { opt_in: true })
        .await
        .unwrap()
        .unwrap();
    let state = actor.send(Command::GetUserState).await.unwrap().unwrap();

    assert_eq!(state.last_login, Some(t0()));
    assert_eq!(state.last_cart_use, Some(t0()));
    assert_eq!(product_ids(&state), ["product123"]);
    assert!(state.marketing_opt_in);
    assert_eq!(committed(&db, &user).await, (Revision(4), state));
}

#[rstest]
#[actix::test]
async fn a_corrupt_row_fails_only_that_users_commands_naming_the_user(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let broken = key("mall001", "broken");
    let healthy = key("mall001", "healthy");
    manager
        .send(UserCommand::new(broken.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    db.corrupt_row(&broken);

    // A new manager (as after a restart) has to restore the corrupt row.
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let error = manager
        .send(UserCommand::new(broken.clone(), Command::UseCart))
        .await
        .unwrap()
        .unwrap_err();

    assert!(matches!(error, CommandError::CorruptState { .. }), "{error:?}");
    assert_eq!(error.key(), &broken);
    assert!(error.to_string().contains("mall001-broken"), "{error}");
    assert!(!error.is_retryable());
    let other = manager
        .send(UserCommand::new(healthy, Command::UserLogin))
        .await
        .unwrap();
    assert!(other.is_ok(), "another user is unaffected: {other:?}");
}
