//! Several nodes on one database, with the default settings: whatever node a
//! command reaches, nothing is answered from a state older than the store
//! held when the command arrived. A read, a redelivery, a no-op and a
//! refusal are checked against the stored revision first; a delete on one
//! node erases the data on every node. With `Config::with_exclusive_writer`
//! (one writer only) answers without a write come from memory.

use crate::common::{key, view, Backend, TestDb};
use persist_durable::cart::{Cart, CartCommand, CartError, CartId};
use persist_durable::{
    Command, CommandError, Config, Entities, Event, EventId, ProductId, Revision, StateStoreExt, UserStates,
};
use rstest::rstest;

fn products(state: &persist_durable::UserState) -> Vec<&str> {
    state.recent_products.iter().map(ProductId::as_str).collect()
}

/// Two nodes: two managers, each with a store of its own, on one database.
async fn two_nodes<E: persist_durable::DurableEntity>(db: &TestDb) -> (Entities<E>, Entities<E>) {
    let a = Entities::<E>::start(db.connect().await, Config::default());
    let b = Entities::<E>::start(db.connect().await, Config::default());
    (a, b)
}

#[rstest]
#[actix::test]
async fn a_read_on_another_node_answers_what_the_store_holds(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (a, b): (UserStates, UserStates) = two_nodes(&db).await;
    let user = key("mall001", "user001");
    b.send(user.clone(), Command::GetUserState).await.unwrap(); // resident on b

    a.send(user.clone(), Command::UserLogin).await.unwrap();
    a.send(user.clone(), view("p1")).await.unwrap();
    let read = b.send(user.clone(), Command::GetUserState).await.unwrap();

    assert!(read.last_login.is_some(), "b answers the login a acknowledged");
    assert_eq!(products(&read), ["p1"]);
}

#[rstest]
#[actix::test]
async fn after_a_delete_on_one_node_no_node_answers_with_the_erased_data(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (a, b): (UserStates, UserStates) = two_nodes(&db).await;
    let user = key("mall001", "user001");
    a.send(user.clone(), view("secret")).await.unwrap();
    assert_eq!(
        products(&b.send(user.clone(), Command::GetUserState).await.unwrap()),
        ["secret"]
    );

    a.send(user.clone(), Command::DeleteUser).await.unwrap();

    let read = b.send(user.clone(), Command::GetUserState).await.unwrap();
    assert!(read.recent_products.is_empty(), "b serves no erased data: {read:?}");
}

/// b applied an event itself, so it would recognise a redelivery of it in
/// memory and answer with the state it holds: the erased one, unless it
/// checks the store first.
#[rstest]
#[actix::test]
async fn after_a_delete_on_one_node_a_redelivery_on_another_is_answered_with_the_erased_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (a, b): (UserStates, UserStates) = two_nodes(&db).await;
    let user = key("mall001", "user001");
    let event = Event::from(view("secret")).with_id(EventId::new("e1").unwrap());
    b.send(user.clone(), event.clone()).await.unwrap();

    a.send(user.clone(), Command::DeleteUser).await.unwrap();
    let redelivered = b.send(user.clone(), event).await.unwrap();

    assert!(redelivered.recent_products.is_empty(), "{redelivered:?}");
}

/// Retention on a purges an idle row that b holds; the entity comes back
/// through a, at revision 1 again. Before, b's check and b's write both saw
/// the revision they expected: b answered from its pre-purge memory, and its
/// next write committed over a's acknowledged one. The row's generation
/// tells the two lives of the row apart.
#[rstest]
#[actix::test]
async fn a_purge_on_one_node_never_lets_another_lose_an_acknowledged_write(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(false, true)] exclusive_b: bool,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let retention = Config::default().with_retention(Some(std::time::Duration::from_secs(400 * 24 * 60 * 60)));
    let a = UserStates::start(db.connect().await, retention);
    let b_config = if exclusive_b {
        Config::default().with_exclusive_writer()
    } else {
        Config::default()
    };
    let b = UserStates::start(db.connect().await, b_config);
    let user = key("mall001", "user001");
    b.send(user.clone(), view("before-the-purge")).await.unwrap(); // revision 1, resident on b
    crate::common::age(&db, std::slice::from_ref(&user));
    assert_eq!(a.purge_idle().await.unwrap(), 1);

    let acknowledged = a.send(user.clone(), view("after-the-purge")).await.unwrap();
    assert_eq!(products(&acknowledged), ["after-the-purge"]);
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(1));

    if !exclusive_b {
        let read = b.send(user.clone(), Command::GetUserState).await.unwrap();
        assert_eq!(products(&read), ["after-the-purge"], "b answers what the store holds");
    }
    let written = b.send(user.clone(), view("on-b")).await.unwrap();
    assert_eq!(
        products(&written),
        ["on-b", "after-the-purge"],
        "applied over a's write"
    );
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(
        products(&stored.state),
        ["on-b", "after-the-purge"],
        "a's write was not lost"
    );
    assert_eq!(stored.revision, Revision(2));
}

#[rstest]
#[actix::test]
async fn a_no_op_on_a_stale_node_is_decided_on_the_stored_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let (a, b): (Entities<Cart>, Entities<Cart>) = two_nodes(&db).await;
    let cart = CartId::new("cart-1").unwrap();
    b.send(cart.clone(), CartCommand::GetCart).await.unwrap(); // resident on b, empty

    let add = CartCommand::AddItem {
        sku: "a".into(),
        quantity: 1,
    };
    a.send(cart.clone(), add).await.unwrap();
    // On b's stale (empty) cart this would change nothing and be dropped.
    let removed = b
        .send(cart.clone(), CartCommand::RemoveItem { sku: "a".into() })
        .await
        .unwrap();

    assert!(removed.items.is_empty(), "{removed:?}");
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert!(stored.state.items.is_empty(), "the removal is committed: {stored:?}");
    assert_eq!(stored.revision, Revision(2));
}

#[rstest]
#[actix::test]
async fn a_refusal_on_a_stale_node_is_decided_on_the_stored_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (a, b): (Entities<Cart>, Entities<Cart>) = two_nodes(&db).await;
    let cart = CartId::new("cart-1").unwrap();
    b.send(cart.clone(), CartCommand::GetCart).await.unwrap(); // resident on b, empty

    let add = CartCommand::AddItem {
        sku: "a".into(),
        quantity: 1,
    };
    a.send(cart.clone(), add).await.unwrap();
    let checkout = b.send(cart.clone(), CartCommand::Checkout).await;

    assert_eq!(checkout.unwrap().checkouts, 1, "not refused as empty");
    let empty = b.send(cart.clone(), CartCommand::Checkout).await;
    assert!(
        matches!(
            empty,
            Err(CommandError::Rejected {
                reason: CartError::EmptyCart,
                ..
            })
        ),
        "{empty:?}"
    );
}

#[rstest]
#[actix::test]
async fn an_exclusive_writer_answers_reads_from_memory(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let users = UserStates::start(store.clone(), Config::default().with_exclusive_writer());
    let user = key("mall001", "user001");
    users.send(user.clone(), view("p1")).await.unwrap();
    let loads = store.stats().load_statements;

    for _ in 0..5 {
        assert_eq!(
            products(&users.send(user.clone(), Command::GetUserState).await.unwrap()),
            ["p1"]
        );
    }

    assert_eq!(store.stats().load_statements, loads, "no read went to the store");
}

#[rstest]
#[actix::test]
async fn by_default_a_read_of_a_resident_entity_costs_one_batched_load(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall001", "user001");
    users.send(user.clone(), view("p1")).await.unwrap();
    let before = store.stats();

    let read = users.send(user.clone(), Command::GetUserState).await.unwrap();

    assert_eq!(products(&read), ["p1"]);
    let after = store.stats();
    assert_eq!(after.load_statements - before.load_statements, 1);
    assert_eq!(after.write_statements, before.write_statements, "a read writes nothing");
}
