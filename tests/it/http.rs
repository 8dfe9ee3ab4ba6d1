//! The actix-web routes: commands and state as JSON, and the status a client
//! expects for each failure.

use crate::common::{key, Backend, TestDb};
use actix::Actor;
use actix_web::http::StatusCode;
use actix_web::{test, web, App};
use persist_durable::{http, Config, Revision, SharedStore, StateStoreExt, UserState, UserStateManager};
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
async fn delete_erases_the_user_and_answers_the_default_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let app = app!(store.clone(), Config::default());
    let user = "/malls/mall001/users/user001";
    let body = r#"{"type": "view_product", "product_id": "p1"}"#;
    let response = test::call_service(&app, post(&format!("{user}/commands"), body).to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);

    let deleted: Value = test::call_and_read_body_json(&app, test::TestRequest::delete().uri(user).to_request()).await;
    let never_seen = test::call_service(
        &app,
        test::TestRequest::delete()
            .uri("/malls/mall001/users/nobody")
            .to_request(),
    )
    .await;

    assert_eq!(deleted["recent_products"], json!([]));
    assert_eq!(deleted["user_id"], "user001");
    assert_eq!(
        never_seen.status(),
        StatusCode::OK,
        "a delete of a user never seen is a committed tombstone"
    );
    let stored = store
        .load(&crate::common::key("mall001", "user001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.revision, stored.deleted), (Revision(2), true));
    let after: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri(user).to_request()).await;
    assert_eq!(after["recent_products"], json!([]));
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
        ("/malls//users/user001/commands", r#"{"type": "user_login"}"#),
        ("/malls/mall001/users//commands", r#"{"type": "user_login"}"#),
        ("/malls/mall001/users/user%FF/commands", r#"{"type": "user_login"}"#),
        ("/malls/mall%C3/users/user001/commands", r#"{"type": "user_login"}"#),
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

#[actix::test]
async fn an_empty_id_in_a_state_path_is_a_400_not_a_404() {
    let app = app!(memory(), Config::default());
    for (method, path) in [
        (test::TestRequest::get(), "/malls/mall001/users/"),
        (test::TestRequest::get(), "/malls//users/user001"),
        (test::TestRequest::delete(), "/malls//users/user001"),
    ] {
        let response = test::call_service(&app, method.uri(path).to_request()).await;
        assert_json_error(response, StatusCode::BAD_REQUEST, path).await;
    }
}

#[actix::test]
async fn ids_whose_bytes_are_not_utf8_are_refused_rather_than_merged_into_one_user() {
    let app = app!(memory(), Config::default());
    // actix-web's own decoding would read both as `user\u{FFFD}`: one user for two ids.
    for path in ["/malls/mall001/users/user%FE", "/malls/mall001/users/user%FF"] {
        let response = test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
        let status = response.status();
        let message: Value = test::read_body_json(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            message["error"], "the user id is not UTF-8 once percent-decoded",
            "{path}"
        );
    }
    // Percent-encoded UTF-8, `/` included, is an id like any other.
    let path = "/malls/mall%2F1/users/j%C3%BCrgen";
    let state: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri(path).to_request()).await;
    assert_eq!(
        (&state["mall_id"], &state["user_id"]),
        (&json!("mall/1"), &json!("jürgen"))
    );
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
    // One shard, on this thread: all 20 arrive before the first is answered.
    let app = app!(
        store,
        Config::default()
            .with_arbiters(0)
            .with_max_commands_in_flight(1)
            .with_max_queued_per_entity(1)
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

/// An application serving only the routes, on a memory store: `App::new().configure(http::routes(users))`.
macro_rules! routes_app {
    ($store:expr) => {{
        let store: SharedStore = $store;
        let users = persist_durable::UserStates::start(store, Config::default());
        test::init_service(App::new().configure(http::routes(users))).await
    }};
}

/// Asserts `response` has `status` and a JSON body `{"error": "<non-empty message>"}`.
async fn assert_json_error(response: actix_web::dev::ServiceResponse, status: StatusCode, case: &str) {
    assert_eq!(response.status(), status, "{case}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"), "{case}");
    let body: Value = test::read_body_json(response).await;
    assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()), "{case}: {body}");
}

fn memory() -> SharedStore {
    std::sync::Arc::new(persist_durable::MemoryStore::new())
}

#[actix::test]
async fn a_command_body_declared_as_another_type_than_json_is_a_415_and_changes_nothing() {
    let store = memory();
    let app = routes_app!(store.clone());
    let path = "/malls/mall001/users/user001/commands";

    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "not a type",
    ] {
        let request = test::TestRequest::post()
            .uri(path)
            .insert_header(("content-type", content_type))
            .set_payload(r#"{"type": "user_login"}"#)
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_json_error(response, StatusCode::UNSUPPORTED_MEDIA_TYPE, content_type).await;
    }

    assert_eq!(store.load(&key("mall001", "user001")).await.unwrap(), None);
}

#[actix::test]
async fn json_with_parameters_a_json_suffix_or_no_content_type_at_all_is_accepted() {
    let app = routes_app!(memory());
    let path = "/malls/mall001/users/user001/commands";

    for content_type in [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/vnd.api+json"),
        None,
    ] {
        let mut request = test::TestRequest::post()
            .uri(path)
            .set_payload(r#"{"type": "user_login"}"#);
        if let Some(content_type) = content_type {
            request = request.insert_header(("content-type", content_type));
        }
        let response = test::call_service(&app, request.to_request()).await;
        assert_eq!(response.status(), StatusCode::OK, "{content_type:?}");
    }
}

#[actix::test]
async fn a_body_over_the_size_limit_is_a_413_with_a_json_message() {
    let store = memory();
    let app = routes_app!(store.clone());
    let path = "/malls/mall001/users/user001/commands";
    // Over actix-web's default limit of 256 KiB.
    let big = format!(r#"{{"type": "view_product", "product_id": "{}"}}"#, "p".repeat(300_000));

    let response = test::call_service(&app, post(path, &big).to_request()).await;
    assert_json_error(response, StatusCode::PAYLOAD_TOO_LARGE, "default limit").await;

    // An application that sets its own limit gets it, with the same answer.
    let users = persist_durable::UserStates::start(store.clone(), Config::default());
    let small = test::init_service(
        App::new()
            .app_data(web::PayloadConfig::new(1024))
            .configure(http::routes(users)),
    )
    .await;
    let body = format!(r#"{{"type": "view_product", "product_id": "{}"}}"#, "p".repeat(2_000));
    let response = test::call_service(&small, post(path, &body).to_request()).await;
    assert_json_error(response, StatusCode::PAYLOAD_TOO_LARGE, "limit of 1 KiB").await;

    assert_eq!(store.load(&key("mall001", "user001")).await.unwrap(), None);
}

#[actix::test]
async fn an_unknown_route_is_a_404_with_a_json_message_and_the_applications_own_routes_still_answer() {
    let users = persist_durable::UserStates::start(memory(), Config::default());
    let app = test::init_service(
        App::new()
            .configure(http::routes(users))
            .route("/metrics", web::get().to(|| async { "metrics" })),
    )
    .await;

    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/malls/mall001/users/user001/unknown"),
        ("GET", "/malls/mall001/users"),
    ] {
        let request = test::TestRequest::default()
            .method(method.parse().unwrap())
            .uri(path)
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_json_error(response, StatusCode::NOT_FOUND, &format!("{method} {path}")).await;
    }
    let metrics = test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(metrics.status(), StatusCode::OK, "a route mounted after ours");
}

#[actix::test]
async fn a_known_route_with_a_wrong_method_is_a_405_with_a_json_message() {
    let app = routes_app!(memory());

    for (method, path) in [
        ("GET", "/malls/mall001/users/user001/commands"),
        ("PUT", "/malls/mall001/users/user001/commands"),
        ("PUT", "/malls/mall001/users/user001"),
        ("POST", "/healthz"),
    ] {
        let request = test::TestRequest::default()
            .method(method.parse().unwrap())
            .uri(path)
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_json_error(response, StatusCode::METHOD_NOT_ALLOWED, &format!("{method} {path}")).await;
    }
}

#[actix::test]
async fn the_routes_mounted_with_configure_answer_404_and_405_as_json_too() {
    let app = app!(memory(), Config::default());

    let unknown = test::call_service(&app, test::TestRequest::get().uri("/nope").to_request()).await;
    assert_json_error(unknown, StatusCode::NOT_FOUND, "GET /nope").await;
    let wrong_method = test::call_service(&app, test::TestRequest::post().uri("/healthz").to_request()).await;
    assert_json_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "POST /healthz").await;
}

/// An application's own JSON route, as a team writes one.
#[derive(Debug, serde::Deserialize)]
struct Watch {
    product_id: String,
}

async fn watch(body: web::Json<Watch>) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok().body(body.into_inner().product_id)
}

/// Before, the application's own routes answered a malformed body in
/// actix's plain text (400), a form body with 400, and another method with
/// a bare 404: not as the library's routes answer.
#[actix::test]
async fn an_applications_own_routes_answer_bad_bodies_and_methods_as_the_librarys_do() {
    let app = App::new()
        .app_data(http::json_config())
        .service(http::resource("/watches", "POST").route(web::post().to(watch)));
    let app = test::init_service(app).await;
    let post = |body: &str| test::TestRequest::post().uri("/watches").set_payload(body.to_owned());
    let own = |body: &str| post(body).insert_header(("content-type", "application/json"));

    let ok = test::call_service(&app, own(r#"{"product_id": "p1"}"#).to_request()).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let malformed = test::call_service(&app, own("{not json").to_request()).await;
    assert_json_error(malformed, StatusCode::BAD_REQUEST, "malformed").await;
    let form = post("product_id=p1").insert_header(("content-type", "application/x-www-form-urlencoded"));
    let form = test::call_service(&app, form.to_request()).await;
    assert_json_error(form, StatusCode::UNSUPPORTED_MEDIA_TYPE, "form").await;
    let oversized = format!(r#"{{"product_id": "{}"}}"#, "x".repeat(http::JSON_BODY_LIMIT));
    let oversized = test::call_service(&app, own(&oversized).to_request()).await;
    assert_json_error(oversized, StatusCode::PAYLOAD_TOO_LARGE, "oversized").await;
    let wrong_method = test::call_service(&app, test::TestRequest::get().uri("/watches").to_request()).await;
    assert_eq!(wrong_method.headers().get("allow").unwrap(), "POST");
    assert_json_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "method").await;
}
