//! Group commit and bulk restore: many users share statements, a busy user
//! shares rows, and a conflict fails only its own command.

use std::time::Duration;

use crate::common::{key, test_store_config, view, Backend, TestDb};
use actix::Actor;
use persist_durable::{
    Command, CommandError, Config, ProductId, Revision, StateStore, StateStoreExt, StoreError, UserCommand, UserKey,
    UserState, UserStateManager,
};
use rstest::rstest;

fn users(n: usize) -> Vec<UserKey> {
    (0..n).map(|i| key("mall001", &format!("user{i}"))).collect()
}

#[rstest]
#[actix::test]
async fn commands_for_many_users_share_write_statements(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let users = users(200);

    let requests: Vec<_> = users
        .iter()
        .map(|user| manager.send(UserCommand::new(user.clone(), Command::UserLogin)))
        .collect();
    for request in requests {
        request.await.unwrap().unwrap();
    }

    let stats = store.stats();
    assert_eq!(stats.rows_written, 200, "{stats:?}");
    assert!(
        stats.write_statements <= 100,
        "at least two rows per statement on average: {stats:?}"
    );
    for user in &users {
        let stored = store.load(user).await.unwrap().unwrap();
        assert_eq!(stored.revision, Revision(1));
        assert!(stored.state.last_login.is_some());
    }
}

#[rstest]
#[actix::test]
async fn commands_for_one_busy_user_share_a_row_write_and_each_counts_as_a_revision(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let user = key("mall001", "busy");

    let requests: Vec<_> = (0..30)
        .map(|i| manager.send(UserCommand::new(user.clone(), view(&format!("p{i}")))))
        .collect();
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.unwrap().unwrap());
    }

    let first_products: Vec<&str> = replies[0].recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(
        first_products,
        ["p0"],
        "each reply is the state right after its own command"
    );
    let stats = store.stats();
    assert!(stats.rows_written < 30, "commands were coalesced: {stats:?}");
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(30), "one revision per command");
    assert_eq!(Some(&stored.state), replies.last());
}

#[rstest]
#[actix::test]
async fn a_conflict_in_a_batch_fails_only_its_own_row(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    // A long batch window so that both writes surely share one statement.
    let store = db
        .connect_with(test_store_config().with_max_batch_wait(Duration::from_millis(200)))
        .await;
    let (fresh, stale) = (key("mall001", "fresh"), key("mall001", "stale"));
    store
        .write(&stale, Revision::NONE, Revision(1), &UserState::default())
        .await
        .unwrap();
    let before = store.stats().write_statements;

    let empty = UserState::default();
    let (fresh_write, stale_write) = tokio::join!(
        store.write(&fresh, Revision::NONE, Revision(1), &empty),
        store.write(&stale, Revision::NONE, Revision(1), &empty),
    );

    assert_eq!(store.stats().write_statements - before, 1, "one statement for both");
    assert_eq!(fresh_write.unwrap(), Revision(1));
    assert!(matches!(stale_write, Err(StoreError::Conflict { ref key, .. }) if key == &stale));
}

#[rstest]
#[actix::test]
async fn users_activated_together_are_restored_in_bulk(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let users = users(300);
    {
        let manager = UserStateManager::new(db.connect().await, Config::default()).start();
        let requests: Vec<_> = users
            .iter()
            .map(|user| manager.send(UserCommand::new(user.clone(), Command::UseCart)))
            .collect();
        for request in requests {
            request.await.unwrap().unwrap();
        }
    }

    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let requests: Vec<_> = users
        .iter()
        .map(|user| manager.send(UserCommand::new(user.clone(), Command::GetUserState)))
        .collect();
    for request in requests {
        assert!(request.await.unwrap().unwrap().last_cart_use.is_some());
    }

    let stats = store.stats();
    assert_eq!(stats.entities_loaded, 300, "{stats:?}");
    assert!(
        stats.load_statements <= 30,
        "at least ten users per restore query on average: {stats:?}"
    );
}

#[actix::test]
async fn a_conflicting_write_is_applied_again_on_the_reloaded_state() {
    let store = std::sync::Arc::new(persist_durable::MemoryStore::new());
    let manager = UserStateManager::new(store.clone(), Config::default().with_arbiters(0)).start();
    let user = key("mall001", "user001");
    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    // Another writer moves the row on behind the actor's back.
    let stored = store.load(&user).await.unwrap().unwrap();
    store
        .write(&user, stored.revision, Revision(2), &UserState::default())
        .await
        .unwrap();

    let reapplied = manager
        .send(UserCommand::new(user.clone(), view("p1")))
        .await
        .unwrap()
        .unwrap();

    assert!(
        reapplied.last_login.is_none(),
        "applied on the other writer's state, reloaded"
    );
    assert_eq!(reapplied.recent_products, [ProductId::new("p1").unwrap()]);
    assert_eq!(store.stats().conflicts, 1, "the first attempt did conflict");
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(3));
}

#[actix::test]
async fn a_conflict_is_reported_once_the_retries_are_used_up() {
    let store = std::sync::Arc::new(persist_durable::MemoryStore::new());
    let config = Config::default().with_arbiters(0).with_conflict_retries(0);
    let manager = UserStateManager::new(store.clone(), config).start();
    let user = key("mall001", "user001");
    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    let stored = store.load(&user).await.unwrap().unwrap();
    store
        .write(&user, stored.revision, Revision(2), &UserState::default())
        .await
        .unwrap();

    let conflicted = manager.send(UserCommand::new(user.clone(), view("p1"))).await.unwrap();
    let next = manager
        .send(UserCommand::new(user.clone(), view("p2")))
        .await
        .unwrap()
        .unwrap();

    assert!(
        matches!(conflicted, Err(CommandError::Conflict { .. })),
        "{conflicted:?}"
    );
    assert!(
        next.last_login.is_none(),
        "the next command applies on the reloaded state"
    );
    assert_eq!(next.recent_products, [ProductId::new("p2").unwrap()]);
}

#[rstest]
#[actix::test]
async fn two_writes_for_one_user_in_one_batch_window_cannot_both_succeed(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db
        .connect_with(test_store_config().with_max_batch_wait(Duration::from_millis(200)))
        .await;
    let user = key("mall001", "contended");
    let (first, second) = (
        UserState {
            marketing_opt_in: true,
            ..UserState::default()
        },
        UserState::default(),
    );

    let (a, b) = tokio::join!(
        store.write(&user, Revision::NONE, Revision(1), &first),
        store.write(&user, Revision::NONE, Revision(1), &second),
    );

    let won: Vec<&UserState> = [(a.is_ok(), &first), (b.is_ok(), &second)]
        .into_iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, state)| state)
        .collect();
    assert_eq!(won.len(), 1, "exactly one wins: {a:?} {b:?}");
    assert!(matches!(a.err().or(b.err()), Some(StoreError::Conflict { .. })));
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(&stored.state, won[0], "the stored state is the winner's");
}
