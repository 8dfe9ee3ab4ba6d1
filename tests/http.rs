//! The actix-web routes: commands and state as JSON, and the status a client
//! expects for each failure.

mod common;

use actix::Actor;
use actix_web::http::StatusCode;
use actix_web::{test, web, App};
use common::{key, Backend, TestDb};
use persist_durable::{http, Config, Revision, SharedStore, UserState, UserStateManager};
use rstest::rstest;
use serde_json::{json, Value};

macro_rules! app {
    ($store:expr, $config:expr) => {{
        let store: SharedStore = $store;
        let manager = UserStateManager::new(store.clone(), $config).start();
        test::init_service(
            App::new()
                .app_data(web::Data::new(manager))
                .app_data(web::Data::new(store))
                .configure(http::configure),
        )
        .await
    }};
}

fn post(path: &str, body: &str) -> test::TestRequest {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .set_payload(body.to_owned())
}

#[rstest]
#[actix::test]
async fn every_command_is_answered_with_the_new_state_as_json(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let app = app!(db.connect().await, Config::default());
    let path = "/malls/mall001/users/user001/commands";

    for body in [
        r#"{"type": "user_login"}"#,
        r#"{"type": "use_cart"}"#,
        r#"{"type": "view_product", "product_id": "p1"}"#,
        r#"{"type": "set_marketing_opt_in", "opt_in": true, "event_id": "e-1", "event_time": "2026-11-20T09:00:00Z"}"#,
    ] {
        let response = test::call_service(&app, post(path, body).to_request()).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
    }
    let state: Value = test::call_and_read_body_json(
        &app,
        test::TestRequest::get()
            .uri("/malls/mall001/users/user001")
            .to_request(),
    )
    .await;

    assert_eq!(state["mall_id"], "mall001");
    assert_eq!(state["user_id"], "user001");
    assert!(state["last_login"].is_string() && state["last_cart_use"].is_string());
    assert_eq!(state["recent_products"], json!(["p1"]));
    assert_eq!(state["marketing_opt_in"], true);
    assert_eq!(
        db.connect()
            .await
            .load(&key("mall001", "user001"))
            .await
            .unwrap()
            .unwrap()
            .revision,
        Revision(4)
    );
}

#[rstest]
#[actix::test]
async fn bad_input_is_a_400_with_a_json_message_and_changes_nothing(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let app = app!(db.connect().await, Config::default());

    let cases = [
        ("/malls/mall001/users/user001/commands", "{not json"),
        (
            "/malls/mall001/users/user001/commands",
            r#"{"type": "delete_everything"}"#,
        ),
        (
            "/malls/mall001/users/user001/commands",
            r#"{"type": "view_product", "product_id": ""}"#,
        ),
        ("/malls/mall001/users/user001/commands", r#"{"type": "view_product"}"#),
        ("/malls/mall001/users/us%0Aer/commands", r#"{"type": "user_login"}"#),
        (
            &*format!("/malls/{}/users/u/commands", "m".repeat(200)),
            r#"{"type": "user_login"}"#,
        ),
    ];
    for (path, body) in cases {
        let response = test::call_service(&app, post(path, body).to_request()).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        let message: Value = test::read_body_json(response).await;
        assert!(message["error"].as_str().is_some_and(|m| !m.is_empty()), "{message}");
    }
    assert_eq!(db.connect().await.load(&key("mall001", "user001")).await.unwrap(), None);
}

#[rstest]
#[actix::test]
async fn an_unresolved_conflict_is_a_409(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let app = app!(store.clone(), Config::default().with_conflict_retries(0));
    let path = "/malls/mall001/users/user001/commands";
    test::call_service(&app, post(path, r#"{"type": "user_login"}"#).to_request()).await;
    // Another node writes the user behind this one's back.
    let other = db.connect().await;
    other
        .write(
            &key("mall001", "user001"),
            Revision(1),
            Revision(2),
            &UserState::default(),
        )
        .await
        .unwrap();

    let response = test::call_service(&app, post(path, r#"{"type": "use_cart"}"#).to_request()).await;

    assert_eq!(response.status(), StatusCode::CONFLICT);
}

#[rstest]
#[actix::test]
async fn a_database_that_is_down_is_a_503_with_retry_after(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let app = app!(db.connect().await, Config::default());
    let path = "/malls/mall001/users/user001/commands";

    db.make_unavailable();
    let command = test::call_service(&app, post(path, r#"{"type": "user_login"}"#).to_request()).await;
    let command_status = command.status();
    let retry_after = command.headers().get("retry-after").cloned();
    db.make_available();
    let recovered = test::call_service(&app, post(path, r#"{"type": "user_login"}"#).to_request()).await;

    assert_eq!(command_status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
    assert_eq!(recovered.status(), StatusCode::OK);
}

#[rstest]
#[actix::test]
async fn healthz_reports_whether_the_database_answers(#[values(Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let app = app!(db.connect().await, Config::default());
    let healthz = || test::TestRequest::get().uri("/healthz").to_request();

    assert_eq!(test::call_service(&app, healthz()).await.status(), StatusCode::OK);
    db.make_unavailable();
    let down = test::call_service(&app, healthz()).await.status();
    db.make_available();

    assert_eq!(down, StatusCode::SERVICE_UNAVAILABLE);
}

#[actix::test]
async fn an_overloaded_library_is_a_503() {
    let store: SharedStore = std::sync::Arc::new(persist_durable::MemoryStore::new());
    let app = app!(
        store,
        Config::default()
            .with_max_commands_in_flight(1)
            .with_max_queued_per_user(1)
    );
    let path = "/malls/mall001/users/user001/commands";

    let requests: Vec<_> = (0..20)
        .map(|_| test::call_service(&app, post(path, r#"{"type": "use_cart"}"#).to_request()))
        .collect();
    let statuses: Vec<StatusCode> = futures_util::future::join_all(requests)
        .await
        .iter()
        .map(|r| r.status())
        .collect();

    assert!(statuses.contains(&StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE));
}
