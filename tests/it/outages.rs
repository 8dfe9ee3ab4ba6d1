//! A database that stops answering: commands fail with a typed error, the
//! manager stays up, the state is never reported ahead of the database, and
//! service resumes by itself when the database is back.

use crate::common::{key, view, Backend, TestDb};
use actix::Actor;
use persist_durable::{
    Command, CommandError, Config, GetManagerStats, MemoryStore, ProductId, Revision, StateStoreExt, UserCommand,
    UserStateManager,
};
use rstest::rstest;
use std::sync::Arc;

#[rstest]
#[actix::test]
async fn commands_fail_while_the_database_is_down_and_succeed_once_it_is_back(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let manager = UserStateManager::new(db.connect().await, Config::default()).start();
    let known = key("mall001", "known");
    let newcomer = key("mall001", "newcomer");
    manager
        .send(UserCommand::new(known.clone(), view("p1")))
        .await
        .unwrap()
        .unwrap();

    db.make_unavailable();
    let write = manager.send(UserCommand::new(known.clone(), view("p2"))).await.unwrap();
    let first_contact = manager
        .send(UserCommand::new(newcomer.clone(), Command::UserLogin))
        .await
        .unwrap();
    let stats = manager.send(GetManagerStats).await;

    assert!(
        matches!(&write, Err(CommandError::StoreUnavailable { key, .. }) if key == &known),
        "{write:?}"
    );
    assert!(
        matches!(&first_contact, Err(CommandError::StoreUnavailable { .. })),
        "{first_contact:?}"
    );
    assert!(write.unwrap_err().is_retryable());
    assert!(stats.is_ok(), "the manager is still up");

    db.make_available();
    let resumed = manager
        .send(UserCommand::new(known.clone(), view("p3")))
        .await
        .unwrap()
        .unwrap();
    let products: Vec<&str> = resumed.recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(products, ["p3", "p1"], "the failed write left no trace");
    manager
        .send(UserCommand::new(newcomer.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    let stored = db.connect().await.load(&known).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(2), resumed));
}

#[actix::test]
async fn a_failed_write_is_never_reported_as_state() {
    let store = Arc::new(MemoryStore::new());
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let user = key("mall001", "user001");
    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();

    store.set_unavailable(true);
    assert!(manager
        .send(UserCommand::new(
            user.clone(),
            Command::SetMarketingOptIn { opt_in: true }
        ))
        .await
        .unwrap()
        .is_err());
    assert!(manager
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .is_err());
    store.set_unavailable(false);

    let state = manager
        .send(UserCommand::new(user, Command::GetUserState))
        .await
        .unwrap()
        .unwrap();
    assert!(!state.marketing_opt_in, "the opt-in was never committed");
    assert!(state.last_login.is_some());
}

#[rstest]
#[actix::test]
async fn opening_a_store_on_a_database_that_is_down_is_a_typed_error(#[values(Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    db.make_unavailable();

    let error = db.try_connect().await.unwrap_err();

    assert!(
        matches!(error, persist_durable::StoreError::Unavailable(_)),
        "{error:?}"
    );
    db.make_available();
}
