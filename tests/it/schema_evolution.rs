//! Schema evolution, on each database: an entity declares the schema version
//! of its state, a row stored at an older version is upgraded on load by the
//! entity's chain of upgrade steps (JSON to JSON) and written back at the new
//! version by its next write, and a row from a newer version than the code
//! knows is refused for that entity alone, never read in part. The change
//! feed upgrades old rows as it reads them.

use std::convert::Infallible;

use crate::common::{t0, Backend, TestDb};
use chrono::{DateTime, Utc};
use persist_durable::{
    CommandError, Config, CorruptRow, DurableEntity, Entities, EntityEvent, EntityFeed, EntityKey, EventId, Id,
    MemoryStore, Revision, SharedStore, StateStoreExt, StoreError, UserKey, UserState, UserStates, WriteRow,
};
use rstest::rstest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A person's key: the entity id as it is.
/// The ready validated key: `PersonId::new("...")`.
type PersonId = Id<Person>;

fn person(id: &str) -> PersonId {
    PersonId::new(id).unwrap()
}

/// A person at schema version 3. Its stored shapes were:
/// - 1: `{"name": "Ada Lovelace"}`
/// - 2: the name split, `{"first": "Ada", "last": "Lovelace"}`
/// - 3: `last` renamed to `family`, and a `greeting` made from the first name.
///
/// The fields other than `visits` have no serde default: an old payload
/// decodes only through the upgrades. `visits` was added with a default,
/// and needed no version of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Person {
    first: String,
    family: String,
    greeting: String,
    #[serde(default)]
    visits: u32,
}

#[derive(Debug, Clone)]
enum PersonCommand {
    Visit,
    Get,
}

impl DurableEntity for Person {
    const ENTITY_TYPE: &'static str = "Person";
    const MANIFEST: &'static str = "Person";
    const SCHEMA_VERSION: u32 = 3;
    type Key = PersonId;
    type Command = PersonCommand;
    type Settings = ();
    type Rejection = Infallible;

    fn apply(&self, command: &PersonCommand, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
        Ok(match command {
            PersonCommand::Visit => Some(Person {
                visits: self.visits + 1,
                ..self.clone()
            }),
            PersonCommand::Get => None,
        })
    }

    fn upgrade(version: u32, mut state: Value) -> Result<Value, String> {
        match version {
            1 => {
                let name = state["name"].as_str().ok_or("no name")?;
                let (first, last) = name
                    .split_once(' ')
                    .ok_or_else(|| format!("the name {name:?} has no family name"))?;
                Ok(json!({"first": first, "last": last}))
            }
            2 => {
                let object = state.as_object_mut().ok_or("not an object")?;
                let last = object.remove("last").ok_or("no last name")?;
                let greeting = format!("Hello, {}", object["first"].as_str().ok_or("no first name")?);
                object.insert("family".into(), last);
                object.insert("greeting".into(), greeting.into());
                Ok(state)
            }
            other => Err(format!("no upgrade from schema version {other}")),
        }
    }
}

/// Ada at version 3, as the upgrades make her from `{"name": "Ada Lovelace"}`.
fn ada_upgraded() -> Person {
    Person {
        first: "Ada".into(),
        family: "Lovelace".into(),
        greeting: "Hello, Ada".into(),
        visits: 0,
    }
}

/// A SQL literal of `json` as the payload column's type.
fn payload_sql(backend: Backend, json: &Value) -> String {
    match backend {
        Backend::Sqlite => format!("CAST('{json}' AS BLOB)"),
        Backend::Postgres => format!("convert_to('{json}', 'UTF8')"),
    }
}

/// A SQL literal of the test's fixed instant as the timestamp columns hold it.
fn timestamp_sql(backend: Backend) -> String {
    match backend {
        Backend::Sqlite => format!("'{}'", t0().format("%Y-%m-%dT%H:%M:%S%.3fZ")),
        Backend::Postgres => format!("'{}'::timestamptz", t0().to_rfc3339()),
    }
}

/// Writes a person's row at revision 1 with `payload`, stored at `version`,
/// outside the library.
fn insert_row(db: &TestDb, id: &str, version: u32, payload: &Value) {
    db.execute(&format!(
        "INSERT INTO durable_state \
         (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload, \
          state_schema_version) \
         VALUES ('Person|{id}', 'Person', 1, {at}, 1, 'Person', {payload}, {version})",
        at = timestamp_sql(db.backend),
        payload = payload_sql(db.backend, payload),
    ));
}

/// Appends a change of a person at `revision` to the feed, stored at
/// `version`, outside the library.
fn insert_change(db: &TestDb, id: &str, revision: u64, version: u32, payload: &Value) {
    let (at, payload) = (timestamp_sql(db.backend), payload_sql(db.backend, payload));
    db.execute(&match db.backend {
        Backend::Sqlite => format!(
            "INSERT INTO state_changes \
             (entity_type, persistence_id, revision, committed_at, state_payload, state_schema_version) \
             VALUES ('Person', 'Person|{id}', {revision}, {at}, {payload}, {version})"
        ),
        Backend::Postgres => format!(
            "BEGIN; \
             UPDATE feed_head SET position = position + 1 WHERE id = 1; \
             INSERT INTO state_changes \
             (position, entity_type, persistence_id, revision, committed_at, state_payload, state_schema_version) \
             SELECT position, 'Person', 'Person|{id}', {revision}, {at}, {payload}, {version} \
             FROM feed_head WHERE id = 1; \
             COMMIT;"
        ),
    });
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

/// The text at `key` of the stored payload's JSON object (SQL NULL when absent).
fn payload_field(backend: Backend, key: &str) -> String {
    match backend {
        Backend::Sqlite => format!("CAST(json_extract(CAST(state_payload AS TEXT), '$.{key}') AS TEXT)"),
        Backend::Postgres => format!("(convert_from(state_payload, 'UTF8')::jsonb ->> '{key}')"),
    }
}

/// The first of the event ids remembered in the stored payload.
fn first_event_id(backend: Backend) -> String {
    match backend {
        Backend::Sqlite => "json_extract(CAST(state_payload AS TEXT), '$.recent_event_ids[0]')".into(),
        Backend::Postgres => "(convert_from(state_payload, 'UTF8')::jsonb -> 'recent_event_ids' ->> 0)".into(),
    }
}

/// A SQL condition on the row of person `id`.
fn row_holds(id: &str, condition: &str) -> String {
    format!("(SELECT count(*) FROM durable_state WHERE persistence_id = 'Person|{id}' AND {condition}) = 1")
}

fn e(id: &str) -> EventId {
    EventId::new(id).unwrap()
}

/// Expects `error` to be a corrupt row whose cause satisfies `cause`.
fn assert_corrupt(error: &StoreError, cause: impl FnOnce(&CorruptRow) -> bool) {
    match error {
        StoreError::Corrupt { source, .. } if cause(source) => {}
        other => panic!("expected a corrupt row of the expected cause, got {other:?}"),
    }
}

#[rstest]
#[actix::test]
async fn a_row_stored_at_version_1_loads_upgraded_through_each_step_with_its_event_ids(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    insert_row(
        &db,
        "ada",
        1,
        &json!({"name": "Ada Lovelace", "recent_event_ids": ["e1"]}),
    );

    let stored = store.load(&person("ada")).await.unwrap().expect("the row exists");

    assert_eq!(stored.revision, Revision(1));
    assert_eq!(stored.state, ada_upgraded());
    assert_eq!(
        stored.recent_event_ids,
        [e("e1")],
        "the machinery's field is kept apart from the upgrade"
    );
}

#[rstest]
#[actix::test]
async fn a_tombstone_stored_at_an_old_version_loads_as_the_default_state_without_upgrading(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    // A deletion holds no state: there is nothing for the upgrades to read.
    insert_row(&db, "ada", 1, &json!({"deleted": true, "recent_event_ids": ["e1"]}));

    let stored = store.load(&person("ada")).await.unwrap().expect("the row exists");

    assert_eq!(stored.state, Person::default());
    assert_eq!(stored.recent_event_ids, [e("e1")]);
}

#[rstest]
#[actix::test]
async fn an_actor_restores_the_upgraded_state_and_its_next_write_stores_version_3(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    insert_row(
        &db,
        "ada",
        1,
        &json!({"name": "Ada Lovelace", "recent_event_ids": ["e1"]}),
    );
    let people = Entities::<Person>::start(store.clone(), Config::default());
    let ada = person("ada");

    let read = people.send(ada.clone(), PersonCommand::Get).await.unwrap();
    assert_eq!(read, ada_upgraded());
    // A read writes nothing: the row stays at version 1 until a write.
    assert_sql(&db, &row_holds("ada", "state_schema_version = 1 AND revision = 1"));

    // e1, remembered beside the version 1 state, is recognised as redelivered.
    let redelivered = EntityEvent::from(PersonCommand::Visit).with_id(e("e1"));
    assert_eq!(people.send(ada.clone(), redelivered).await.unwrap(), ada_upgraded());
    assert_sql(&db, &row_holds("ada", "revision = 1"));

    let visited = people
        .send(ada.clone(), EntityEvent::from(PersonCommand::Visit).with_id(e("e2")))
        .await
        .unwrap();

    let expected = Person {
        visits: 1,
        ..ada_upgraded()
    };
    assert_eq!(visited, expected);
    assert_sql(&db, &row_holds("ada", "state_schema_version = 3 AND revision = 2"));
    let field = |key| payload_field(backend, key);
    for (key, value) in [
        ("first", "Ada"),
        ("family", "Lovelace"),
        ("greeting", "Hello, Ada"),
        ("visits", "1"),
    ] {
        assert_sql(&db, &row_holds("ada", &format!("{} = '{value}'", field(key))));
    }
    for gone in ["name", "last"] {
        assert_sql(&db, &row_holds("ada", &format!("{} IS NULL", field(gone))));
    }
    assert_sql(&db, &row_holds("ada", &format!("{} = 'e1'", first_event_id(backend))));
    // Read back at the current version, by another process.
    let stored = db.connect().await.load(&ada).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.state), (Revision(2), expected));
    assert_eq!(stored.recent_event_ids, [e("e1"), e("e2")]);
}

#[rstest]
#[actix::test]
async fn a_row_from_a_newer_schema_version_is_a_retryable_refusal_for_that_entity_alone(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    let future = json!({"first": "Grace", "family": "Hopper", "greeting": "Hi", "title": "Rear Admiral"});
    insert_row(&db, "grace", 9, &future);
    insert_row(&db, "ada", 1, &json!({"name": "Ada Lovelace"}));
    let people = Entities::<Person>::start(store.clone(), Config::default());
    let newer = |cause: &CorruptRow| matches!(cause, CorruptRow::NewerSchema { stored: 9, known: 3 });

    let loaded = store.load(&person("grace")).await.unwrap_err();
    assert_corrupt(&loaded, newer);

    let refused = people.send(person("grace"), PersonCommand::Visit).await.unwrap_err();
    match &refused {
        CommandError::NewerSchema { key, stored, known } => {
            assert_eq!(key, &person("grace"));
            assert_eq!((*stored, *known), (9, 3));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    assert!(
        refused.is_retryable(),
        "a newer release wrote it: retry once this node is upgraded"
    );
    // The others of the type, old and new, are served.
    let ada = people.send(person("ada"), PersonCommand::Visit).await.unwrap();
    assert_eq!(ada.visits, 1);
    people.send(person("alan"), PersonCommand::Visit).await.unwrap();
    // The newer row is untouched, not truncated to what this version knows.
    assert_sql(&db, &row_holds("grace", "state_schema_version = 9 AND revision = 1"));
    assert_sql(
        &db,
        &row_holds(
            "grace",
            &format!("{} = 'Rear Admiral'", payload_field(backend, "title")),
        ),
    );
    // And it is still refused.
    let again = people.send(person("grace"), PersonCommand::Get).await.unwrap_err();
    assert!(matches!(again, CommandError::NewerSchema { .. }), "{again:?}");
}

#[rstest]
#[actix::test]
async fn an_upgrade_step_that_fails_marks_that_row_corrupt(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    insert_row(&db, "plato", 1, &json!({"name": "Plato"}));
    insert_row(&db, "ada", 1, &json!({"name": "Ada Lovelace"}));
    let people = Entities::<Person>::start(store.clone(), Config::default());
    let failed_step = |cause: &CorruptRow| match cause {
        CorruptRow::Upgrade { from: 1, reason } => reason.contains("has no family name"),
        _ => false,
    };

    assert_corrupt(&store.load(&person("plato")).await.unwrap_err(), failed_step);
    match people.send(person("plato"), PersonCommand::Visit).await.unwrap_err() {
        CommandError::CorruptState { source, .. } => assert_corrupt(&source, failed_step),
        other => panic!("expected CorruptState, got {other:?}"),
    }
    assert_eq!(
        people.send(person("ada"), PersonCommand::Get).await.unwrap(),
        ada_upgraded()
    );
    assert_sql(&db, &row_holds("plato", "state_schema_version = 1 AND revision = 1"));
}

#[rstest]
#[actix::test]
async fn a_user_row_written_before_schema_versions_loads_unchanged_and_stays_at_version_1(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // The store migrates the fresh database.
    let store = db.connect().await;
    // As the previous release wrote it, naming no schema version: the default, 1.
    let payload = json!({"last_login": null, "last_cart_use": null, "recent_products": ["p1"],
                         "marketing_opt_in": true, "last_event_time": null, "recent_event_ids": ["e1"]});
    db.execute(&format!(
        "INSERT INTO durable_state \
         (persistence_id, entity_type, revision, db_timestamp, state_ser_id, state_ser_manifest, state_payload) \
         VALUES ('UserState|mall001-user001', 'UserState', 1, {at}, 1, 'UserState/v1', {payload})",
        at = timestamp_sql(backend),
        payload = payload_sql(backend, &payload),
    ));
    let user = UserKey::new("mall001", "user001").unwrap();

    let stored = store.load(&user).await.unwrap().unwrap();

    assert_eq!(UserState::SCHEMA_VERSION, 1);
    assert_eq!(stored.revision, Revision(1));
    assert!(stored.state.marketing_opt_in);
    assert_eq!(stored.state.recent_products[0].as_str(), "p1");
    assert_eq!(stored.recent_event_ids, [e("e1")]);
    let users = UserStates::start(store.clone(), Config::default());
    users
        .send(user.clone(), persist_durable::Command::UseCart)
        .await
        .unwrap();
    assert_sql(
        &db,
        "(SELECT count(*) FROM durable_state \
          WHERE persistence_id = 'UserState|mall001-user001' AND revision = 2 AND state_schema_version = 1) = 1",
    );
}

#[rstest]
#[actix::test]
async fn the_feed_upgrades_old_changes_as_it_reads_them_and_stops_at_a_newer_one(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db
        .connect_with(crate::common::test_store_config().with_change_feed(true))
        .await;
    insert_change(
        &db,
        "ada",
        1,
        1,
        &json!({"name": "Ada Lovelace", "recent_event_ids": ["e1"]}),
    );
    let alan = Person {
        first: "Alan".into(),
        visits: 1,
        ..Person::default()
    };
    // Written by the library: at version 3.
    store
        .write(&person("alan"), Revision::NONE, Revision(1), &alan)
        .await
        .unwrap();
    insert_change(&db, "grace", 1, 9, &json!({"first": "Grace"}));
    assert_sql(
        &db,
        "(SELECT count(*) FROM state_changes WHERE persistence_id = 'Person|alan' AND state_schema_version = 3) = 1",
    );
    let mut feed = EntityFeed::<Person>::from_position(store.clone(), 0);

    let changes = feed.next_batch().await.unwrap();

    let read: Vec<(u64, PersonId, Person)> = changes
        .into_iter()
        .map(|change| (change.position, change.key, change.state))
        .collect();
    assert_eq!(read, [(1, person("ada"), ada_upgraded()), (2, person("alan"), alan)]);
    match feed.next_batch().await.unwrap_err() {
        StoreError::CorruptChange { position, source, .. } => {
            assert_eq!(position, 3);
            assert!(
                matches!(source, CorruptRow::NewerSchema { stored: 9, known: 3 }),
                "{source:?}"
            );
        }
        other => panic!("expected the feed to stop at the newer change, got {other:?}"),
    }
}

/// The in-memory store keeps each row's schema version as the database stores do.
#[actix::test]
async fn the_memory_store_keeps_the_schema_version_of_each_row() {
    let memory = std::sync::Arc::new(MemoryStore::new());
    let store: SharedStore = memory.clone();
    let old = json!({"name": "Ada Lovelace", "recent_event_ids": ["e1"]});
    let write = |id: &str, version: u32, payload: &Value| WriteRow {
        erases: false,
        fence: None,
        timers: Vec::new(),
        fired: None,
        key: person(id).persistence_id(),
        manifest: Person::MANIFEST,
        expected: Revision::NONE,
        generation: None,
        revision: Revision(1),
        schema_version: version,
        payloads: vec![serde_json::to_vec(payload).unwrap()],
    };
    store.write_row(write("ada", 1, &old)).await.unwrap();
    store.write_row(write("grace", 4, &json!({}))).await.unwrap();

    let stored = store.load(&person("ada")).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.recent_event_ids), (ada_upgraded(), vec![e("e1")]));
    assert_eq!(
        store
            .load_row(&person("ada").persistence_id())
            .await
            .unwrap()
            .unwrap()
            .schema_version,
        1
    );
    assert_corrupt(&store.load(&person("grace")).await.unwrap_err(), |cause| {
        matches!(cause, CorruptRow::NewerSchema { stored: 4, known: 3 })
    });

    let people = Entities::<Person>::start(store.clone(), Config::default());
    people.send(person("ada"), PersonCommand::Visit).await.unwrap();
    let row = store.load_row(&person("ada").persistence_id()).await.unwrap().unwrap();
    assert_eq!((row.revision, row.schema_version), (Revision(2), 3));
}
