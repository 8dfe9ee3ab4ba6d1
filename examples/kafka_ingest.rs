//! User events from a Kafka topic into the user states, exactly once in
//! effect: produces a few events (one of them twice, one malformed), ingests
//! them, and prints what each user's state became and what went to the
//! dead-letter topic.
//!
//! Needs a Kafka-protocol broker (`docker compose up -d kafka`, or
//! `tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/`)
//! with the two topics:
//!
//! ```text
//! cargo run --example kafka_ingest --features kafka -- --brokers 127.0.0.1:9092
//! ```
//!
//! The state goes to a fresh embedded SQLite file, or to PostgreSQL with
//! `--database-url` (or `DATABASE_URL`). A database keeps the positions and
//! per-user offsets of earlier runs: against a broker whose topic was created
//! again, it rightly takes the new records at those offsets as read and
//! applied (README, "Limits").

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use persist_durable::kafka::{IngestConfig, JsonRecords, KafkaIngest};
use persist_durable::{Config, PostgresStore, SharedStore, SqliteStore, StateStoreExt, UserKey, UserStates};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[derive(Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic of user events (created beforehand).
    #[arg(long, default_value = "user-events")]
    topic: String,
    /// The dead-letter topic (created beforehand).
    #[arg(long, default_value = "user-events.dead-letters")]
    dead_letter_topic: String,
    /// PostgreSQL instead of a temporary SQLite file.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;
    let store: SharedStore = match &args.database_url {
        Some(url) => Arc::new(PostgresStore::connect(url).await?),
        None => Arc::new(SqliteStore::open(dir.path().join("user-state.db")).await?),
    };
    let users = UserStates::start(store, Config::default());

    // The record key names the user (`<mall id>-<user id>`), the value is the
    // command as the HTTP API takes it; the record's timestamp is the event time.
    let events = [
        ("mall001-alice", r#"{"type":"user_login","event_id":"e1"}"#),
        (
            "mall001-alice",
            r#"{"type":"view_product","product_id":"shoes","event_id":"e2"}"#,
        ),
        (
            "mall001-alice",
            r#"{"type":"view_product","product_id":"shoes","event_id":"e2"}"#,
        ),
        (
            "mall001-bob",
            r#"{"type":"set_marketing_opt_in","opt_in":true,"event_id":"e3"}"#,
        ),
        ("mall001-bob", r#"{"type":"fly_to_the_moon"}"#),
        ("mall001-bob", r#"{"type":"use_cart","event_id":"e4"}"#),
    ];
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &args.brokers).create()?;
    for (key, value) in events {
        let record = FutureRecord::to(&args.topic).key(key).payload(value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    println!("1. produced {} records to {}", events.len(), args.topic);

    let config = IngestConfig::new(&args.brokers, "user-state-example", [&args.topic])
        .with_dead_letter_topic(&args.dead_letter_topic);
    let ingest = KafkaIngest::start(config, &users, JsonRecords)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ingest.stats().records_applied + ingest.stats().records_dead_lettered < events.len() as u64 {
        if std::time::Instant::now() > deadline {
            return Err(format!("not every record settled within 60 s: {:?}", ingest.stats()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = ingest.stats();
    println!(
        "2. ingested: {} applied (the duplicate acknowledged, not applied twice), {} dead-lettered",
        stats.records_applied, stats.records_dead_lettered
    );

    let alice = users
        .store()
        .load(&UserKey::new("mall001", "alice")?)
        .await?
        .expect("alice is stored");
    let bob = users
        .store()
        .load(&UserKey::new("mall001", "bob")?)
        .await?
        .expect("bob is stored");
    println!(
        "3. alice: revision {}, logged in {}, recent products {:?}",
        alice.revision,
        alice.state.last_login.is_some(),
        alice
            .state
            .recent_products
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
    );
    println!(
        "   bob:   revision {}, opted in {}, used the cart {}",
        bob.revision,
        bob.state.marketing_opt_in,
        bob.state.last_cart_use.is_some()
    );
    println!("   offsets stored with bob's state: {:?}", bob.source_offsets);

    ingest.stop().await;
    println!("4. left the consumer group; positions stored, entities handed over");
    Ok(())
}
