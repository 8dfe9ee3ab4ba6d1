//! One node of the cluster scenario, in a process of its own (the harness's
//! `cluster-node` mode): it joins the cluster on the shared database, serves
//! the counters' HTTP routes and the route other nodes forward to, and
//! leaves gracefully when its input ends or it gets SIGTERM.
//!
//! On stdout it writes one JSON line once it serves (`{"ready": address}`)
//! and one once it has left (`{"left_seconds": ...}`), nothing else.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use persist_durable::http::{self, ApiError};
use persist_durable::{Cluster, ClusterConfig, Config, Entities, EntityEvent, EventId, PostgresStore, StoreConfig};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::counter::{AppliedBy, Counter, CounterCommand, CounterId};

type AnyError = Box<dyn Error + Send + Sync>;

/// What a node is started with.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NodeOptions {
    #[arg(long, env = "DATABASE_URL")]
    pub(crate) database_url: String,
    /// This node's name in the cluster.
    #[arg(long)]
    pub(crate) node: String,
    /// Event ids remembered per counter (`Config::with_event_id_memory`).
    #[arg(long, default_value_t = 512)]
    pub(crate) event_id_memory: usize,
}

/// The counters' handle, forwarding to the owners, and this node's membership.
#[derive(Clone)]
struct Served {
    counters: Entities<Counter>,
    cluster: Cluster,
}

/// Serves until the input ends or SIGTERM, then leaves the cluster.
pub(crate) async fn serve(options: NodeOptions) -> Result<(), AnyError> {
    // The library's warnings (a lease lost, a membership round failed) on
    // stderr, each line naming its node; `RUST_LOG` for more.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let timeout = Duration::from_secs(2);
    let config = StoreConfig::default()
        .with_connect_timeout(timeout)
        .with_operation_timeout(timeout);
    let store: persist_durable::SharedStore =
        Arc::new(PostgresStore::connect_with(&options.database_url, config).await?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = format!("http://{}", listener.local_addr()?);
    let cluster = Cluster::join(
        store.clone(),
        ClusterConfig::new(options.node.as_str(), address.as_str()),
    )
    .await?;
    let counters = http::forward_to_owners(Entities::<Counter>::start_with(
        store,
        Config::default()
            .with_cluster(cluster.clone())
            .with_event_id_memory(options.event_id_memory),
        AppliedBy(options.node.as_str().into()),
    ));
    let served = Served {
        counters: counters.clone(),
        cluster: cluster.clone(),
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(served.clone()))
            .app_data(http::json_config())
            .configure(http::cluster_routes(served.counters.clone()))
            .service(http::resource("/counters/{id}/adds", "POST").route(web::post().to(add)))
            .service(
                http::resource("/counters/{id}", "GET, DELETE")
                    .route(web::get().to(read))
                    .route(web::delete().to(delete)),
            )
            .service(http::resource("/stats", "GET").route(web::get().to(stats)))
            .default_service(web::to(http::not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?
    .run();
    let server_handle = server.handle();
    actix::spawn(server);
    println!("{}", json!({ "ready": address }));

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (mut stdin, mut input) = (tokio::io::stdin(), Vec::new());
    tokio::select! {
        _ = terminate.recv() => {}
        _ = stdin.read_to_end(&mut input) => {}
    }
    // Leave first, serving meanwhile: commands reaching this node are
    // forwarded to the new owners; then stop taking requests.
    let leaving = Instant::now();
    let left = cluster.leave().await;
    let left_seconds = leaving.elapsed().as_secs_f64();
    let _ = counters.stop().await;
    server_handle.stop(true).await;
    println!(
        "{}",
        json!({ "left_seconds": left_seconds, "error": left.err().map(|error| error.to_string()) })
    );
    Ok(())
}

/// An add's body: the id that makes it distinct.
#[derive(Debug, Deserialize)]
struct AddBody {
    event_id: String,
}

/// A delete's id, so that a delete sent again is recognised as one.
#[derive(Debug, Deserialize)]
struct DeleteQuery {
    event_id: Option<String>,
}

async fn run(served: &Served, id: String, event: EntityEvent<CounterCommand>) -> Result<HttpResponse, ApiError> {
    let state = served.counters.send(CounterId::new(id)?, event).await?;
    Ok(HttpResponse::Ok().json(json!({ "value": state.value })))
}

async fn add(
    served: web::Data<Served>,
    id: web::Path<String>,
    body: web::Json<AddBody>,
) -> Result<HttpResponse, ApiError> {
    let event = EntityEvent::from(CounterCommand::Add).with_id(EventId::new(body.into_inner().event_id)?);
    run(&served, id.into_inner(), event).await
}

async fn read(served: web::Data<Served>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    run(&served, id.into_inner(), CounterCommand::Read.into()).await
}

async fn delete(
    served: web::Data<Served>,
    id: web::Path<String>,
    query: web::Query<DeleteQuery>,
) -> Result<HttpResponse, ApiError> {
    let mut event = EntityEvent::from(CounterCommand::Delete);
    if let Some(event_id) = query.into_inner().event_id {
        event = event.with_id(EventId::new(event_id)?);
    }
    run(&served, id.into_inner(), event).await
}

/// This node's cluster counters.
async fn stats(served: web::Data<Served>) -> HttpResponse {
    let stats = served.cluster.stats();
    HttpResponse::Ok().json(json!({
        "node": served.cluster.node(),
        "slices_owned": stats.slices_owned,
        "renewals": stats.renewals,
        "leases_lost": stats.leases_lost,
        "slices_handed_over": stats.slices_handed_over,
        "slices_taken": stats.slices_taken,
        "commands_forwarded": stats.commands_forwarded,
        "writes_fenced": stats.writes_fenced,
    }))
}
