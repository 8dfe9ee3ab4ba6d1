//! Two entity types in one database and one process: users and carts share a
//! store (and its change feed) but never a row, a revision or a feed entry.

use std::collections::BTreeMap;

use crate::common::{key, test_store_config, view, Backend, TestDb};
use persist_durable::cart::{Cart, CartCommand, CartId};
use persist_durable::{
    ChangeFeed, Command, Config, DurableEntity, Entities, EntityFeed, EntityKey, Revision, SharedStore, StateChange,
    StateStoreExt, UserKey, UserState, UserStates,
};
use rstest::rstest;

async fn feed_store(db: &TestDb) -> SharedStore {
    db.connect_with(test_store_config().with_change_feed(true)).await
}

fn add(sku: &str, quantity: u32) -> CartCommand {
    CartCommand::AddItem {
        sku: sku.into(),
        quantity,
    }
}

/// A user and a cart whose entity ids are the same string: only the entity
/// type in the persistence id tells their rows apart.
fn same_id() -> (UserKey, CartId) {
    let user = key("mall001", "user001");
    let cart = CartId::new("mall001-user001").unwrap();
    assert_eq!(
        user.entity_id(),
        cart.entity_id(),
        "the test needs colliding entity ids"
    );
    (user, cart)
}

/// Every change of `E` in the feed, from the beginning.
async fn read_all<E: DurableEntity>(store: &SharedStore) -> Vec<StateChange<E>> {
    let mut feed = EntityFeed::<E>::from_position(store.clone(), 0).with_batch_size(3);
    let mut all = Vec::new();
    loop {
        let batch = feed.next_batch().await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Fails the test unless the SQL boolean expression `condition` holds on the
/// database, read outside the library.
fn assert_sql(db: &TestDb, condition: &str) {
    let check = format!(
        "CREATE TEMP TABLE assertion (holds BOOLEAN NOT NULL CHECK (holds)); \
         INSERT INTO assertion (holds) SELECT {condition}; DROP TABLE assertion;"
    );
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.execute(&check)));
    assert!(outcome.is_ok(), "does not hold on the database: {condition}");
}

/// What the interleaved commands answered, per type, in the order sent.
struct Replies {
    users: Vec<UserState>,
    carts: Vec<Cart>,
}

/// Commands for the user and the cart, interleaved: the user changes 3
/// times, the cart 4 times, in the order U C U C C U C, and each is read once.
async fn interleave(users: &UserStates, carts: &Entities<Cart>, user: &UserKey, cart: &CartId) -> Replies {
    let mut replies = Replies {
        users: Vec::new(),
        carts: Vec::new(),
    };
    replies
        .users
        .push(users.send(user.clone(), Command::UserLogin).await.unwrap());
    replies
        .carts
        .push(carts.send(cart.clone(), add("p1", 2)).await.unwrap());
    replies.users.push(users.send(user.clone(), view("p1")).await.unwrap());
    replies
        .carts
        .push(carts.send(cart.clone(), add("p2", 1)).await.unwrap());
    let removed = CartCommand::RemoveItem { sku: "p1".into() };
    replies.carts.push(carts.send(cart.clone(), removed).await.unwrap());
    replies.users.push(users.send(user.clone(), view("p2")).await.unwrap());
    replies
        .carts
        .push(carts.send(cart.clone(), CartCommand::Checkout).await.unwrap());
    // Reads change nothing for either type.
    assert_eq!(
        &users.send(user.clone(), Command::GetUserState).await.unwrap(),
        replies.users.last().unwrap()
    );
    assert_eq!(
        &carts.send(cart.clone(), CartCommand::GetCart).await.unwrap(),
        replies.carts.last().unwrap()
    );
    replies
}

#[rstest]
#[actix::test]
async fn a_user_and_a_cart_with_the_same_id_keep_separate_states_and_revisions(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());
    let (user, cart) = same_id();

    let replies = interleave(&users, &carts, &user, &cart).await;

    let stored_user = store.load(&user).await.unwrap().unwrap();
    assert_eq!(stored_user.revision, Revision(3), "three user changes");
    assert_eq!(&stored_user.state, replies.users.last().unwrap());
    let stored_cart = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored_cart.revision, Revision(4), "four cart changes");
    assert_eq!(&stored_cart.state, replies.carts.last().unwrap());
    assert_eq!(stored_cart.state.checkouts, 1);
    assert!(
        stored_user.state.last_login.is_some(),
        "the cart's writes left the user's row alone"
    );
}

#[rstest]
#[actix::test]
async fn each_type_has_its_own_row_tagged_with_its_entity_type(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());
    let (user, cart) = same_id();

    interleave(&users, &carts, &user, &cart).await;

    assert_eq!(user.persistence_id().as_str(), "UserState|mall001-user001");
    assert_eq!(cart.persistence_id().as_str(), "Cart|mall001-user001");
    assert_sql(&db, "(SELECT count(*) FROM durable_state) = 2");
    assert_sql(
        &db,
        "(SELECT entity_type FROM durable_state WHERE persistence_id = 'UserState|mall001-user001') = 'UserState'",
    );
    assert_sql(
        &db,
        "(SELECT state_ser_manifest FROM durable_state WHERE persistence_id = 'UserState|mall001-user001') \
         = 'UserState/v1'",
    );
    assert_sql(
        &db,
        "(SELECT revision FROM durable_state WHERE entity_type = 'UserState') = 3",
    );
    assert_sql(
        &db,
        "(SELECT entity_type FROM durable_state WHERE persistence_id = 'Cart|mall001-user001') = 'Cart'",
    );
    assert_sql(
        &db,
        "(SELECT state_ser_manifest FROM durable_state WHERE persistence_id = 'Cart|mall001-user001') = 'Cart/v1'",
    );
    assert_sql(
        &db,
        "(SELECT revision FROM durable_state WHERE entity_type = 'Cart') = 4",
    );
    // The feed's rows are tagged the same way.
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes \
          WHERE entity_type = 'UserState' AND persistence_id = 'UserState|mall001-user001') = 3",
    );
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes WHERE entity_type = 'Cart' AND persistence_id = 'Cart|mall001-user001') \
         = 4",
    );
    assert_sql(&db, "(SELECT count(*) FROM state_changes) = 7");
}

#[rstest]
#[actix::test]
async fn each_types_feed_carries_only_its_own_changes_typed_in_global_position_order(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());
    let (user, cart) = same_id();

    let replies = interleave(&users, &carts, &user, &cart).await;

    let cart_changes: Vec<StateChange<Cart>> = read_all::<Cart>(&store).await;
    let cart_keys: Vec<&CartId> = cart_changes.iter().map(|c| &c.key).collect();
    assert_eq!(cart_keys, [&cart; 4], "only the cart's changes, keyed by its CartId");
    let cart_revisions: Vec<Revision> = cart_changes.iter().map(|c| c.revision).collect();
    assert_eq!(cart_revisions, [Revision(1), Revision(2), Revision(3), Revision(4)]);
    let cart_states: Vec<&Cart> = cart_changes.iter().map(|c| &c.state).collect();
    assert_eq!(
        cart_states,
        replies.carts.iter().collect::<Vec<_>>(),
        "each acknowledged cart"
    );

    let mut user_feed = ChangeFeed::from_position(store.clone(), 0);
    let user_changes: Vec<StateChange<UserState>> = user_feed.next_batch().await.unwrap();
    assert!(user_feed.next_batch().await.unwrap().is_empty());
    let user_keys: Vec<&UserKey> = user_changes.iter().map(|c| &c.key).collect();
    assert_eq!(user_keys, [&user; 3], "only the user's changes, keyed by its UserKey");
    let user_revisions: Vec<Revision> = user_changes.iter().map(|c| c.revision).collect();
    assert_eq!(user_revisions, [Revision(1), Revision(2), Revision(3)]);
    let user_states: Vec<&UserState> = user_changes.iter().map(|c| &c.state).collect();
    assert_eq!(
        user_states,
        replies.users.iter().collect::<Vec<_>>(),
        "each acknowledged user state"
    );

    // Positions are one order across types: the order the commands were sent.
    let user_positions: Vec<u64> = user_changes.iter().map(|c| c.position).collect();
    let cart_positions: Vec<u64> = cart_changes.iter().map(|c| c.position).collect();
    assert_eq!(user_positions, [1, 3, 6]);
    assert_eq!(cart_positions, [2, 4, 5, 7]);

    // A feed resumed from a position passes over the other type's changes.
    let mut carts_after_4 = EntityFeed::<Cart>::from_position(store.clone(), 4);
    let rest: Vec<u64> = carts_after_4
        .next_batch()
        .await
        .unwrap()
        .iter()
        .map(|c| c.position)
        .collect();
    assert_eq!(rest, [5, 7]);
    assert_eq!(carts_after_4.position(), 7);
}

#[rstest]
#[actix::test]
async fn concurrent_commands_for_users_and_carts_each_get_every_revision_in_their_own_feed(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = feed_store(&db).await;
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());
    let keys: Vec<(UserKey, CartId)> = (0..3)
        .map(|i| {
            let user = key("mall001", &format!("user{i}"));
            let cart = CartId::new(user.entity_id()).unwrap();
            (user, cart)
        })
        .collect();

    // 20 commands per user and per cart, all sent at once.
    let mut user_requests = Vec::new();
    let mut cart_requests = Vec::new();
    for i in 0..60 {
        let (user, cart) = &keys[i % 3];
        user_requests.push(users.send(user.clone(), view(&format!("p{i}"))));
        cart_requests.push(carts.send(cart.clone(), add(&format!("p{i}"), 1)));
    }
    let (user_replies, cart_replies) = futures_util::future::join(
        futures_util::future::join_all(user_requests),
        futures_util::future::join_all(cart_requests),
    )
    .await;
    assert!(user_replies.iter().all(Result::is_ok), "{user_replies:?}");
    assert!(cart_replies.iter().all(Result::is_ok), "{cart_replies:?}");

    let user_changes = read_all::<UserState>(&store).await;
    let cart_changes = read_all::<Cart>(&store).await;
    assert_eq!((user_changes.len(), cart_changes.len()), (60, 60));
    let mut positions: Vec<u64> = user_changes
        .iter()
        .map(|c| c.position)
        .chain(cart_changes.iter().map(|c| c.position))
        .collect();
    positions.sort_unstable();
    assert_eq!(
        positions,
        (1..=120).collect::<Vec<u64>>(),
        "one gapless order shared by both types"
    );
    for (user, cart) in &keys {
        let revisions: Vec<u64> = user_changes
            .iter()
            .filter(|c| &c.key == user)
            .map(|c| c.revision.0)
            .collect();
        assert_eq!(
            revisions,
            (1..=20).collect::<Vec<u64>>(),
            "{user}: every revision, in order"
        );
        let revisions: Vec<u64> = cart_changes
            .iter()
            .filter(|c| &c.key == cart)
            .map(|c| c.revision.0)
            .collect();
        assert_eq!(
            revisions,
            (1..=20).collect::<Vec<u64>>(),
            "{cart}: every revision, in order"
        );
        assert_eq!(store.load(user).await.unwrap().unwrap().revision, Revision(20));
        let stored_cart = store.load(cart).await.unwrap().unwrap();
        assert_eq!(stored_cart.revision, Revision(20));
        assert_eq!(stored_cart.state.items.len(), 20, "{cart}: each add kept");
    }
}

#[rstest]
#[actix::test]
async fn users_and_carts_come_back_with_their_own_states_in_a_new_process(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (user, cart) = same_id();
    let replies = {
        let store = feed_store(&db).await;
        let users = UserStates::start(store.clone(), Config::default());
        let carts = Entities::<Cart>::start(store, Config::default());
        interleave(&users, &carts, &user, &cart).await
    };

    let store = feed_store(&db).await;
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());

    let restored_user = users.send(user.clone(), Command::GetUserState).await.unwrap();
    let restored_cart = carts.send(cart.clone(), CartCommand::GetCart).await.unwrap();
    assert_eq!(&restored_user, replies.users.last().unwrap());
    assert_eq!(&restored_cart, replies.carts.last().unwrap());
    users.send(user.clone(), Command::UseCart).await.unwrap();
    carts.send(cart.clone(), add("p9", 1)).await.unwrap();
    let revisions = BTreeMap::from([
        ("user", store.load(&user).await.unwrap().unwrap().revision),
        ("cart", store.load(&cart).await.unwrap().unwrap().revision),
    ]);
    assert_eq!(
        revisions,
        BTreeMap::from([("user", Revision(4)), ("cart", Revision(5))]),
        "each type goes on from its own revision"
    );
}
