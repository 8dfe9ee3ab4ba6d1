//! actix-web routes for a [`UserStateManager`]: mount them in your own
//! application with [`configure`]. Feature `http` (on by default).
//!
//! | route | answers |
//! | --- | --- |
//! | `POST /malls/{mall_id}/users/{user_id}/commands` | the state after the command (JSON body tagged by `type`) |
//! | `GET /malls/{mall_id}/users/{user_id}` | the current state |
//! | `GET /healthz` | 200 when the database answers, else 503 |
//!
//! Errors: 400 with a JSON message for bad input, 409 for a conflict that
//! could not be resolved, 503 with `Retry-After` when the database is down or
//! the library is overloaded, 500 for a corrupt stored row.
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

use actix::Addr;
use actix_web::http::header::RETRY_AFTER;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::{Command, Event, UserKey, UserState};
use crate::entity::InvalidInput;
use crate::error::CommandError;
use crate::{SharedStore, UserStateManager, UserStates};

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
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route(
            "/malls/{mall_id}/users/{user_id}/commands",
            web::post().to(post_command),
        )
        .route("/malls/{mall_id}/users/{user_id}", web::get().to(get_state))
        .route("/healthz", web::get().to(healthz));
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

/// Why a request failed, as an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path or the body was not valid: 400.
    #[error(transparent)]
    BadRequest(#[from] InvalidInput),
    /// The command failed: the status depends on why.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The routes cannot reach the user states: 503.
    #[error("the user state manager is unavailable: {0}")]
    Unavailable(String),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Command(CommandError::Conflict { .. }) => StatusCode::CONFLICT,
            ApiError::Command(CommandError::CorruptState { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Command(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((RETRY_AFTER, "1"));
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
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

async fn post_command(
    request: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|e| InvalidInput::MalformedCommand {
        reason: format!("the body is not UTF-8: {e}"),
    })?;
    let event = Event::from_json(text)?;
    execute(&request, path.into_inner(), event).await
}

async fn get_state(request: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    execute(&request, path.into_inner(), Command::GetUserState.into()).await
}

async fn healthz(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    match users(&request)?.ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))),
        Err(error) => Ok(HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, "1"))
            .json(ErrorBody {
                error: error.to_string(),
            })),
    }
}
