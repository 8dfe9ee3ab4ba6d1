//! Deleting an entity: a revision-checked tombstone, answered once
//! committed. The data is gone, revisions go on, and nothing from before the
//! deletion (a stale writer, a redelivered or late event) brings it back.

use std::time::Duration;

use crate::common::{key, test_store_config, view, Backend, TestDb};
use chrono::TimeZone;
use persist_durable::{
    ChangeFeed, ChangeKind, Command, Config, Event, EventId, MaintenanceExt, ManualClock, ProductId, Revision,
    SharedStore, StateStoreExt, StoreError, UserKey, UserState, UserStates,
};
use rstest::rstest;

const MINUTE: Duration = Duration::from_secs(60);

fn products(state: &UserState) -> Vec<&str> {
    state.recent_products.iter().map(ProductId::as_str).collect()
}

async fn revision(store: &SharedStore, user: &UserKey) -> Option<Revision> {
    store.load(user).await.unwrap().map(|stored| stored.revision)
}

#[rstest]
#[actix::test]
async fn after_a_delete_the_state_is_the_default_and_revisions_go_on(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(true)).await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall001", "user001");
    users.send(user.clone(), Command::UserLogin).await.unwrap();
    users.send(user.clone(), view("p1")).await.unwrap();
    users
        .send(user.clone(), Command::SetMarketingOptIn { opt_in: true })
        .await
        .unwrap();

    let deleted = users.send(user.clone(), Command::DeleteUser).await.unwrap();

    assert_eq!(deleted, UserState::default());
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.deleted), (Revision(4), true));
    assert_eq!(stored.state, UserState::default(), "the personal data is gone");
    let after = users.send(user.clone(), view("p2")).await.unwrap();
    assert_eq!(
        products(&after),
        ["p2"],
        "a later command starts from the default state"
    );
    assert!(after.last_login.is_none() && !after.marketing_opt_in);
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.deleted), (Revision(5), false));
    // Another process restoring the user sees the same.
    let restarted = UserStates::start(db.connect().await, Config::default());
    assert_eq!(restarted.send(user, Command::GetUserState).await.unwrap(), after);
}

#[rstest]
#[actix::test]
async fn the_feed_records_the_deletion_as_its_own_kind_of_change_in_order(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(true)).await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall001", "user001");
    users.send(user.clone(), view("p1")).await.unwrap();
    users.send(user.clone(), Command::DeleteUser).await.unwrap();
    users.send(user.clone(), view("p2")).await.unwrap();

    let changes = ChangeFeed::from_position(store, 0).next_batch().await.unwrap();

    let seen: Vec<(u64, ChangeKind, Vec<&str>)> = changes
        .iter()
        .map(|c| (c.revision.0, c.kind, products(&c.state)))
        .collect();
    assert_eq!(
        seen,
        [
            (1, ChangeKind::Redacted, vec![]),
            (2, ChangeKind::Deleted, vec![]),
            (3, ChangeKind::Updated, vec!["p2"]),
        ],
        "the revision before the delete keeps its place, erased"
    );
    assert!(changes.windows(2).all(|w| w[0].position < w[1].position));
}

/// Before, the feed kept every erased revision's full payload forever.
#[rstest]
#[actix::test]
async fn a_delete_erases_the_entitys_data_from_the_feed_in_the_same_statement(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(true)).await;
    let users = UserStates::start(store.clone(), Config::default());
    let (user, other) = (key("mall001", "erased"), key("mall001", "kept"));
    users.send(user.clone(), view("secret-1")).await.unwrap();
    users.send(other.clone(), view("other")).await.unwrap();
    // Queued together while the entity is busy: one write, the delete in its middle.
    let (before, deleted, after) = tokio::join!(
        users.send(user.clone(), view("secret-2")),
        users.send(user.clone(), Command::DeleteUser),
        users.send(user.clone(), view("after")),
    );
    for answer in [before, deleted, after] {
        answer.unwrap();
    }

    let changes = ChangeFeed::from_position(store.clone(), 0).next_batch().await.unwrap();

    let of = |key: &UserKey| -> Vec<(ChangeKind, Vec<String>)> {
        changes
            .iter()
            .filter(|c| c.key == *key)
            .map(|c| (c.kind, products(&c.state).into_iter().map(str::to_owned).collect()))
            .collect()
    };
    assert_eq!(
        of(&user),
        [
            (ChangeKind::Redacted, vec![]),
            (ChangeKind::Redacted, vec![]),
            (ChangeKind::Deleted, vec![]),
            (ChangeKind::Updated, vec!["after".to_owned()]),
        ]
    );
    assert_eq!(
        of(&other),
        [(ChangeKind::Updated, vec!["other".to_owned()])],
        "other entities keep theirs"
    );
    let rows = store.read_change_rows("UserState", 0, 100).await.unwrap();
    assert!(
        rows.iter()
            .all(|row| !String::from_utf8_lossy(&row.payload).contains("secret")),
        "no erased data in any stored feed row"
    );
}

#[rstest]
#[actix::test]
async fn a_stale_writer_cannot_bring_deleted_data_back(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let node_a = UserStates::start(db.connect().await, Config::default());
    let store_b = db.connect().await;
    let node_b = UserStates::start(store_b.clone(), Config::default());
    let user = key("mall001", "user001");
    node_a.send(user.clone(), view("secret")).await.unwrap();
    // Node A holds the user with "secret" in it; node B erases the user.
    node_b.send(user.clone(), Command::DeleteUser).await.unwrap();

    // A raw write from the old revision is a conflict: nothing is overwritten.
    let stale = UserState {
        recent_products: vec![ProductId::new("secret").unwrap()],
        ..UserState::default()
    };
    let raw = store_b.write(&user, Revision(1), Revision(2), &stale).await;
    assert!(matches!(raw, Err(StoreError::Conflict { .. })), "{raw:?}");
    // Node A's next command conflicts, reloads the tombstone and applies on the default state.
    let after = node_a.send(user.clone(), view("p2")).await.unwrap();

    assert_eq!(products(&after), ["p2"], "the deleted product does not come back");
    let stored = store_b.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, products(&stored.state)), (Revision(3), vec!["p2"]));
}

#[rstest]
#[actix::test]
async fn deleting_a_user_never_seen_commits_a_tombstone(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall001", "nobody");

    let deleted = users.send(user.clone(), Command::DeleteUser).await.unwrap();

    assert_eq!(deleted, UserState::default());
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.deleted), (Revision(1), true));
}

#[rstest]
#[actix::test]
async fn a_redelivered_or_late_event_from_before_the_delete_is_not_applied(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let clock = ManualClock::new(chrono::Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap());
    let users = UserStates::start(store.clone(), Config::default().with_clock(clock.clone()));
    let user = key("mall001", "user001");
    let before = chrono::Utc.with_ymd_and_hms(2026, 11, 21, 11, 0, 0).unwrap();
    let pre_delete = Event::from(view("secret"))
        .with_id(EventId::new("views-0-41").unwrap())
        .at(before);
    users.send(user.clone(), pre_delete.clone()).await.unwrap();
    users.send(user.clone(), Command::DeleteUser).await.unwrap();

    // The same event again, and another one that happened before the delete.
    let redelivered = users.send(user.clone(), pre_delete).await.unwrap();
    let late = Event::from(view("late"))
        .with_id(EventId::new("views-0-42").unwrap())
        .at(before);
    let late = users.send(user.clone(), late).await.unwrap();

    assert_eq!(redelivered, UserState::default());
    assert_eq!(
        late,
        UserState::default(),
        "an event from before the erasure is not applied"
    );
    assert_eq!(
        revision(&store, &user).await,
        Some(Revision(2)),
        "nothing written after the delete"
    );
    // An event after the delete is applied.
    clock.advance(chrono::Duration::minutes(1));
    let fresh = users.send(user.clone(), view("new")).await.unwrap();
    assert_eq!(products(&fresh), ["new"]);
}

/// A command after a delete is ordered by its arrival, never by comparing
/// two clocks: each of these was answered `Ok` and dropped before.
#[rstest]
#[actix::test]
async fn a_command_after_a_delete_is_applied_whatever_the_clocks_say(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let noon = chrono::Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
    let a = UserStates::start(db.connect().await, Config::default().with_clock(ManualClock::new(noon)));
    // Node b's clock is an hour behind node a's.
    let behind = ManualClock::new(noon - chrono::Duration::hours(1));
    let b = UserStates::start(db.connect().await, Config::default().with_clock(behind));
    let store = db.connect().await;

    // Without an event time, on a node whose clock is behind.
    let user = key("mall001", "clock-behind");
    a.send(user.clone(), Command::DeleteUser).await.unwrap();
    let login = b.send(user.clone(), Command::UserLogin).await.unwrap();
    assert!(login.last_login.is_some(), "applied: {login:?}");
    assert_eq!(revision(&store, &user).await, Some(Revision(2)));

    // In the same millisecond as the delete (Kafka's record timestamps).
    let user = key("mall001", "same-millisecond");
    let at = noon + chrono::Duration::milliseconds(7);
    a.send(user.clone(), Event::from(Command::DeleteUser).at(at))
        .await
        .unwrap();
    let login = a
        .send(user.clone(), Event::from(Command::UserLogin).at(at))
        .await
        .unwrap();
    assert_eq!(login.last_login, Some(at));

    // JSON times at second precision: the same second as the delete.
    let user = key("mall001", "same-second");
    let delete = Event::from_json(r#"{"type": "delete_user", "event_time": "2026-11-21T12:00:00Z"}"#).unwrap();
    let view =
        Event::from_json(r#"{"type": "view_product", "product_id": "p1", "event_time": "2026-11-21T12:00:00Z"}"#)
            .unwrap();
    a.send(user.clone(), delete).await.unwrap();
    assert_eq!(products(&a.send(user.clone(), view).await.unwrap()), ["p1"]);

    // A delete dated in the future does not make what follows look late.
    let user = key("mall001", "future-delete");
    let future = Event::from(Command::DeleteUser).at(noon + chrono::Duration::days(1));
    a.send(user.clone(), future).await.unwrap();
    let now = a
        .send(user.clone(), Event::from(crate::common::view("p2")).at(noon))
        .await
        .unwrap();
    assert_eq!(products(&now), ["p2"]);
    let untimed = a.send(user.clone(), crate::common::view("p3")).await.unwrap();
    assert_eq!(products(&untimed), ["p3", "p2"]);
}

#[rstest]
#[actix::test]
async fn a_delete_racing_with_passivation_is_committed_and_survives_the_restore(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    tokio::time::pause();
    let store = db.connect().await;
    let users = UserStates::start(store.clone(), Config::default().with_arbiters(0));
    let user = key("mall001", "user001");
    users.send(user.clone(), view("secret")).await.unwrap();

    // The idle check fires; the delete arrives while the child passivates.
    tokio::time::advance(35 * MINUTE).await;
    let delete = users.send(user.clone(), Command::DeleteUser);
    let read = users.send(user.clone(), Command::GetUserState);
    let (deleted, read) = futures_util::join!(delete, read);

    assert_eq!(deleted.unwrap(), UserState::default());
    assert_eq!(read.unwrap(), UserState::default());
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.deleted), (Revision(2), true));
    // Passivated again, then restored from the tombstone.
    tokio::time::advance(35 * MINUTE).await;
    for _ in 0..1_000 {
        if users.stats().await.unwrap().resident_entities == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(users.stats().await.unwrap().resident_entities, 0);
    assert_eq!(
        users.send(user, Command::GetUserState).await.unwrap(),
        UserState::default()
    );
}

#[test]
fn a_delete_is_a_command_like_any_other_in_json() {
    let event = Event::from_json(r#"{"type":"delete_user","event_id":"erasure-7"}"#).unwrap();
    assert_eq!(event.command, Command::DeleteUser);
}

/// Nodes may differ in whether they write the feed. Before, a delete (or a
/// purge) on a node without it left the erased data in the feed rows the
/// other node wrote: now an erasure redacts wherever the data is.
#[rstest]
#[actix::test]
async fn a_delete_or_purge_on_a_node_without_the_feed_still_erases_the_feed(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(false, true)] purge: bool,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let with_feed = db.connect_with(test_store_config().with_change_feed(true)).await;
    let without_feed = db.connect().await;
    let user = key("mall001", "erased");
    UserStates::start(with_feed.clone(), Config::default())
        .send(user.clone(), view("secret"))
        .await
        .unwrap();

    if purge {
        crate::common::age(&db, std::slice::from_ref(&user));
        let purged = without_feed
            .purge_idle::<UserState>(Duration::from_secs(400 * 24 * 60 * 60), 10)
            .await
            .unwrap();
        assert_eq!(purged, 1);
    } else {
        UserStates::start(without_feed, Config::default())
            .send(user.clone(), Command::DeleteUser)
            .await
            .unwrap();
    }

    let rows = with_feed.read_change_rows("UserState", 0, 100).await.unwrap();
    assert_eq!(rows.len(), 1, "the change the feed node wrote");
    assert!(
        !String::from_utf8_lossy(&rows[0].payload).contains("secret"),
        "erased from the feed too: {rows:?}"
    );
    let changes = ChangeFeed::from_position(with_feed, 0).next_batch().await.unwrap();
    assert_eq!(changes[0].kind, ChangeKind::Redacted);
}
