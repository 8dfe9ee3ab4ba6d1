//! The shopping cart, the second entity type, on each database: every
//! command, the domain's refusal, passivation, conflicts between nodes,
//! redelivered events and JSON input.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{t0, Backend, TestDb};
use persist_durable::cart::{Cart, CartCommand, CartError, CartId};
use persist_durable::{
    CommandError, Config, Entities, EntityEvent, EventId, IdField, InvalidInput, ManualClock, Revision, SharedStore,
    StateStoreExt, MAX_ID_BYTES,
};
use rstest::rstest;

const MINUTE: Duration = Duration::from_secs(60);

fn cart_id(id: &str) -> CartId {
    CartId::new(id).unwrap()
}

fn add(sku: &str, quantity: u32) -> CartCommand {
    CartCommand::AddItem {
        sku: sku.into(),
        quantity,
    }
}

fn remove(sku: &str) -> CartCommand {
    CartCommand::RemoveItem { sku: sku.into() }
}

fn items(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(sku, n)| (sku.to_string(), *n)).collect()
}

/// A cart manager on a fresh store of `db`, and that store.
async fn start_carts(db: &TestDb, config: Config) -> (Entities<Cart>, SharedStore) {
    let store = db.connect().await;
    (Entities::<Cart>::start(store.clone(), config), store)
}

/// The committed revision of `cart`, `None` if it was never written.
async fn stored_revision(store: &SharedStore, cart: &CartId) -> Option<Revision> {
    store.load(cart).await.unwrap().map(|stored| stored.revision)
}

/// Lets the actors on this thread run until the manager reports `resident` carts.
async fn until_resident(carts: &Entities<Cart>, resident: usize) {
    for _ in 0..1_000 {
        if carts.stats().await.unwrap().resident_entities == resident {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the manager never had {resident} resident carts");
}

#[rstest]
#[actix::test]
async fn adding_an_item_stores_its_quantity_and_adding_it_again_sums_them(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");

    let first = carts.send(cart.clone(), add("p1", 2)).await.unwrap();
    carts.send(cart.clone(), add("p2", 1)).await.unwrap();
    let last = carts.send(cart.clone(), add("p1", 3)).await.unwrap();

    assert_eq!(first.items, items(&[("p1", 2)]));
    assert_eq!(last.items, items(&[("p1", 5), ("p2", 1)]), "p1's quantities are summed");
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(3), last));
}

#[rstest]
#[actix::test]
async fn removing_an_item_takes_every_unit_of_it_out(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("p1", 4)).await.unwrap();
    carts.send(cart.clone(), add("p2", 1)).await.unwrap();

    let after = carts.send(cart.clone(), remove("p1")).await.unwrap();

    assert_eq!(after.items, items(&[("p2", 1)]));
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(3), after));
}

#[rstest]
#[actix::test]
async fn clearing_empties_the_cart(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("p1", 4)).await.unwrap();
    carts.send(cart.clone(), add("p2", 1)).await.unwrap();

    let after = carts.send(cart.clone(), CartCommand::Clear).await.unwrap();

    assert!(after.items.is_empty(), "{after:?}");
    assert_eq!(after.checkouts, 0, "clearing is not an order");
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(3), after));
}

#[rstest]
#[actix::test]
async fn commands_that_change_nothing_write_nothing(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    let before = carts.send(cart.clone(), add("p1", 1)).await.unwrap();

    for command in [remove("absent"), CartCommand::GetCart] {
        let reply = carts.send(cart.clone(), command.clone()).await.unwrap();
        assert_eq!(reply, before, "{command:?} answers the current cart");
    }
    carts.send(cart.clone(), remove("p1")).await.unwrap();
    let emptied = carts.send(cart.clone(), CartCommand::Clear).await.unwrap();

    assert!(emptied.items.is_empty());
    assert_eq!(
        stored_revision(&store, &cart).await,
        Some(Revision(2)),
        "only the add and the remove of p1 were written"
    );
}

#[rstest]
#[actix::test]
async fn checkout_empties_the_cart_counts_the_order_and_records_when(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let clock = ManualClock::new(t0());
    let (carts, store) = start_carts(&db, Config::default().with_clock(clock.clone())).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("p1", 2)).await.unwrap();
    carts.send(cart.clone(), add("p2", 1)).await.unwrap();

    let first = carts.send(cart.clone(), CartCommand::Checkout).await.unwrap();
    clock.advance(chrono::Duration::minutes(10));
    carts.send(cart.clone(), add("p3", 1)).await.unwrap();
    let second = carts.send(cart.clone(), CartCommand::Checkout).await.unwrap();

    assert!(first.items.is_empty(), "{first:?}");
    assert_eq!((first.checkouts, first.last_checkout), (1, Some(t0())));
    assert!(second.items.is_empty(), "{second:?}");
    assert_eq!(
        (second.checkouts, second.last_checkout),
        (2, Some(t0() + chrono::Duration::minutes(10)))
    );
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(5), second));
}

#[rstest]
#[actix::test]
async fn checkout_of_an_empty_cart_is_refused_and_nothing_is_written(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");

    let never_filled = carts.send(cart.clone(), CartCommand::Checkout).await;
    assert!(
        matches!(&never_filled, Err(CommandError::Rejected { key, reason: CartError::EmptyCart }) if key == &cart),
        "{never_filled:?}"
    );
    assert_eq!(
        stored_revision(&store, &cart).await,
        None,
        "no row for a refused command"
    );

    carts.send(cart.clone(), add("p1", 1)).await.unwrap();
    carts.send(cart.clone(), CartCommand::Clear).await.unwrap();
    let emptied = carts.send(cart.clone(), CartCommand::Checkout).await;
    assert!(
        matches!(
            &emptied,
            Err(CommandError::Rejected {
                reason: CartError::EmptyCart,
                ..
            })
        ),
        "{emptied:?}"
    );
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(2), "the refusal wrote nothing");
    assert_eq!(stored.state.checkouts, 0, "and counted no order");
    assert!(!emptied.unwrap_err().is_retryable());

    // The cart keeps serving after a refusal.
    carts.send(cart.clone(), add("p2", 1)).await.unwrap();
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(3)));
}

#[rstest]
#[actix::test]
async fn adding_zero_units_is_refused_by_the_domain_and_nothing_is_written(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("p1", 1)).await.unwrap();

    let refused = carts.send(cart.clone(), add("p2", 0)).await;

    assert!(
        matches!(&refused, Err(CommandError::Rejected { reason: CartError::ZeroQuantity { sku }, .. }) if sku == "p2"),
        "{refused:?}"
    );
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(
        (stored.revision, stored.state.items),
        (Revision(1), items(&[("p1", 1)]))
    );
}

#[rstest]
#[actix::test]
async fn an_idle_cart_is_passivated_after_30_minutes_and_restored_with_its_state_and_revision(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let clock = ManualClock::new(t0());
    // Paused time is per runtime: the cart actors must run on the test's own.
    let (carts, store) = start_carts(&db, Config::default().with_clock(clock).with_arbiters(0)).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("p1", 2)).await.unwrap();
    carts.send(cart.clone(), CartCommand::Checkout).await.unwrap();
    let before = carts.send(cart.clone(), add("p2", 3)).await.unwrap();

    tokio::time::advance(29 * MINUTE).await;
    assert_eq!(
        carts.stats().await.unwrap().resident_entities,
        1,
        "still resident after 29 idle minutes"
    );
    tokio::time::advance(6 * MINUTE).await;
    until_resident(&carts, 0).await;
    assert_eq!(carts.stats().await.unwrap().passivations, 1);

    let restored = carts.send(cart.clone(), CartCommand::GetCart).await.unwrap();
    assert_eq!(restored, before, "items, checkouts and the checkout time come back");
    assert_eq!(restored.last_checkout, Some(t0()));
    let stats = carts.stats().await.unwrap();
    assert_eq!(
        (stats.resident_entities, stats.activations),
        (1, 2),
        "restored by a new actor"
    );

    let next = carts.send(cart.clone(), add("p3", 1)).await.unwrap();
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(
        (stored.revision, stored.state),
        (Revision(4), next),
        "the restored actor writes on from revision 3"
    );
    assert_eq!(
        store.stats().conflicts,
        0,
        "it knew the stored revision, no conflict to recover from"
    );
}

#[rstest]
#[actix::test]
async fn two_managers_writing_one_cart_both_succeed_by_applying_again_after_a_conflict(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (node_a, store_a) = start_carts(&db, Config::default()).await;
    let (node_b, store_b) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    // Both nodes have restored the empty cart at revision 0.
    node_a.send(cart.clone(), CartCommand::GetCart).await.unwrap();
    node_b.send(cart.clone(), CartCommand::GetCart).await.unwrap();

    let from_a = node_a.send(cart.clone(), add("p1", 1)).await;
    let from_b = node_b.send(cart.clone(), add("p2", 2)).await;

    assert_eq!(from_a.unwrap().items, items(&[("p1", 1)]));
    assert_eq!(
        from_b.unwrap().items,
        items(&[("p1", 1), ("p2", 2)]),
        "b's add was applied on top of a's"
    );
    assert_eq!(store_b.stats().conflicts, 1, "b's first write was refused as stale");
    let stored = store_a.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(2), "one revision per add");
    assert_eq!(
        stored.state.items,
        items(&[("p1", 1), ("p2", 2)]),
        "neither add was lost"
    );
}

#[rstest]
#[actix::test]
async fn a_checkout_applied_again_after_a_conflict_is_refused_when_the_other_node_emptied_the_cart(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (node_a, store_a) = start_carts(&db, Config::default()).await;
    let (node_b, _) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    node_a.send(cart.clone(), add("p1", 1)).await.unwrap();
    // Both nodes hold the cart with p1 in it at revision 1.
    node_b.send(cart.clone(), CartCommand::GetCart).await.unwrap();
    node_b.send(cart.clone(), CartCommand::Clear).await.unwrap();

    // a's checkout is written from revision 1, conflicts, and is applied
    // again to the emptied cart.
    let checkout = node_a.send(cart.clone(), CartCommand::Checkout).await;

    assert!(
        matches!(
            &checkout,
            Err(CommandError::Rejected {
                reason: CartError::EmptyCart,
                ..
            })
        ),
        "{checkout:?}"
    );
    assert_eq!(store_a.stats().conflicts, 1, "the checkout met the other node's write");
    let stored = store_a.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(2), "the refused checkout wrote nothing");
    assert_eq!(stored.state.checkouts, 0);
    // a now holds the stored cart and goes on from it.
    let after = node_a.send(cart.clone(), add("p2", 1)).await.unwrap();
    assert_eq!(after.items, items(&[("p2", 1)]));
    assert_eq!(stored_revision(&store_a, &cart).await, Some(Revision(3)));
}

#[rstest]
#[actix::test]
async fn a_refusal_is_decided_on_the_stored_cart_not_on_a_stale_copy(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (node_a, store) = start_carts(&db, Config::default()).await;
    let (node_b, _) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    // a holds the empty cart; b then puts an item in it.
    node_a.send(cart.clone(), CartCommand::GetCart).await.unwrap();
    node_b.send(cart.clone(), add("p1", 1)).await.unwrap();

    let checkout = node_a.send(cart.clone(), CartCommand::Checkout).await;

    let ordered = checkout.expect("the stored cart has p1 in it: the checkout must go through");
    assert_eq!((ordered.checkouts, ordered.items), (1, items(&[])));
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(2)));
    // Refused again on the stored (now empty) cart: that refusal is final.
    let again = node_a.send(cart.clone(), CartCommand::Checkout).await;
    assert!(
        matches!(
            &again,
            Err(CommandError::Rejected {
                reason: CartError::EmptyCart,
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(2)));
}

/// A refusal waits for the commands queued before it: decided on a state
/// that never committed, it used to be answered `EmptyCart` while the stored
/// cart still held the item.
#[rstest]
#[actix::test]
async fn a_refusal_is_answered_only_once_the_commands_before_it_have_committed(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    carts.send(cart.clone(), add("a", 1)).await.unwrap();

    db.make_unavailable();
    let (removed, checkout) = tokio::join!(
        carts.send(cart.clone(), remove("a")),
        carts.send(cart.clone(), CartCommand::Checkout),
    );
    db.make_available();

    assert!(removed.is_err(), "the removal was not committed: {removed:?}");
    assert!(
        !matches!(checkout, Err(CommandError::Rejected { .. })),
        "not refused on a state that never existed: {checkout:?}"
    );
    assert!(checkout.unwrap_err().is_retryable());
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored.state.items, items(&[("a", 1)]), "the stored cart still holds it");
    assert_eq!(
        carts.send(cart.clone(), CartCommand::Checkout).await.unwrap().checkouts,
        1
    );
}

#[rstest]
#[actix::test]
async fn two_managers_adding_to_one_cart_concurrently_lose_no_unit(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (node_a, store) = start_carts(&db, Config::default()).await;
    let (node_b, _) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");

    let requests: Vec<_> = (0..30)
        .map(|i| {
            let node = if i % 3 == 0 { &node_b } else { &node_a };
            node.send(cart.clone(), add(&format!("p{}", i % 4), 1))
        })
        .collect();
    let replies = futures_util::future::join_all(requests).await;

    assert!(
        replies.iter().all(Result::is_ok),
        "no conflict reaches the caller: {replies:?}"
    );
    let stored = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(30), "every add applied exactly once");
    assert_eq!(stored.state.items, items(&[("p0", 8), ("p1", 8), ("p2", 7), ("p3", 7)]));
}

#[rstest]
#[actix::test]
async fn a_redelivered_event_is_applied_once(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");
    let event = EntityEvent::from(add("p1", 2)).with_id(EventId::new("e1").unwrap());

    let first = carts.send(cart.clone(), event.clone()).await.unwrap();
    let again = carts.send(cart.clone(), event.clone()).await.unwrap();

    assert_eq!(first.items, items(&[("p1", 2)]));
    assert_eq!(again, first, "the redelivery is acknowledged with the current cart");
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(1)));

    // The event id is stored with the cart: another process recognises it too.
    let (elsewhere, _) = start_carts(&db, Config::default()).await;
    let redelivered = elsewhere.send(cart.clone(), event).await.unwrap();
    assert_eq!(redelivered.items, items(&[("p1", 2)]));
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(1)));

    let another = EntityEvent::from(add("p1", 2)).with_id(EventId::new("e2").unwrap());
    let added = elsewhere.send(cart.clone(), another).await.unwrap();
    assert_eq!(added.items, items(&[("p1", 4)]), "a new event id is applied");
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(2)));
}

#[rstest]
#[actix::test]
async fn a_command_decoded_from_json_is_applied(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (carts, store) = start_carts(&db, Config::default()).await;
    let cart = cart_id("cart-1");

    let command = CartCommand::from_json(r#"{"type":"add_item","sku":"p1","quantity":3}"#).unwrap();
    let after = carts.send(cart.clone(), command).await.unwrap();

    assert_eq!(after.items, items(&[("p1", 3)]));
    assert_eq!(stored_revision(&store, &cart).await, Some(Revision(1)));
}

#[test]
fn json_commands_with_bad_input_are_rejected_with_typed_errors() {
    let malformed = [
        ("not json", "not JSON at all"),
        (r#"{"type":"add_item","sku":"p1","quantity":0}"#, "a zero quantity"),
        (r#"{"type":"add_item","sku":"p1","quantity":-1}"#, "a negative quantity"),
        (
            r#"{"type":"add_item","sku":"p1","quantity":"2"}"#,
            "a quantity as a string",
        ),
        (r#"{"type":"add_item","sku":"p1"}"#, "a missing quantity"),
        (r#"{"type":"add_item","quantity":1}"#, "a missing sku"),
        (
            r#"{"type":"add_item","sku":"p1","quantity":1,"price":9}"#,
            "an unknown field",
        ),
        (r#"{"type":"pay_later"}"#, "an unknown type"),
        (r#"{"sku":"p1","quantity":1}"#, "no type"),
    ];
    for (json, what) in malformed {
        let result = CartCommand::from_json(json);
        assert!(
            matches!(result, Err(InvalidInput::MalformedCommand { .. })),
            "{what}: {json} gave {result:?}"
        );
    }
    let zero = CartCommand::from_json(r#"{"type":"add_item","sku":"p1","quantity":0}"#).unwrap_err();
    assert!(
        zero.to_string().contains("quantity"),
        "the error says what is wrong: {zero}"
    );

    let sku = IdField::Named("sku");
    assert_eq!(
        CartCommand::from_json(r#"{"type":"add_item","sku":"","quantity":1}"#),
        Err(InvalidInput::EmptyId { field: sku })
    );
    assert_eq!(
        CartCommand::from_json(r#"{"type":"remove_item","sku":""}"#),
        Err(InvalidInput::EmptyId { field: sku })
    );
    assert_eq!(
        CartCommand::from_json(r#"{"type":"add_item","sku":"p\n1","quantity":1}"#),
        Err(InvalidInput::ControlCharacter {
            field: sku,
            position: 1
        })
    );
    let long_sku = "p".repeat(MAX_ID_BYTES + 1);
    assert!(matches!(
        CartCommand::from_json(&format!(r#"{{"type":"add_item","sku":"{long_sku}","quantity":1}}"#)),
        Err(InvalidInput::IdTooLong { field, .. }) if field == sku
    ));
    let huge = format!(r#"{{"type":"remove_item","sku":"{}"}}"#, "p".repeat(20_000));
    assert!(matches!(
        CartCommand::from_json(&huge),
        Err(InvalidInput::CommandTooLarge { .. })
    ));
    assert_eq!(
        CartId::new(""),
        Err(InvalidInput::EmptyId {
            field: IdField::Named("cart id")
        })
    );
}
