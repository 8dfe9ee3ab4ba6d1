//! What a team adopting the library writes for its own entity: a wishlist
//! keyed by the ready `Id`, with settings given at start, a domain refusal,
//! tests on the testkit, actix-web handlers answering with `?`, and a
//! graceful stop.

use std::time::Duration;

use actix_web::{test as web_test, web, App, HttpResponse};
use chrono::{DateTime, Utc};
use persist_durable::http::ApiError;
use persist_durable::prelude::*;
use persist_durable::testkit::{TestEntities, TestStore};
use persist_durable::EntityFeed;
use serde_json::{json, Value};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Wishlist {
    items: Vec<String>,
}

#[derive(Debug, Clone)]
enum WishlistCommand {
    Add(String),
    Get,
    Explode,
}

/// The application's own knob, given at start.
#[derive(Debug, Clone)]
struct WishlistSettings {
    max_items: usize,
}

impl Default for WishlistSettings {
    fn default() -> Self {
        Self { max_items: 100 }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("the wishlist is full ({0} items)")]
struct Full(usize);

impl DurableEntity for Wishlist {
    const ENTITY_TYPE: &'static str = "Wishlist";
    const MANIFEST: &'static str = "Wishlist/v1";
    type Key = Id<Wishlist>;
    type Command = WishlistCommand;
    type Settings = WishlistSettings;
    type Rejection = Full;

    fn apply(
        &self,
        command: &WishlistCommand,
        _: DateTime<Utc>,
        settings: &WishlistSettings,
    ) -> Result<Option<Self>, Full> {
        match command {
            WishlistCommand::Add(_) if self.items.len() >= settings.max_items => Err(Full(settings.max_items)),
            WishlistCommand::Add(item) => {
                let mut items = self.items.clone();
                items.push(item.clone());
                Ok(Some(Wishlist { items }))
            }
            WishlistCommand::Get => Ok(None),
            WishlistCommand::Explode => panic!("the wishlist's own code panicked"),
        }
    }
}

fn wishlist(id: &str) -> Id<Wishlist> {
    Id::new(id).expect("a valid id")
}

#[actix::test]
async fn the_testkit_passivates_an_idle_entity_and_restores_it_from_its_row() {
    let store = TestStore::sqlite().await.unwrap();
    let wishlists = TestEntities::<Wishlist>::start(&store);
    let anna = wishlist("anna");
    wishlists
        .send(anna.clone(), WishlistCommand::Add("lamp".into()))
        .await
        .unwrap();
    assert!(wishlists.is_resident(&anna).await);

    wishlists.advance(Duration::from_secs(29 * 60)).await;
    assert!(wishlists.is_resident(&anna).await, "not idle for 30 minutes yet");
    wishlists.advance(Duration::from_secs(6 * 60)).await;
    wishlists.until_passivated(&anna).await;

    let row = store.row(&anna).await.unwrap().expect("anna is stored");
    assert_eq!(row.revision, Revision(1));
    assert_eq!(row.schema_version, 1);
    assert_eq!(row.payload["items"], json!(["lamp"]));

    let restored = wishlists.send(anna.clone(), WishlistCommand::Get).await.unwrap();
    assert_eq!(restored.items, vec!["lamp".to_string()]);
    wishlists.until_resident(&anna).await;
}

#[actix::test]
async fn the_testkit_waits_for_the_change_feed_to_reach_a_position() {
    let store = TestStore::memory_with_feed();
    let wishlists = TestEntities::<Wishlist>::start(&store);
    for item in ["lamp", "rug", "vase"] {
        wishlists
            .send(wishlist("anna"), WishlistCommand::Add(item.into()))
            .await
            .unwrap();
    }
    store.until_feed_reaches(3).await;

    let mut feed = EntityFeed::<Wishlist>::from_position(store.shared(), 0);
    let changes = feed.next_batch().await.unwrap();
    let revisions: Vec<u64> = changes.iter().map(|change| change.revision.0).collect();
    assert_eq!(revisions, vec![1, 2, 3]);
    assert_eq!(changes[2].state.items.len(), 3);
}

#[actix::test]
async fn the_testkit_gives_a_postgres_test_a_fresh_database_of_its_own() {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => url,
        _ if std::env::var_os("PERSIST_DURABLE_REQUIRE_POSTGRES").is_some() => {
            panic!("PERSIST_DURABLE_REQUIRE_POSTGRES is set but DATABASE_URL is not a PostgreSQL URL")
        }
        _ => {
            eprintln!("SKIPPED a PostgreSQL test: set DATABASE_URL to a postgres:// URL");
            return;
        }
    };
    let first = TestStore::postgres(&url).await.unwrap();
    let second = TestStore::postgres(&url).await.unwrap();
    let anna = wishlist("anna");
    let wishlists = TestEntities::<Wishlist>::start(&first);
    wishlists
        .send(anna.clone(), WishlistCommand::Add("lamp".into()))
        .await
        .unwrap();

    assert_eq!(first.row(&anna).await.unwrap().unwrap().revision, Revision(1));
    assert_eq!(
        second.row(&anna).await.unwrap(),
        None,
        "each test store is a database of its own"
    );
}

#[test]
fn a_ready_id_refuses_bad_input_in_its_constructor() {
    for bad in ["", "tab\there", "nul\0", &"x".repeat(129)] {
        let error = Id::<Wishlist>::new(bad).expect_err(bad);
        assert!(error.to_string().contains("wishlist id"), "{error}");
    }
    assert!(
        serde_json::from_str::<Id<Wishlist>>("\"\"").is_err(),
        "nor does serde let one in"
    );
    let id = Id::<Wishlist>::new("anna").unwrap();
    assert_eq!(id.as_str(), "anna");
    assert_eq!(id.persistence_id().as_str(), "Wishlist|anna");
}

#[actix::test]
async fn settings_given_at_start_reach_the_entitys_apply() {
    let store = TestStore::memory();
    let settings = WishlistSettings { max_items: 2 };
    let wishlists = TestEntities::<Wishlist>::start_with(&store, Config::default(), settings);
    let anna = wishlist("anna");
    for item in ["lamp", "rug"] {
        wishlists
            .send(anna.clone(), WishlistCommand::Add(item.into()))
            .await
            .unwrap();
    }
    let refused = wishlists.send(anna.clone(), WishlistCommand::Add("vase".into())).await;
    assert!(
        matches!(&refused, Err(CommandError::Rejected { reason: Full(2), .. })),
        "{refused:?}"
    );
    assert_eq!(store.row(&anna).await.unwrap().unwrap().revision, Revision(2));
}

#[actix::test]
async fn a_graceful_stop_commits_and_answers_every_queued_write_before_it_returns() {
    let store = TestStore::sqlite().await.unwrap();
    let wishlists = TestEntities::<Wishlist>::start(&store);
    let sends: Vec<_> = (0..50)
        .map(|n| {
            let (wishlists, key) = ((*wishlists).clone(), wishlist(&format!("user{}", n % 5)));
            actix::spawn(async move { wishlists.send(key, WishlistCommand::Add(format!("item{n}"))).await })
        })
        .collect();
    tokio::task::yield_now().await;

    wishlists.stop().await.unwrap();

    let mut acknowledged = 0;
    for send in sends {
        match send.await.unwrap() {
            Ok(_) => acknowledged += 1,
            Err(CommandError::NotDelivered { .. }) => {} // sent after the stop began
            Err(other) => panic!("a queued write failed: {other:?}"),
        }
    }
    let mut stored = 0;
    for user in 0..5 {
        if let Some(row) = store.row(&wishlist(&format!("user{user}"))).await.unwrap() {
            stored += row.payload["items"].as_array().unwrap().len();
        }
    }
    assert_eq!(stored, acknowledged, "every acknowledged write is stored, nothing else");
    assert!(acknowledged > 0);
    for user in 0..5 {
        assert!(!wishlists.is_resident(&wishlist(&format!("user{user}"))).await);
    }
    let after = wishlists.send(wishlist("user0"), WishlistCommand::Get).await;
    assert!(matches!(after, Err(CommandError::NotDelivered { .. })), "{after:?}");
}

/// The application's own route, `?` on the key and on the command.
async fn add_item(
    wishlists: web::Data<Entities<Wishlist>>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, item) = path.into_inner();
    let command = if item == "explode" {
        WishlistCommand::Explode
    } else {
        WishlistCommand::Add(item)
    };
    let state = wishlists.send(Id::new(id)?, command).await?;
    Ok(HttpResponse::Ok().json(state))
}

#[actix::test]
async fn an_applications_own_handler_answers_every_error_kind_with_its_status_and_json_body() {
    let store = TestStore::sqlite().await.unwrap();
    let wishlists = TestEntities::<Wishlist>::start_with(&store, Config::default(), WishlistSettings { max_items: 1 });
    let app = web_test::init_service(
        App::new()
            .app_data(web::Data::new((*wishlists).clone()))
            .route("/wishlists/{id}/items/{item}", web::post().to(add_item)),
    )
    .await;
    let post = async |path: &str| {
        let request = web_test::TestRequest::post().uri(path).to_request();
        let response = web_test::call_service(&app, request).await;
        let status = response.status().as_u16();
        let body: Value = web_test::read_body_json(response).await;
        (status, body)
    };

    let (status, body) = post("/wishlists/anna/items/lamp").await;
    assert_eq!((status, &body["items"]), (200, &json!(["lamp"])));

    let (status, body) = post("/wishlists/anna/items/rug").await;
    assert_eq!(status, 422);
    assert_eq!(
        body,
        json!({"error": "the wishlist is full (1 items)", "kind": "rejected", "retryable": false})
    );

    let (status, body) = post("/wishlists/%09tab/items/rug").await;
    assert_eq!(
        (status, &body["kind"], &body["retryable"]),
        (400, &json!("bad_request"), &json!(false))
    );
    assert!(body["error"].as_str().unwrap().contains("wishlist id"), "{body}");

    let (status, body) = post("/wishlists/bob/items/explode").await;
    assert_eq!(
        (status, &body["kind"], &body["retryable"]),
        (500, &json!("panicked"), &json!(false))
    );

    wishlists.stop().await.unwrap();
    let (status, body) = post("/wishlists/anna/items/vase").await;
    assert_eq!(
        (status, &body["kind"], &body["retryable"]),
        (503, &json!("not_delivered"), &json!(true))
    );
}

/// Before, `stop()` returned while a retention purge held commands for the
/// rows it was deleting; once the delete answered, actors started after the
/// drain applied them. Now they are answered `NotDelivered`, never applied.
#[actix::test]
async fn a_graceful_stop_during_a_purge_applies_none_of_the_commands_the_purge_holds() {
    let Some(db) = crate::common::TestDb::open(crate::common::Backend::Postgres).await else {
        return;
    };
    let store = db.connect().await;
    // One shard, on this thread: messages to it arrive in the order sent.
    let config = Config::default()
        .with_arbiters(0)
        .with_retention(Some(Duration::from_secs(400 * 24 * 60 * 60)));
    let wishlists = Entities::<Wishlist>::start(store.clone(), config);
    let idle = wishlist("idle");
    store
        .write(&idle, Revision::NONE, Revision(1), &Wishlist::default())
        .await
        .unwrap();
    crate::common::age(&db, std::slice::from_ref(&idle));
    let row_lock = db.lock_row(&idle);
    // The purge's delete waits for the row lock; a command for the row is held meanwhile.
    let purge = actix::spawn({
        let wishlists = wishlists.clone();
        async move { wishlists.purge_idle().await }
    });
    while !db.someone_waits_for_a_lock() {
        tokio::task::yield_now().await;
    }
    let held = actix::spawn({
        let (wishlists, idle) = (wishlists.clone(), idle.clone());
        async move { wishlists.send(idle, WishlistCommand::Add("after".into())).await }
    });
    tokio::task::yield_now().await;

    let stopped = actix::spawn({
        let wishlists = wishlists.clone();
        async move { wishlists.stop().await }
    });
    // Released only once the shard drains: a command sent now is not delivered.
    while wishlists.send(wishlist("probe"), WishlistCommand::Get).await.is_ok() {}
    drop(row_lock);
    stopped.await.unwrap().unwrap();

    let answer = held.await.unwrap();
    assert!(matches!(answer, Err(CommandError::NotDelivered { .. })), "{answer:?}");
    assert_eq!(purge.await.unwrap().unwrap(), 1, "the purge itself completes");
    assert!(
        store.load(&idle).await.unwrap().is_none(),
        "nothing applied after the purge"
    );
}
