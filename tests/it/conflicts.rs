//! Revision-checked writes: two writers from the same revision, one wins,
//! nothing is silently overwritten, and the loser recovers.

use crate::common::{key, view, Backend, TestDb};
use actix::Actor;
use persist_durable::{
    Command, CommandError, Config, ProductId, Revision, StateStoreExt, StoreError, UserCommand, UserState,
    UserStateActor, UserStateManager,
};
use rstest::rstest;

#[rstest]
#[actix::test]
async fn a_store_write_from_a_stale_revision_is_a_conflict_and_changes_nothing(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let user = key("mall001", "user001");
    let first = UserState {
        marketing_opt_in: true,
        ..UserState::default()
    };
    assert_eq!(
        store.write(&user, Revision::NONE, Revision(1), &first).await.unwrap(),
        Revision(1)
    );

    let again_from_none = store
        .write(&user, Revision::NONE, Revision(1), &UserState::default())
        .await;
    let from_the_future = store
        .write(&user, Revision(5), Revision(6), &UserState::default())
        .await;

    assert!(matches!(
        again_from_none,
        Err(StoreError::Conflict {
            expected: Revision::NONE,
            ..
        })
    ));
    assert!(matches!(
        from_the_future,
        Err(StoreError::Conflict {
            expected: Revision(5),
            ..
        })
    ));
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(1), first));
}

#[rstest]
#[actix::test]
async fn two_actors_writing_from_the_same_revision_one_wins_and_the_loser_recovers(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let user = key("mall001", "user001");
    let report_conflicts = Config::default().with_conflict_retries(0);
    let winner = UserStateActor::new(user.clone(), db.connect().await, report_conflicts.clone()).start();
    let loser = UserStateActor::new(user.clone(), db.connect().await, report_conflicts).start();
    // Both have restored revision 0.
    winner.send(Command::GetUserState).await.unwrap().unwrap();
    loser.send(Command::GetUserState).await.unwrap().unwrap();

    winner.send(Command::UserLogin).await.unwrap().unwrap();
    let conflict = loser.send(view("p1")).await.unwrap().unwrap_err();

    assert!(
        matches!(&conflict, CommandError::Conflict { key, expected: Revision::NONE } if key == &user),
        "{conflict:?}"
    );
    let stored = db.connect().await.load(&user).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(1));
    assert!(stored.state.last_login.is_some(), "the winner's write stands");
    assert!(
        stored.state.recent_products.is_empty(),
        "the loser's write was not applied"
    );

    let recovered = loser.send(view("p1")).await.unwrap().unwrap();
    assert!(recovered.last_login.is_some(), "applied on top of the reloaded state");
    assert_eq!(recovered.recent_products, [ProductId::new("p1").unwrap()]);
    let stored = db.connect().await.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(2), recovered));
}

#[rstest]
#[actix::test]
async fn two_managers_on_one_database_never_overwrite_each_other(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let user = key("mall001", "user001");
    let report_conflicts = Config::default().with_conflict_retries(0);
    let node_a = UserStateManager::new(db.connect().await, report_conflicts.clone()).start();
    let node_b = UserStateManager::new(db.connect().await, report_conflicts).start();
    node_a
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .unwrap();
    node_b
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .unwrap();

    // Alternate the two nodes: every write after the first one on the other
    // node starts from a stale revision.
    let mut acknowledged = 0;
    let mut conflicts = 0;
    for i in 0..10 {
        let node = if i % 2 == 0 { &node_a } else { &node_b };
        for _attempt in 0..2 {
            match node
                .send(UserCommand::new(user.clone(), view(&format!("p{i}"))))
                .await
                .unwrap()
            {
                Ok(_) => {
                    acknowledged += 1;
                    break;
                }
                Err(CommandError::Conflict { .. }) => conflicts += 1,
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
    }

    assert_eq!(acknowledged, 10, "every command succeeds on its retry");
    assert!(conflicts >= 8, "stale writes were detected, not applied: {conflicts}");
    let stored = db.connect().await.load(&user).await.unwrap().unwrap();
    assert_eq!(
        stored.revision,
        Revision(acknowledged),
        "one revision per acknowledged command"
    );
    let products: Vec<&str> = stored.state.recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(products, ["p9", "p8", "p7"], "no acknowledged write was lost");
}

#[rstest]
#[actix::test]
async fn by_default_a_conflicting_write_is_reloaded_and_applied_again_without_an_error(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let user = key("mall001", "user001");
    let node_a = UserStateManager::new(db.connect().await, Config::default()).start();
    let node_b = UserStateManager::new(db.connect().await, Config::default()).start();

    // Both nodes get commands for the same user, interleaved and concurrent.
    let mut requests = Vec::new();
    for i in 0..40 {
        let node = if i % 3 == 0 { &node_b } else { &node_a };
        requests.push(node.send(UserCommand::new(user.clone(), view(&format!("p{i}")))));
    }
    let mut acknowledged = 0;
    for request in requests {
        request.await.unwrap().expect("no conflict reaches the caller");
        acknowledged += 1;
    }

    let stored = db.connect().await.load(&user).await.unwrap().unwrap();
    assert_eq!(
        stored.revision,
        Revision(acknowledged),
        "every acknowledged command applied exactly once"
    );
}
