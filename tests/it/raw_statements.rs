//! The statements the stores still write as raw SQL, because diesel's query
//! DSL cannot express them: PostgreSQL's batched, revision-checked write,
//! with and without the change feed insert (see src/store/postgres.rs). Each
//! runs on a fresh database through the public API, in one batch that
//! inserts new rows, updates a row at its expected revision, and refuses a
//! row at the wrong revision and a new row that already exists; the same
//! batch runs on SQLite (whose per-row statements are diesel DSL), so both
//! backends are held to the same results.

use std::time::Duration;

use crate::common::{key, test_store_config, Backend, TestDb};
use chrono::Utc;
use persist_durable::cart::{Cart, CartId};
use persist_durable::{
    ChangeFeed, EntityFeed, EntityKey, ProductId, Revision, SharedStore, StateStoreExt, StoreError, UserKey, UserState,
};
use rstest::rstest;

fn viewed(product: &str) -> UserState {
    UserState {
        recent_products: vec![ProductId::new(product).unwrap()],
        ..UserState::default()
    }
}

fn cart_with(sku: &str) -> Cart {
    let mut cart = Cart::default();
    cart.items.insert(sku.to_owned(), 2);
    cart
}

/// `(position, key, revision, state)` of every change of `E` in the feed.
async fn feed_of<E: persist_durable::DurableEntity>(store: &SharedStore) -> Vec<(u64, E::Key, Revision, E)> {
    let changes = EntityFeed::<E>::from_position(store.clone(), 0)
        .with_batch_size(100)
        .next_batch()
        .await
        .unwrap();
    let since = Utc::now() - chrono::Duration::minutes(1);
    for change in &changes {
        assert!(
            change.committed_at > since && change.committed_at <= Utc::now() + chrono::Duration::seconds(5),
            "committed_at is the time of the write: {change:?}"
        );
    }
    changes
        .into_iter()
        .map(|c| (c.position, c.key, c.revision, c.state))
        .collect()
}

async fn revision_and_state(store: &SharedStore, user: &UserKey) -> (Revision, UserState) {
    let stored = store.load(user).await.unwrap().expect("the row exists");
    (stored.revision, stored.state)
}

fn assert_conflict(result: Result<Revision, StoreError>, user: &UserKey, expected: Revision) {
    match result {
        Err(StoreError::Conflict { key, expected: was }) => {
            assert_eq!(key, user.persistence_id());
            assert_eq!(was, expected);
        }
        other => panic!("{user}: expected a conflict, got {other:?}"),
    }
}

#[rstest]
#[tokio::test]
async fn one_batched_write_inserts_updates_and_refuses_each_row_on_its_own(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(true, false)] feed: bool,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // A statement takes up to five writes and waits up to a second for
    // them: the five concurrent writes below share one.
    let config = test_store_config()
        .with_change_feed(feed)
        .with_max_batch_size(5)
        .with_max_batch_wait(Duration::from_secs(1));
    let store = db.connect_with(config).await;
    let (updated, refused, taken, fresh) = (
        key("mall001", "a"),
        key("mall001", "b"),
        key("mall001", "c"),
        key("mall001", "d"),
    );
    let cart = CartId::new("cart-1").unwrap();

    let (a1, b1, c1) = (viewed("a1"), viewed("b1"), viewed("c1"));
    let (a, b, c) = tokio::join!(
        store.write(&updated, Revision::NONE, Revision(1), &a1),
        store.write(&refused, Revision::NONE, Revision(1), &b1),
        store.write(&taken, Revision::NONE, Revision(1), &c1),
    );
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap()),
        (Revision(1), Revision(1), Revision(1))
    );
    let before = store.stats();

    let (d1, a2_a3, b6, c_again, cart1) = (
        viewed("d1"),
        [viewed("a2"), viewed("a3")],
        viewed("b6"),
        viewed("c-again"),
        [cart_with("sku-1")],
    );
    let (fresh_written, updated_written, refused_written, taken_written, cart_written) = tokio::join!(
        // New row.
        store.write(&fresh, Revision::NONE, Revision(1), &d1),
        // At its expected revision, two commands at once: revisions 2 and 3.
        store.write_changes(&updated, Revision(1), &a2_a3),
        // At the wrong revision.
        store.write(&refused, Revision(5), Revision(6), &b6),
        // New, but the row exists.
        store.write(&taken, Revision::NONE, Revision(1), &c_again),
        // New row of another entity type.
        store.write_changes(&cart, Revision::NONE, &cart1),
    );

    let stats = store.stats();
    assert_eq!(
        (
            stats.write_statements - before.write_statements,
            stats.rows_written - before.rows_written,
            stats.conflicts - before.conflicts
        ),
        (1, 3, 2),
        "one statement: three rows written, two refused ({stats:?})"
    );
    assert_eq!(fresh_written.unwrap(), Revision(1));
    assert_eq!(updated_written.unwrap(), Revision(3));
    assert_eq!(cart_written.unwrap(), Revision(1));
    assert_conflict(refused_written, &refused, Revision(5));
    assert_conflict(taken_written, &taken, Revision::NONE);

    assert_eq!(revision_and_state(&store, &fresh).await, (Revision(1), viewed("d1")));
    assert_eq!(revision_and_state(&store, &updated).await, (Revision(3), viewed("a3")));
    assert_eq!(revision_and_state(&store, &refused).await, (Revision(1), viewed("b1")));
    assert_eq!(revision_and_state(&store, &taken).await, (Revision(1), viewed("c1")));
    let stored_cart = store.load(&cart).await.unwrap().unwrap();
    assert_eq!(
        (stored_cart.revision, stored_cart.state),
        (Revision(1), cart_with("sku-1"))
    );

    if !feed {
        let refused = ChangeFeed::from_position(store.clone(), 0).next_batch().await;
        assert!(matches!(refused, Err(StoreError::NoChangeFeed)), "{refused:?}");
        return;
    }
    // The batch's rows in key order (`Cart|…` before `UserState|…`), each
    // written revision once, right after the three rows written before.
    assert_eq!(
        feed_of::<UserState>(&store).await,
        [
            (1, updated.clone(), Revision(1), viewed("a1")),
            (2, refused.clone(), Revision(1), viewed("b1")),
            (3, taken.clone(), Revision(1), viewed("c1")),
            (5, updated.clone(), Revision(2), viewed("a2")),
            (6, updated.clone(), Revision(3), viewed("a3")),
            (7, fresh.clone(), Revision(1), viewed("d1")),
        ]
    );
    assert_eq!(
        feed_of::<Cart>(&store).await,
        [(4, cart.clone(), Revision(1), cart_with("sku-1"))]
    );
}
