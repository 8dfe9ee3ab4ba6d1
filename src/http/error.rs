//! HTTP answers for every failure, of any entity: [`ApiError`], which an
//! application's own actix-web handlers return with `?` on a
//! [`CommandError`] of any entity or an [`InvalidInput`].
//!
//! Every answer has the JSON body `{"error": "<message>", "kind": "<kind>", "retryable": <bool>}`.

use actix_web::http::header::{ALLOW, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::entity::{DurableEntity, InvalidInput};
use crate::error::CommandError;

/// Why a request failed, as an HTTP answer with a JSON body
/// `{"error": "<message>", "kind": "<kind>", "retryable": <bool>}`:
///
/// | status | `kind` | retryable | when |
/// | --- | --- | --- | --- |
/// | 400 | `bad_request`, `invalid_key` | no | bad input: an id that is empty, over 128 bytes, holds a control character or is not UTF-8 once percent-decoded; bad JSON; a command over 16 KiB; a key that does not read back |
/// | 404 | `not_found` | no | no route at this path |
/// | 405 | `method_not_allowed` | no | a route that does not take this method (with `Allow`) |
/// | 409 | `conflict` | yes | a conflict the actor's retries could not resolve |
/// | 413 | `payload_too_large` | no | a body over the size limit: actix-web's [`web::PayloadConfig`](actix_web::web::PayloadConfig), 256 KiB unless the application sets its own |
/// | 415 | `unsupported_media_type` | no | a command body whose `Content-Type` is not JSON |
/// | 422 | `rejected` | no | the entity's domain refused the command; `error` is the domain's own message |
/// | 500 | `corrupt_state`, `unstorable`, `panicked` | no | a corrupt stored row, a state that cannot be stored, a panic in the entity's code |
/// | 503 | `store_unavailable`, `overloaded`, `not_delivered`, `newer_schema`, `unavailable` | yes, with `Retry-After` | the database is down, the library is overloaded, a newer release wrote the entity |
/// | 504 | `outcome_unknown` | yes, with the same event id | the write was sent and no answer came back |
///
///
/// Return it from an application's own handlers with `?`:
///
/// ```
/// use actix_web::{web, HttpResponse};
/// use persist_durable::cart::{Cart, CartCommand, CartId};
/// use persist_durable::{http::ApiError, Entities};
///
/// async fn checkout(carts: web::Data<Entities<Cart>>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
///     let cart = CartId::new(id.into_inner())?;                    // 400 if invalid
///     let state = carts.send(cart, CartCommand::Checkout).await?;  // 422 for an empty cart, ...
///     Ok(HttpResponse::Ok().json(state))
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The path or the body was not valid: 400.
    #[error(transparent)]
    BadRequest(#[from] InvalidInput),
    /// A command failed, of any entity: the status depends on why.
    #[error("{}", .0.message)]
    Command(CommandFailure),
    /// The routes cannot reach the entities they serve: 503.
    #[error("the entities are unavailable: {0}")]
    Unavailable(String),
    /// No route at this path: 404.
    #[error("no route for {method} {path}")]
    NotFound {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The route does not take this method: 405, with `Allow`.
    #[error("{path} does not take {method}; it takes {allowed}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The method the route takes.
        allowed: &'static str,
    },
    /// The body is larger than the limit, `web::PayloadConfig`'s: 413.
    #[error("the body is larger than the limit (web::PayloadConfig; 256 KiB by default)")]
    PayloadTooLarge,
    /// The command body's `Content-Type` is not JSON: 415.
    #[error("a command body must be JSON (content-type application/json), not {0:?}")]
    UnsupportedMediaType(String),
}

/// A failed command as an answer: what [`CommandError::kind`] and
/// [`CommandError::is_retryable`] say, the status they map to, and the
/// message (for a domain refusal, the domain's own).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CommandFailure {
    /// The HTTP status.
    pub status: StatusCode,
    /// [`CommandError::kind`].
    pub kind: &'static str,
    /// [`CommandError::is_retryable`].
    pub retryable: bool,
    /// What the body's `error` says.
    pub message: String,
}

impl<E: DurableEntity> From<CommandError<E>> for CommandFailure {
    fn from(error: CommandError<E>) -> Self {
        let status = match &error {
            CommandError::Rejected { .. } | CommandError::RefusedBefore { .. } | CommandError::InvalidTimer { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            CommandError::Conflict { .. } => StatusCode::CONFLICT,
            // The client's request is fine; it belongs on another node.
            CommandError::NotOwner { .. } => StatusCode::MISDIRECTED_REQUEST,
            CommandError::InvalidKey { .. } => StatusCode::BAD_REQUEST,
            CommandError::CorruptState { .. } | CommandError::Unstorable { .. } | CommandError::Panicked { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            // The write may have committed: not "unavailable", and no Retry-After.
            CommandError::OutcomeUnknown { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let message = match &error {
            CommandError::Rejected { reason, .. } => reason.to_string(),
            other => other.to_string(),
        };
        Self {
            status,
            kind: error.kind(),
            retryable: error.is_retryable(),
            message,
        }
    }
}

impl<E: DurableEntity> From<CommandError<E>> for ApiError {
    fn from(error: CommandError<E>) -> Self {
        ApiError::Command(error.into())
    }
}

impl ApiError {
    /// The body's `kind`: [`CommandError::kind`] for a failed command.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Command(failure) => failure.kind,
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
        }
    }

    /// Whether sending the request again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Command(failure) => failure.retryable,
            ApiError::Unavailable(_) => true,
            _ => false,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    kind: &'static str,
    retryable: bool,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Command(failure) => failure.status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((RETRY_AFTER, "1"));
        }
        if let ApiError::MethodNotAllowed { allowed, .. } = self {
            response.insert_header((ALLOW, *allowed));
        }
        response.json(ErrorBody {
            error: self.to_string(),
            kind: self.kind(),
            retryable: self.is_retryable(),
        })
    }
}
