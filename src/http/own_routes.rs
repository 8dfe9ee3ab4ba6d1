//! What an application's own routes need to answer like the library's: a
//! JSON extractor configuration ([`json_config`]) and resources that answer
//! their other methods with a JSON 405 ([`resource`]).

use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};

use super::ApiError;
use crate::entity::InvalidInput;

/// The largest JSON body [`json_config`] takes: actix-web's own payload
/// limit, which the library's routes keep too.
pub const JSON_BODY_LIMIT: usize = 256 * 1024;

/// A `web::Json` extractor configuration whose failures answer in the
/// library's error body: a body that is not the JSON expected is a 400
/// (`bad_request`), one declared as another type than JSON (or as none:
/// `application/json` and `application/*+json` are taken) a 415
/// (`unsupported_media_type`), one over [`JSON_BODY_LIMIT`] a 413
/// (`payload_too_large`). Give it to the application (or a scope) as app data:
///
/// ```
/// use actix_web::{test, web, App, HttpResponse};
/// use persist_durable::http;
///
/// #[derive(serde::Deserialize)]
/// struct Watch { product_id: String }
///
/// async fn watch(body: web::Json<Watch>) -> HttpResponse {
///     HttpResponse::Ok().body(body.into_inner().product_id)
/// }
///
/// #[actix::main]
/// async fn main() {
///     let app = App::new()
///         .app_data(http::json_config())
///         .service(http::resource("/watches", "POST").route(web::post().to(watch)));
///     let app = test::init_service(app).await;
///     let malformed = test::TestRequest::post()
///         .uri("/watches")
///         .insert_header(("content-type", "application/json"))
///         .set_payload("{not json")
///         .to_request();
///     let answer = test::call_service(&app, malformed).await;
///     assert_eq!(answer.status(), 400);
///     let body: serde_json::Value = test::read_body_json(answer).await;
///     assert_eq!(body["kind"], "bad_request");
/// }
/// ```
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_BODY_LIMIT)
        .error_handler(|error, request| json_error(error, request).into())
}

/// A JSON body's failure as an answer.
fn json_error(error: JsonPayloadError, request: &HttpRequest) -> ApiError {
    match error {
        JsonPayloadError::OverflowKnownLength { .. }
        | JsonPayloadError::Overflow { .. }
        | JsonPayloadError::Payload(PayloadError::Overflow) => ApiError::PayloadTooLarge,
        JsonPayloadError::ContentType => {
            let declared = request
                .headers()
                .get(CONTENT_TYPE)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .unwrap_or_default();
            ApiError::UnsupportedMediaType(declared)
        }
        other => ApiError::BadRequest(InvalidInput::MalformedBody {
            reason: other.to_string(),
        }),
    }
}

/// A resource at `path` whose methods other than `allowed` (as the `Allow`
/// header lists them: `"GET, POST"`) are answered with a JSON 405 carrying
/// `Allow`, as the library's routes answer; add its routes to it as to
/// `web::resource`. See [`json_config`] for an example.
pub fn resource(path: &str, allowed: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |request: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.path().to_owned(),
            allowed,
        })
    }))
}
