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
//! In a test, with actix-web's test utilities:
//!
//! ```
//! use actix::Actor;
//! use actix_web::{test, web, App};
//! use persist_durable::{http, Config, MemoryStore, SharedStore, UserStateManager};
//! use std::sync::Arc;
//!
//! #[actix::main]
//! async fn main() {
//!     let store: SharedStore = Arc::new(MemoryStore::new());
//!     let manager = UserStateManager::new(store.clone(), Config::default()).start();
//!     let app = test::init_service(
//!         App::new()
//!             .app_data(web::Data::new(manager))
//!             .app_data(web::Data::new(store))
//!             .configure(http::configure),
//!     )
//!     .await;
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
//! use actix::Actor;
//! use actix_web::{web, App, HttpServer};
//! use persist_durable::{http, Config, SqliteStore, UserStateManager};
//! use std::sync::Arc;
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let store: persist_durable::SharedStore =
//!         Arc::new(SqliteStore::open("user-state.db").await.map_err(std::io::Error::other)?);
//!     let manager = UserStateManager::new(store.clone(), Config::default()).start();
//!     HttpServer::new(move || {
//!         App::new()
//!             .app_data(web::Data::new(manager.clone()))
//!             .app_data(web::Data::new(store.clone()))
//!             .configure(http::configure)
//!     })
//!     .bind("127.0.0.1:8080")?
//!     .run()
//!     .await
//! }
//! ```

use actix::Addr;
use actix_web::http::header::RETRY_AFTER;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::{Command, Event, UserKey, UserState};
use crate::error::{CommandError, InvalidInput};
use crate::{SharedStore, UserCommand, UserStateManager};

/// Registers the routes. The application must provide
/// `web::Data<Addr<UserStateManager>>`, and `web::Data<SharedStore>` for `/healthz`.
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
    /// The manager could not be reached: 503.
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

async fn execute(
    manager: &Addr<UserStateManager>,
    path: (String, String),
    event: Event,
) -> Result<HttpResponse, ApiError> {
    let key = UserKey::new(path.0, path.1)?;
    let state = manager
        .send(UserCommand::new(key.clone(), event))
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))??;
    Ok(HttpResponse::Ok().json(StateResponse {
        mall_id: key.mall_id().to_owned(),
        user_id: key.user_id().to_owned(),
        state,
    }))
}

async fn post_command(
    manager: web::Data<Addr<UserStateManager>>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|e| InvalidInput::MalformedCommand {
        reason: format!("the body is not UTF-8: {e}"),
    })?;
    let event = Event::from_json(text)?;
    execute(&manager, path.into_inner(), event).await
}

async fn get_state(
    manager: web::Data<Addr<UserStateManager>>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    execute(&manager, path.into_inner(), Command::GetUserState.into()).await
}

async fn healthz(store: web::Data<SharedStore>) -> HttpResponse {
    match store.ping().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })),
        Err(error) => HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, "1"))
            .json(ErrorBody {
                error: error.to_string(),
            }),
    }
}
