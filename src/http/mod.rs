//! actix-web routes for a [`UserStateManager`]: mount them in your own
//! application with [`configure`]. Feature `http` (on by default).
//!
//! | route | answers |
//! | --- | --- |
//! | `POST /malls/{mall_id}/users/{user_id}/commands` | the state after the command (JSON body tagged by `type`) |
//! | `GET /malls/{mall_id}/users/{user_id}` | the current state |
//! | `DELETE /malls/{mall_id}/users/{user_id}` | erases the user (a tombstone is committed); answers the default state, also for a user never seen |
//! | `GET /healthz` | 200 when the database answers, else 503 |
//!
//! Every error is answered with a JSON body `{"error": ..., "kind": ...,
//! "retryable": ...}`; [`ApiError`] has the table of statuses, and an
//! application's own handlers, for any entity, return it with `?`. Its own
//! routes answer bad JSON bodies and other methods the same way with
//! [`json_config`] and [`resource`].
//!
//! The 404 is the application's default service, which [`routes`] and
//! [`configure`] set (an application that wants its own calls
//! `App::default_service` after mounting them); routes the application adds
//! itself, before or after, are unaffected. [`not_found`] is the same
//! answer, for an application that mounts its own default service or scopes.
//!
//! Mount them with [`routes`], handing them the typed handle they serve;
//! they need nothing else from the application:
//!
//! ```
//! use actix_web::{test, App};
//! use persist_durable::{http, Config, MemoryStore, UserStates};
//! use std::sync::Arc;
//!
//! #[actix::main]
//! async fn main() {
//!     let users = UserStates::start(Arc::new(MemoryStore::new()), Config::default());
//!     let app = test::init_service(App::new().configure(http::routes(users))).await;
//!     let request = test::TestRequest::post()
//!         .uri("/malls/mall001/users/user001/commands")
//!         .set_payload(r#"{"type": "view_product", "product_id": "p1"}"#)
//!         .to_request();
//!     let state: serde_json::Value = test::call_and_read_body_json(&app, request).await;
//!     assert_eq!(state["recent_products"][0], "p1");
//! }
//! ```
//!
//! In a server:
//!
//! ```no_run
//! use actix_web::{App, HttpServer};
//! use persist_durable::{http, Config, SqliteStore, UserStates};
//! use std::sync::Arc;
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let store = SqliteStore::open("user-state.db").await.map_err(std::io::Error::other)?;
//!     let users = UserStates::start(Arc::new(store), Config::default());
//!     HttpServer::new(move || App::new().configure(http::routes(users.clone())))
//!         .bind("127.0.0.1:8080")?
//!         .run()
//!         .await
//! }
//! ```
//!
//! Applications written before [`routes`] existed mount [`configure`] and
//! provide `web::Data<Addr<UserStateManager>>` and `web::Data<SharedStore>`
//! themselves; it serves the same routes.

use std::borrow::Cow;

use actix::Addr;
use actix_web::error::PayloadError;
use actix_web::http::header::{CONTENT_TYPE, RETRY_AFTER};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use percent_encoding::percent_decode_str;
use serde::Serialize;

use crate::domain::key::{MALL_ID, USER_ID};
use crate::domain::{Command, Event, UserKey, UserState};
use crate::entity::InvalidInput;
use crate::{SharedStore, UserStateManager, UserStates};

mod error;
mod forwarding;
mod own_routes;

pub use error::{ApiError, CommandFailure};
pub use forwarding::{cluster_routes, forward_to_owners, Forwardable};
pub use own_routes::{json_config, resource, JSON_BODY_LIMIT};

/// The routes, serving `users`: `App::new().configure(http::routes(users))`.
pub fn routes(users: UserStates) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config.app_data(web::Data::new(users));
        configure(config);
    }
}

/// Registers the routes without their state: the application provides
/// either `web::Data<UserStates>` or, as before [`routes`] existed, both
/// `web::Data<Addr<UserStateManager>>` and `web::Data<SharedStore>`.
///
/// Also sets the application's default service to [`not_found`], so that
/// every error, the router's included, is answered with a JSON body.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(resource(&format!("{USER}/commands"), "POST").route(web::post().to(post_command)))
        .service(
            resource(USER, "GET, DELETE")
                .route(web::get().to(get_state))
                .route(web::delete().to(delete_user)),
        )
        .service(resource("/healthz", "GET").route(web::get().to(healthz)))
        .default_service(web::to(not_found));
}

/// A user's route. An empty id matches too, so that it is answered as the
/// bad input it is (400), not as a path no route takes (404).
const USER: &str = "/malls/{mall_id:[^/]*}/users/{user_id:[^/]*}";

/// The mall and user ids of a user's route, percent-decoded from the
/// request's raw path; `after` is the number of segments after the user id.
/// actix-web's own decoding replaces bytes that are not UTF-8 with U+FFFD,
/// under which `%FE` and `%FF` would name one user: such an id is refused.
fn path_ids(request: &HttpRequest, after: usize) -> Result<(String, String), InvalidInput> {
    // An id's `/` is still `%2F` here, so the segments are the route's.
    let mut segments = request.uri().path().rsplit('/').skip(after);
    let (user_id, _users, mall_id) = (segments.next(), segments.next(), segments.next());
    let decode = |raw: Option<&str>, field| {
        percent_decode_str(raw.unwrap_or_default())
            .decode_utf8()
            .map(Cow::into_owned)
            .map_err(|_| InvalidInput::NotUtf8 { field })
    };
    Ok((decode(mall_id, MALL_ID)?, decode(user_id, USER_ID)?))
}

/// The answer to a request no route takes: 404 with a JSON body. [`routes`]
/// and [`configure`] make it the application's default service; mount it
/// yourself with `App::default_service(web::to(http::not_found))` or on a
/// scope.
pub async fn not_found(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound {
        method: request.method().to_string(),
        path: request.path().to_owned(),
    })
}

/// A user's state as the routes answer it.
#[derive(Debug, Serialize)]
pub struct StateResponse {
    /// The mall.
    pub mall_id: String,
    /// The user.
    pub user_id: String,
    /// The state's fields.
    #[serde(flatten)]
    pub state: UserState,
}

/// The handle the routes serve: given by [`routes`], or put together from
/// the two entries [`configure`]'s applications provide.
fn users(request: &HttpRequest) -> Result<UserStates, ApiError> {
    if let Some(users) = request.app_data::<web::Data<UserStates>>() {
        return Ok(users.get_ref().clone());
    }
    let manager = request.app_data::<web::Data<Addr<UserStateManager>>>();
    let store = request.app_data::<web::Data<SharedStore>>();
    match (manager, store) {
        (Some(manager), Some(store)) => Ok(UserStates::new(manager.get_ref().clone(), store.get_ref().clone())),
        _ => Err(ApiError::Unavailable(
            "the routes were mounted without their state: use http::routes(users)".into(),
        )),
    }
}

async fn execute(request: &HttpRequest, path: (String, String), event: Event) -> Result<HttpResponse, ApiError> {
    let key = UserKey::new(path.0, path.1)?;
    let state = users(request)?.send(key.clone(), event).await?;
    Ok(HttpResponse::Ok().json(StateResponse {
        mall_id: key.mall_id().to_owned(),
        user_id: key.user_id().to_owned(),
        state,
    }))
}

/// Refuses a body declared as anything but JSON; one declared as nothing is
/// read as JSON.
fn require_json(request: &HttpRequest) -> Result<(), ApiError> {
    let Some(declared) = request.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let json = request.mime_type().ok().flatten().is_some_and(|mime| {
        mime.type_() == "application" && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"))
    });
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            String::from_utf8_lossy(declared.as_bytes()).into_owned(),
        ))
    }
}

/// Why the body could not be had, as an answer.
fn body_error(error: actix_web::Error) -> ApiError {
    match error.as_error::<PayloadError>() {
        Some(PayloadError::Overflow) => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest(InvalidInput::MalformedCommand {
            reason: format!("the body could not be read: {error}"),
        }),
    }
}

async fn post_command(
    request: HttpRequest,
    body: Result<web::Bytes, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let ids = path_ids(&request, 1)?;
    require_json(&request)?;
    let body = body.map_err(body_error)?;
    let text = std::str::from_utf8(&body).map_err(|e| InvalidInput::MalformedCommand {
        reason: format!("the body is not UTF-8: {e}"),
    })?;
    let event = Event::from_json(text)?;
    execute(&request, ids, event).await
}

/// Erases the user; answers the state after it, the default one.
async fn delete_user(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    execute(&request, path_ids(&request, 0)?, Command::DeleteUser.into()).await
}

async fn get_state(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    execute(&request, path_ids(&request, 0)?, Command::GetUserState.into()).await
}

async fn healthz(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    match users(&request)?.ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))),
        Err(error) => Ok(HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, "1"))
            .json(serde_json::json!({ "error": error.to_string(), "kind": "store_unavailable", "retryable": true }))),
    }
}
