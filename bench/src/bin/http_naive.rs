//! The baseline for the HTTP benchmark: the same route as
//! `examples/http_service.rs` (`POST /malls/{mall_id}/users/{user_id}/commands`,
//! same JSON in and out), written the way a team would without this library:
//! per request, one PostgreSQL transaction that reads the row `FOR UPDATE`,
//! applies the same pure transition, and writes it back.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench BIND_ADDR=127.0.0.1:8081 cargo run --release -p persist-durable-bench --bin http_naive
//! ```
//!
//! `POOL_SIZE` (8, the library's default) sets the connection pool.

#[path = "../shared/naive.rs"]
mod naive;

use actix_web::{web, App, HttpResponse, HttpServer};
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;
use persist_durable::{Event, PostgresStore, StoreConfig, UserKey};
use serde_json::json;

async fn post_command(
    pool: web::Data<Pool<AsyncPgConnection>>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (mall_id, user_id) = path.into_inner();
    let event = std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(|text| Event::from_json(text).map_err(|e| e.to_string()));
    let (key, event) = match (UserKey::new(mall_id.clone(), user_id.clone()), event) {
        (Ok(key), Ok(event)) => (key, event),
        (Err(error), _) => return HttpResponse::BadRequest().json(json!({ "error": error.to_string() })),
        (_, Err(error)) => return HttpResponse::BadRequest().json(json!({ "error": error })),
    };
    match naive::naive_command(pool.get_ref().clone(), key, event.command).await {
        Ok(state) => {
            let mut body = serde_json::to_value(state).unwrap_or_default();
            body["mall_id"] = json!(mall_id);
            body["user_id"] = json!(user_id);
            HttpResponse::Ok().json(body)
        }
        Err(error) => HttpResponse::ServiceUnavailable().json(json!({ "error": error })),
    }
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")?;
    let bind_addr = std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let pool_size = std::env::var("POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    // The library's migrations create the table; the naive service uses it as is.
    drop(PostgresStore::connect_with(&url, StoreConfig::default()).await?);
    let pool = Pool::builder(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
        .max_size(pool_size)
        .build()?;
    HttpServer::new(move || {
        App::new().app_data(web::Data::new(pool.clone())).route(
            "/malls/{mall_id}/users/{user_id}/commands",
            web::post().to(post_command),
        )
    })
    .bind(bind_addr)?
    .run()
    .await?;
    Ok(())
}
