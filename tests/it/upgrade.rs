//! A database written by the previous release (the user-only schema, before
//! 2026-11-22-000000_generic_entities) opens with this one: the new migrations
//! run alone, the old rows load (at schema version 1), and the old feed rows come out of the typed
//! feed with their users' keys.

use crate::common::{key, t0, test_store_config, view, Backend, TestDb};
use chrono::{DateTime, Duration, Utc};
use persist_durable::{
    ChangeFeed, Command, Config, Event, EventId, ManualClock, ProductId, Revision, SharedStore, StateStoreExt, UserKey,
    UserState, UserStates,
};
use rstest::rstest;
use serde_json::json;

/// The previous release's migrations, as it shipped them.
fn old_migrations(backend: Backend) -> [&'static str; 2] {
    match backend {
        Backend::Sqlite => [
            include_str!("../../migrations/sqlite/2026-11-20-000000_create_durable_state/up.sql"),
            include_str!("../../migrations/sqlite/2026-11-21-000000_create_state_changes/up.sql"),
        ],
        Backend::Postgres => [
            include_str!("../../migrations/postgres/2026-11-20-000000_create_durable_state/up.sql"),
            include_str!("../../migrations/postgres/2026-11-21-000000_create_state_changes/up.sql"),
        ],
    }
}

/// The migration versions diesel records: the directory name's date part without dashes.
const OLD_VERSIONS: [&str; 2] = ["20261120000000", "20261121000000"];
/// The versions of every later migration, oldest first: the first,
/// 2026-11-22-000000_generic_entities, converts the feed table.
fn new_versions(backend: Backend) -> Vec<String> {
    let dir = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dir);
    let mut versions: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .map(|name| name.split('_').next().unwrap().replace('-', ""))
        .filter(|version| !OLD_VERSIONS.contains(&version.as_str()))
        .collect();
    versions.sort();
    assert_eq!(versions.first().map(String::as_str), Some("20261122000000"));
    versions
}

/// Diesel's bookkeeping table, as diesel creates it.
const DIESEL_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS __diesel_schema_migrations (
       version VARCHAR(50) PRIMARY KEY NOT NULL,
       run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);";

/// The user of the old database.
fn old_user() -> UserKey {
    key("mall-1", "user-1")
}

/// The old user's payloads for revisions 1 to 3, as the previous release
/// wrote them: the event ids inside the state, under `recent_event_ids`.
fn old_payloads() -> [serde_json::Value; 3] {
    [
        json!({"last_login": "2026-11-20T09:00:00Z", "last_cart_use": null, "recent_products": [],
               "marketing_opt_in": false, "last_event_time": "2026-11-20T09:00:00Z", "recent_event_ids": ["e1"]}),
        json!({"last_login": "2026-11-20T09:00:00Z", "last_cart_use": null, "recent_products": ["p1"],
               "marketing_opt_in": false, "last_event_time": "2026-11-20T09:00:00Z", "recent_event_ids": ["e1"]}),
        json!({"last_login": "2026-11-20T09:00:00Z", "last_cart_use": null, "recent_products": ["p1"],
               "marketing_opt_in": true, "last_event_time": "2026-11-20T09:00:00Z", "recent_event_ids": ["e1"]}),
    ]
}

/// The old user's states for revisions 1 to 3, as this release reads them.
fn old_states() -> [UserState; 3] {
    let logged_in = UserState {
        last_login: Some(t0()),
        last_event_time: Some(t0()),
        ..UserState::default()
    };
    let viewed = UserState {
        recent_products: vec![ProductId::new("p1").unwrap()],
        ..logged_in.clone()
    };
    let opted_in = UserState {
        marketing_opt_in: true,
        ..viewed.clone()
    };
    [logged_in, viewed, opted_in]
}

/// When the old feed rows were committed: one second apart from 09:00:01.
fn old_commit_times() -> [DateTime<Utc>; 3] {
    [1, 2, 3].map(|s| t0() + Duration::seconds(s))
}

/// The previous release's persistence id: `UserState|<mall>-<user>` with `%`
/// and `-` inside the ids percent-escaped.
fn old_persistence_id(mall: &str, user: &str) -> String {
    let escape = |id: &str| id.replace('%', "%25").replace('-', "%2D");
    format!("UserState|{}-{}", escape(mall), escape(user))
}

/// A SQL literal of `json` as the payload column's type.
fn payload_sql(backend: Backend, json: &serde_json::Value) -> String {
    match backend {
        Backend::Sqlite => format!("CAST('{json}' AS BLOB)"),
        Backend::Postgres => format!("convert_to('{json}', 'UTF8')"),
    }
}

/// A SQL literal of `time` as the release wrote its timestamp columns.
fn timestamp_sql(backend: Backend, time: DateTime<Utc>) -> String {
    match backend {
        // strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
        Backend::Sqlite => format!("'{}'", time.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
        Backend::Postgres => format!("'{}'::timestamptz", time.to_rfc3339()),
    }
}

/// Writes a user's row and its feed rows (one per payload, revisions from 1)
/// as the previous release did.
fn write_old_user(db: &TestDb, mall: &str, user: &str, payloads: &[serde_json::Value], committed: &[DateTime<Utc>]) {
    let backend = db.backend;
    let last = payloads.last().unwrap();
    db.execute(&format!(
        "INSERT INTO durable_state \
         (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
         VALUES ('{id}', 'UserState', {revision}, {at}, 1, 'UserState/v1', {payload})",
        id = old_persistence_id(mall, user),
        revision = payloads.len(),
        at = timestamp_sql(backend, *committed.last().unwrap()),
        payload = payload_sql(backend, last),
    ));
    for (i, (payload, at)) in payloads.iter().zip(committed).enumerate() {
        let (revision, at, payload) = (i + 1, timestamp_sql(backend, *at), payload_sql(backend, payload));
        db.execute(&match backend {
            // AUTOINCREMENT positions, in commit order.
            Backend::Sqlite => format!(
                "INSERT INTO state_changes (mall_id, user_id, revision, committed_at, state_payload) \
                 VALUES ('{mall}', '{user}', {revision}, {at}, {payload})"
            ),
            // Positions taken from feed_head, in the same transaction.
            Backend::Postgres => format!(
                "BEGIN; \
                 UPDATE feed_head SET position = position + 1 WHERE id = 1; \
                 INSERT INTO state_changes (position, mall_id, user_id, revision, committed_at, state_payload) \
                 SELECT position, '{mall}', '{user}', {revision}, {at}, {payload} FROM feed_head WHERE id = 1; \
                 COMMIT;"
            ),
        });
    }
}

/// A fresh database with the previous release's schema and the old user in
/// it: 3 revisions in `durable_state`, 3 rows in the feed, and the consumer
/// `search-index` at position 2.
async fn old_release_database(backend: Backend) -> Option<TestDb> {
    let db = TestDb::open(backend).await?;
    for migration in old_migrations(backend) {
        db.execute(migration);
    }
    db.execute(DIESEL_MIGRATIONS_TABLE);
    for version in OLD_VERSIONS {
        db.execute(&format!(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('{version}')"
        ));
    }
    write_old_user(&db, "mall-1", "user-1", &old_payloads(), &old_commit_times());
    db.execute(&format!(
        "INSERT INTO feed_offsets (consumer, position, updated_at) VALUES ('search-index', 2, {})",
        timestamp_sql(backend, t0() + Duration::seconds(5))
    ));
    Some(db)
}

/// The store of this release on `db`, with the change feed on.
async fn upgraded_store(db: &TestDb) -> SharedStore {
    db.connect_with(test_store_config().with_change_feed(true)).await
}

/// Fails the test unless the SQL boolean expression `condition` holds on the
/// database, read outside the library.
fn assert_sql(db: &TestDb, condition: &str) {
    db.assert_sql(condition);
}

/// The columns `state_changes` has, as a SQL condition on their names.
fn state_changes_column_count(backend: Backend, names: &str) -> String {
    match backend {
        Backend::Sqlite => format!("(SELECT count(*) FROM pragma_table_info('state_changes') WHERE name IN ({names}))"),
        Backend::Postgres => format!(
            "(SELECT count(*) FROM information_schema.columns \
              WHERE table_name = 'state_changes' AND column_name IN ({names}))"
        ),
    }
}

#[rstest]
#[actix::test]
async fn a_fresh_database_records_its_migrations_under_the_versions_the_old_database_is_marked_with(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };

    upgraded_store(&db).await;

    let new_versions = new_versions(backend);
    let all = OLD_VERSIONS.len() + new_versions.len();
    assert_sql(
        &db,
        &format!("(SELECT count(*) FROM __diesel_schema_migrations) = {all}"),
    );
    for version in OLD_VERSIONS
        .iter()
        .copied()
        .chain(new_versions.iter().map(String::as_str))
    {
        assert_sql(
            &db,
            &format!("(SELECT count(*) FROM __diesel_schema_migrations WHERE version = '{version}') = 1"),
        );
    }
}

#[rstest]
#[actix::test]
async fn opening_an_old_database_runs_only_the_new_migrations_and_converts_the_feed_table(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    let user_columns = state_changes_column_count(backend, "'mall_id', 'user_id'");
    assert_sql(&db, &format!("{user_columns} = 2"));

    upgraded_store(&db).await;
    // Opening it again finds nothing to do.
    upgraded_store(&db).await;

    let new_versions = new_versions(backend);
    let all = OLD_VERSIONS.len() + new_versions.len();
    assert_sql(
        &db,
        &format!("(SELECT count(*) FROM __diesel_schema_migrations) = {all}"),
    );
    for version in &new_versions {
        assert_sql(
            &db,
            &format!("(SELECT count(*) FROM __diesel_schema_migrations WHERE version = '{version}') = 1"),
        );
    }
    // The old rows are at schema version 1, the only one there was.
    assert_sql(
        &db,
        "(SELECT count(*) FROM durable_state WHERE state_schema_version = 1) = 1",
    );
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes WHERE state_schema_version = 1) = 3",
    );
    assert_sql(&db, &format!("{user_columns} = 0"));
    let entity_columns = state_changes_column_count(backend, "'entity_type', 'persistence_id'");
    assert_sql(&db, &format!("{entity_columns} = 2"));
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes \
          WHERE entity_type = 'UserState' AND persistence_id = 'UserState|mall%2D1-user%2D1') = 3",
    );
}

#[rstest]
#[actix::test]
async fn the_old_users_row_loads_with_its_revision_state_and_event_ids(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };

    let store = upgraded_store(&db).await;

    let stored = store.load(&old_user()).await.unwrap().expect("the old row is found");
    assert_eq!(stored.revision, Revision(3));
    assert_eq!(stored.state, old_states()[2]);
    assert_eq!(stored.recent_event_ids, [EventId::new("e1").unwrap()]);
}

#[rstest]
#[actix::test]
async fn an_event_applied_before_the_upgrade_is_not_applied_again_and_a_new_one_writes_revision_4(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    let store = upgraded_store(&db).await;
    let later = t0() + Duration::hours(1);
    let users = UserStates::start(store.clone(), Config::default().with_clock(ManualClock::new(later)));
    let user = old_user();

    // e1 was the login at 09:00; delivered again an hour later, it would move
    // the login time and the revision if it were applied.
    let redelivered = Event::from(Command::UserLogin).with_id(EventId::new("e1").unwrap());
    let reply = users.send(user.clone(), redelivered).await.unwrap();
    assert_eq!(reply, old_states()[2], "acknowledged with the old state");
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(3));

    let new_event = Event::from(view("p2")).with_id(EventId::new("e2").unwrap());
    let reply = users.send(user.clone(), new_event).await.unwrap();
    let products: Vec<&str> = reply.recent_products.iter().map(ProductId::as_str).collect();
    assert_eq!(products, ["p2", "p1"]);
    assert_eq!(reply.last_login, Some(t0()), "the login was not applied again");
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!((stored.revision, &stored.state), (Revision(4), &reply));
    assert_eq!(
        stored.recent_event_ids,
        [EventId::new("e1").unwrap(), EventId::new("e2").unwrap()],
        "the old event id is kept beside the new one"
    );
}

#[rstest]
#[actix::test]
async fn the_feed_yields_the_converted_old_revisions_then_the_new_one_at_a_later_position(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    let store = upgraded_store(&db).await;
    let user = old_user();
    let mut feed = ChangeFeed::from_position(store.clone(), 0);

    let old = feed.next_batch().await.unwrap();

    assert_eq!(old.len(), 3, "{old:?}");
    for (i, change) in old.iter().enumerate() {
        assert_eq!(change.key, user, "row {i} names the user by its key");
        assert_eq!(change.position, i as u64 + 1);
        assert_eq!(change.revision, Revision(i as u64 + 1));
        assert_eq!(change.state, old_states()[i], "revision {}", i + 1);
        assert_eq!(
            change.committed_at,
            old_commit_times()[i],
            "the old commit time is kept"
        );
    }

    let users = UserStates::start(store.clone(), Config::default());
    let reply = users.send(user.clone(), Command::UseCart).await.unwrap();
    let new = feed.next_batch().await.unwrap();

    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].key, user);
    assert_eq!(new[0].revision, Revision(4));
    assert_eq!(new[0].state, reply);
    assert_eq!(new[0].position, 4, "after the old positions, with no gap");
}

#[rstest]
#[actix::test]
async fn a_consumer_offset_saved_before_the_upgrade_resumes_right_after_it(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    let store = upgraded_store(&db).await;

    let mut feed = ChangeFeed::resume(store, "search-index").await.unwrap();

    assert_eq!(feed.position(), 2);
    let rest = feed.next_batch().await.unwrap();
    let revisions: Vec<Revision> = rest.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [Revision(3)]);
}

#[rstest]
#[actix::test]
async fn old_feed_rows_of_ids_with_dashes_and_percents_convert_to_the_keys_of_their_users(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    // Users whose ids joined with a dash would collide, and ids with escapes in them.
    let odd = [("a-b", "c"), ("a", "b-c"), ("50%", "%2D"), ("-", "-")];
    for (i, (mall, user)) in odd.iter().enumerate() {
        let payload = json!({"recent_products": [format!("q{i}")]});
        write_old_user(&db, mall, user, &[payload], &[t0()]);
    }
    let store = upgraded_store(&db).await;

    let changes = ChangeFeed::from_position(store.clone(), 3).next_batch().await.unwrap();

    let keys: Vec<UserKey> = changes.iter().map(|c| c.key.clone()).collect();
    let expected: Vec<UserKey> = odd.iter().map(|(mall, user)| key(mall, user)).collect();
    assert_eq!(keys, expected);
    let users = UserStates::start(store.clone(), Config::default());
    for (i, user) in expected.iter().enumerate() {
        let products: Vec<&str> = changes[i].state.recent_products.iter().map(ProductId::as_str).collect();
        assert_eq!(products, [format!("q{i}")], "{user}: its own state");
        // The feed's key finds the user's old row: the next write is revision 2 on it.
        users.send(user.clone(), Command::UseCart).await.unwrap();
        let stored = store.load(user).await.unwrap().unwrap();
        assert_eq!(stored.revision, Revision(2), "{user}");
        assert_eq!(stored.state.recent_products, changes[i].state.recent_products, "{user}");
    }
}

/// Before, migrations ran under a client timeout (four connect timeouts, 6 s
/// with the tests' settings, 20 s by default): converting a large feed table
/// rolled back every time and never finished. A million old feed rows (of
/// 10,000 users) convert now, however long it takes, with three processes
/// starting on it at once (before, those that waited for the migrating one
/// held a snapshot its concurrent index build waited for: a deadlock).
#[actix::test]
async fn an_old_database_with_a_million_feed_rows_upgrades_in_place_under_three_processes_starting_at_once() {
    let Some(db) = old_release_database(Backend::Postgres).await else {
        return;
    };
    db.execute(
        "INSERT INTO state_changes (position, mall_id, user_id, revision, committed_at, state_payload) \
         SELECT 3 + n, 'mall-big', 'user-' || (n % 10000), 1 + n / 10000, now(), convert_to('{}', 'UTF8') \
         FROM generate_series(1, 1000000) AS n; \
         UPDATE feed_head SET position = 1000003 WHERE id = 1;",
    );

    crate::startup::start_together(&db, &db.location(), 3);
    let store = upgraded_store(&db).await;

    assert_sql(&db, "(SELECT count(*) FROM state_changes) = 1000003 + 3");
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes WHERE persistence_id = 'UserState|mall%2Dbig-user%2D42') = 100",
    );
    assert_sql(&db, "NOT EXISTS (SELECT 1 FROM pg_index WHERE NOT indisvalid)");
    let last = ChangeFeed::from_position(store, 1_000_002)
        .with_batch_size(1)
        .next_batch()
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].key, key("mall-big", &format!("user-{}", 1_000_000 % 10_000)));
}

/// Rows from before slices get theirs when the store opens (in chunks), and
/// every write sets it: Pekko's `abs(persistenceId.hashCode() % 1024)`.
#[rstest]
#[actix::test]
async fn every_row_has_its_slice_the_old_ones_filled_in_at_start(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = old_release_database(backend).await else {
        return;
    };
    let store = upgraded_store(&db).await;
    let users = UserStates::start(store, Config::default());
    let new_user = key("mall001", "user001");
    users.send(new_user.clone(), Command::UserLogin).await.unwrap();

    let old_id = old_persistence_id("mall-1", "user-1");
    // Printed by Java 17: Math.abs("UserState|mall%2D1-user%2D1".hashCode() % 1024) and
    // Math.abs("UserState|mall001-user001".hashCode() % 1024).
    assert_eq!(persist_durable::Slice::of(&old_id).index(), 498);
    assert_sql(
        &db,
        &format!("(SELECT slice FROM durable_state WHERE persistence_id = '{old_id}') = 498"),
    );
    assert_sql(
        &db,
        "(SELECT slice FROM durable_state WHERE persistence_id = 'UserState|mall001-user001') = 960",
    );
}
