//! A manager with several shards (one per arbiter): commands reach every
//! entity from the typed handle and from the manager's address alike, in
//! order, and the manager's limits, counters and retention cover all shards
//! together, as they did with one.

mod common;

use std::time::Duration;

use actix::Actor;
use common::{age, key, view, Backend, TestDb};
use persist_durable::{
    Command, CommandError, Config, GetManagerStats, ProductId, PurgeIdle, Revision, SharedStore, StateStoreExt,
    UserCommand, UserKey, UserState, UserStateManager, UserStates,
};
use rstest::rstest;

const SHARDS: usize = 4;

fn users(n: usize) -> Vec<UserKey> {
    (0..n)
        .map(|i| key(&format!("mall{:03}", i % 7), &format!("user{i:04}")))
        .collect()
}

/// Polls the stats until `done` holds of them (passivations finish on the
/// shards' own threads), failing after a few seconds.
async fn stats_until(
    users: &UserStates,
    done: impl Fn(&persist_durable::ManagerStats) -> bool,
) -> persist_durable::ManagerStats {
    for _ in 0..500 {
        let stats = users.stats().await.unwrap();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    users.stats().await.unwrap()
}

#[rstest]
#[actix::test]
async fn every_entity_is_reached_through_the_handle_and_the_address_and_stats_sum_all_shards(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let handle = UserStates::start(store.clone(), Config::default().with_arbiters(SHARDS));
    let keys = users(200);

    // Each user: a view through the handle, then one through the address, concurrently for all users.
    let first: Vec<_> = keys.iter().map(|k| handle.send(k.clone(), view("a"))).collect();
    let second: Vec<_> = keys
        .iter()
        .map(|k| handle.addr().send(UserCommand::new(k.clone(), view("b"))))
        .collect();
    for reply in futures_util::future::join_all(first).await {
        reply.unwrap();
    }
    for reply in futures_util::future::join_all(second).await {
        reply.unwrap().unwrap();
    }

    for user in &keys {
        let stored = store.load(user).await.unwrap().unwrap();
        assert_eq!(stored.revision, Revision(2), "{user}: both commands, once each");
        let products: Vec<&str> = stored.state.recent_products.iter().map(ProductId::as_str).collect();
        assert_eq!(products, ["b", "a"], "{user}: in the order sent");
    }
    let by_handle = handle.stats().await.unwrap();
    let by_address = handle.addr().send(GetManagerStats).await.unwrap();
    assert_eq!(by_handle, by_address);
    assert_eq!(
        (by_handle.resident_entities, by_handle.activations),
        (200, 200),
        "{by_handle:?}"
    );
}

#[rstest]
#[actix::test]
async fn the_resident_limit_bounds_all_shards_together(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let config = Config::default().with_arbiters(SHARDS).with_max_resident(20);
    let handle = UserStates::start(store.clone(), config);
    let keys = users(100);

    for user in &keys {
        handle.send(user.clone(), Command::UserLogin).await.unwrap();
    }
    let stats = stats_until(&handle, |s| s.resident_entities <= 20).await;

    // One shard's share of the limit would evict more: 80 is exactly the excess.
    assert_eq!(stats.evictions, 80, "{stats:?}");
    assert_eq!(stats.resident_entities, 20, "{stats:?}");
    for user in &keys {
        let state = handle.send(user.clone(), Command::GetUserState).await.unwrap();
        assert!(state.last_login.is_some(), "{user} kept its state");
    }
}

#[rstest]
#[actix::test]
async fn the_in_flight_limit_bounds_all_shards_together(#[values(Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let config = Config::default().with_arbiters(SHARDS).with_max_commands_in_flight(10);
    let handle = UserStates::start(store.clone(), config);
    let keys = users(100);

    // The table is locked: every admitted command waits in flight.
    let lock = db.lock_table();
    let requests: Vec<_> = keys
        .iter()
        .map(|k| {
            let handle = handle.clone();
            let k = k.clone();
            actix::spawn(async move { handle.send(k, Command::UserLogin).await })
        })
        .collect();
    let refused = stats_until(&handle, |s| s.commands_refused == 90)
        .await
        .commands_refused;
    drop(lock);

    let mut outcomes = (0, 0);
    for request in requests {
        match request.await.unwrap() {
            Ok(_) => outcomes.0 += 1,
            Err(CommandError::Overloaded { .. }) => outcomes.1 += 1,
            Err(other) => panic!("neither committed nor refused: {other:?}"),
        }
    }
    assert_eq!(refused, 90, "10 in flight over all shards, not 10 per shard");
    assert_eq!(outcomes, (10, 90));
}

#[rstest]
#[actix::test]
async fn each_shard_purges_its_own_idle_rows_and_never_a_resident_entity(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store: SharedStore = db.connect().await;
    let keys = users(60);
    for user in &keys {
        store
            .write(user, Revision::NONE, Revision(1), &UserState::default())
            .await
            .unwrap();
    }
    age(&db, &keys);
    let config = Config::default()
        .with_arbiters(SHARDS)
        .with_retention(Some(Duration::from_secs(400 * 24 * 60 * 60)))
        .with_retention_check_interval(Duration::from_secs(24 * 60 * 60))
        .with_retention_chunk_size(7);
    let manager = UserStateManager::new(store.clone(), config).start();
    // Ten of them resident, spread over the shards: their actors hold their state.
    for user in &keys[..10] {
        manager
            .send(UserCommand::new(user.clone(), Command::GetUserState))
            .await
            .unwrap()
            .unwrap();
    }

    let purged = manager.send(PurgeIdle).await.unwrap().unwrap();

    assert_eq!(purged, 50, "each idle row once, by the shard that owns it");
    for user in &keys[..10] {
        assert!(store.load(user).await.unwrap().is_some(), "{user} is resident and kept");
    }
    for user in &keys[10..] {
        assert!(store.load(user).await.unwrap().is_none(), "{user} was purged");
    }
    assert_eq!(manager.send(GetManagerStats).await.unwrap().purged, 50);
}

#[rstest]
#[actix::test]
async fn a_command_sent_as_the_last_address_is_dropped_is_still_answered(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let user = key("mall001", "user001");

    // Nobody holds the manager's address once the command is sent.
    let request = UserStateManager::new(store.clone(), Config::default().with_arbiters(SHARDS))
        .start()
        .send(UserCommand::new(user.clone(), Command::UserLogin));

    let state = request.await.expect("the manager answers").expect("committed");
    assert!(state.last_login.is_some());
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(1));
}

/// The resident-users gauge, as a metrics recorder installed for this test binary sees it.
mod gauge {
    use metrics_util::debugging::DebugValue;

    pub use super::common::metrics_snapshotter as snapshotter;

    /// `persist_durable_resident_entities{entity}`, if set.
    pub fn resident(entity: &str) -> Option<f64> {
        snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| {
                let key = key.key();
                let is_it = key.name() == "persist_durable_resident_entities"
                    && key.labels().any(|l| l.key() == "entity" && l.value() == entity);
                match value {
                    DebugValue::Gauge(gauge) if is_it => Some(gauge.into_inner()),
                    _ => None,
                }
            })
    }
}

#[rstest]
#[actix::test]
async fn the_resident_gauge_counts_the_entities_of_all_shards(#[values(Backend::Sqlite)] backend: Backend) {
    use persist_durable::cart::{Cart, CartCommand, CartId};
    use persist_durable::Entities;

    let Some(db) = TestDb::open(backend).await else { return };
    gauge::snapshotter();
    // Carts: no other test of this binary starts one, so the gauge is this test's alone.
    let carts = Entities::<Cart>::start(db.connect().await, Config::default().with_arbiters(SHARDS));

    for i in 0..40 {
        let cart = CartId::new(format!("cart{i:02}")).unwrap();
        let add = CartCommand::AddItem {
            sku: "sku-1".into(),
            quantity: 1,
        };
        carts.send(cart, add).await.unwrap();
    }

    assert_eq!(carts.stats().await.unwrap().resident_entities, 40);
    assert_eq!(
        gauge::resident("Cart"),
        Some(40.0),
        "the sum over the shards, not one shard's count"
    );
}
