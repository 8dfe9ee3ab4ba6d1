//! The library embedded in an actix-web service.
//!
//! ```text
//! cargo run --example http_service
//! curl -X POST localhost:8080/malls/mall001/users/user001/commands -H 'content-type: application/json' \
//!      -d '{"type": "view_product", "product_id": "p1"}'
//! curl localhost:8080/malls/mall001/users/user001
//! curl localhost:8080/healthz
//! curl localhost:8080/metrics
//! ```
//!
//! Configuration from the environment (defaults in brackets):
//! `DATABASE_URL` (a SQLite file `user-state.db`; `postgres://...` for PostgreSQL),
//! `BIND_ADDR` (127.0.0.1:8080), `IDLE_TIMEOUT_SECS` (1800), `IDLE_CHECK_INTERVAL_SECS` (300),
//! `BATCH_SIZE` (512), `BATCH_WAIT_MICROS` (1000), `CHANGE_FEED` (false), `ARBITERS` (one per
//! core), `STORE_THREADS` (2), `RUST_LOG` (info).
//!
//! Several nodes on one PostgreSQL database (cluster mode): give each a `NODE_ID` and the
//! `ADVERTISED_ADDR` the others reach it at (`http://` + its `BIND_ADDR` by default). Each
//! owns its share of the users; a request reaching another node is forwarded to the owner.
//!
//! ```text
//! DATABASE_URL=postgres://... NODE_ID=a BIND_ADDR=127.0.0.1:8081 cargo run --example http_service &
//! DATABASE_URL=postgres://... NODE_ID=b BIND_ADDR=127.0.0.1:8082 cargo run --example http_service &
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use persist_durable::{
    http, Cluster, ClusterConfig, Config, PostgresStore, SharedStore, SqliteStore, StoreConfig, UserStates,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn metrics(handle: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle.render())
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let database_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "user-state.db".into());
    let bind_addr = std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let store_config = StoreConfig::default()
        .with_max_batch_size(env_or("BATCH_SIZE", 512))
        .with_max_batch_wait(Duration::from_micros(env_or("BATCH_WAIT_MICROS", 1000)))
        .with_change_feed(env_or("CHANGE_FEED", false))
        .with_worker_threads(env_or("STORE_THREADS", StoreConfig::default().worker_threads));
    let config = Config::default()
        .with_arbiters(env_or("ARBITERS", Config::default().arbiters))
        .with_idle_timeout(Duration::from_secs(env_or("IDLE_TIMEOUT_SECS", 1800)))
        .with_idle_check_interval(Duration::from_secs(env_or("IDLE_CHECK_INTERVAL_SECS", 300)));

    let store: SharedStore = if database_url.starts_with("postgres") {
        Arc::new(PostgresStore::connect_with(&database_url, store_config).await?)
    } else {
        Arc::new(SqliteStore::open_with(&database_url, store_config.with_pool_size(4)).await?)
    };
    let cluster = match std::env::var("NODE_ID") {
        Ok(node) => {
            let address = std::env::var("ADVERTISED_ADDR").unwrap_or_else(|_| format!("http://{bind_addr}"));
            Some(Cluster::join(store.clone(), ClusterConfig::new(node, address)).await?)
        }
        Err(_) => None,
    };
    let config = match &cluster {
        Some(cluster) => config.with_cluster(cluster.clone()),
        None => config,
    };
    let users = http::forward_to_owners(UserStates::start(store, config));
    tracing::info!(%bind_addr, database = %database_url.split('@').next_back().unwrap_or(""), "listening");

    HttpServer::new(move || {
        App::new()
            .configure(http::cluster_routes(users.clone()))
            .configure(http::routes(users.clone()))
            .app_data(web::Data::new(prometheus.clone()))
            .route("/metrics", web::get().to(metrics))
    })
    .bind(&bind_addr)?
    .run()
    .await?;
    // Stopped (SIGINT, SIGTERM): hand this node's users over before exiting.
    if let Some(cluster) = cluster {
        cluster.leave().await?;
    }
    Ok(())
}
