//! Records per second from a Kafka topic to committed state: the library's
//! ingest against the consumer a team would write without it.
//!
//! - `produce`: writes `--records` user events (logins, product views, cart
//!   uses) for `--users` users, keyed by user, to `--topic`.
//! - `ingest`: `KafkaIngest` into `UserStates` on PostgreSQL, until every
//!   record of the topic is settled.
//! - `naive`: one consumer loop that, per record, reads the user's row
//!   (`FOR UPDATE`), applies the same transition, writes it back in one
//!   transaction, then commits the record's offset to Kafka synchronously.
//!
//! Each consuming mode reads the whole topic in a consumer group of its own
//! (`--group`) into a fresh database, and prints one JSON line: records,
//! seconds, records per second, and this process's CPU per record.
//! `bench/scripts/bench-kafka.sh` runs them alternately against one broker.
//!
//! ```text
//! cargo run --release -p persist-durable-bench --features kafka --bin kafka_load -- --mode produce --records 200000
//! cargo run --release -p persist-durable-bench --features kafka --bin kafka_load -- --mode ingest --group run1 --database-url postgres://...
//! ```

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;
use persist_durable::kafka::{IngestConfig, IngestRecord, JsonRecords, KafkaIngest, RecordDecoder};
use persist_durable::{Config, PostgresStore, UserState, UserStates};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[path = "../shared/cpu.rs"]
mod cpu;
#[path = "../shared/naive.rs"]
mod naive;

use cpu::process_cpu_seconds;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Produce,
    Ingest,
    Naive,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "user-events")]
    topic: String,
    /// Records to produce; the consuming modes read until this many are settled.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Users the produced records are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// The consumer group (a fresh one reads the topic from the start).
    #[arg(long, default_value = "kafka-load")]
    group: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// A librdkafka property for the ingest's consumer, `key=value` (repeatable).
    #[arg(long)]
    client_config: Vec<String>,
}

#[actix::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match args.mode {
        Mode::Produce => produce(&args).await,
        Mode::Ingest => ingest(&args).await,
        Mode::Naive => naive_consumer(&args).await,
    }
}

async fn produce(args: &Args) -> Result<(), Box<dyn Error>> {
    // One record per batch: tansu 0.6 serves a fetch that starts inside a
    // batch from the next batch on (Kafka returns the whole batch), and the
    // consumers here resume at arbitrary positions after a pause.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("batch.num.messages", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    let mut sends = Vec::with_capacity(10_000);
    for i in 0..args.records {
        let user = (i * 7919) % args.users;
        let key = format!("mall001-user{user}");
        let value = match i % 4 {
            0 => r#"{"type":"user_login"}"#.to_owned(),
            1 => r#"{"type":"use_cart"}"#.to_owned(),
            _ => format!(r#"{{"type":"view_product","product_id":"p{}"}}"#, i % 97),
        };
        let producer = producer.clone();
        let topic = args.topic.clone();
        sends.push(async move {
            let record = FutureRecord::to(&topic).key(&key).payload(&value);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        });
        if sends.len() == 10_000 {
            for sent in futures_util::future::join_all(sends.drain(..)).await {
                sent?;
            }
        }
    }
    for sent in futures_util::future::join_all(sends).await {
        sent?;
    }
    println!(
        r#"{{"mode":"produce","records":{},"seconds":{:.2}}}"#,
        args.records,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn database_url(args: &Args) -> Result<&str, Box<dyn Error>> {
    args.database_url
        .as_deref()
        .ok_or_else(|| "--database-url (or DATABASE_URL) is required".into())
}

fn report(args: &Args, mode: &str, started: Instant, cpu_before: f64) {
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    println!(
        r#"{{"mode":"{mode}","records":{},"seconds":{seconds:.2},"records_per_s":{:.0},"cpu_us_per_record":{:.1}}}"#,
        args.records,
        args.records as f64 / seconds,
        cpu * 1e6 / args.records as f64
    );
}

async fn ingest(args: &Args) -> Result<(), Box<dyn Error>> {
    let store = PostgresStore::connect(database_url(args)?).await?;
    let users = UserStates::start(Arc::new(store), Config::default());
    let mut config = IngestConfig::new(&args.brokers, &args.group, [&args.topic]);
    for property in &args.client_config {
        let (key, value) = property.split_once('=').ok_or("--client-config takes key=value")?;
        config = config.with_client_config(key, value);
    }
    let (started, cpu_before) = (Instant::now(), process_cpu_seconds());
    let ingest = KafkaIngest::start(config, &users, JsonRecords)?;
    loop {
        let stats = ingest.stats();
        if stats.records_applied + stats.records_dead_lettered >= args.records {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report(args, "ingest", started, cpu_before);
    ingest.stop().await;
    Ok(())
}

async fn naive_consumer(args: &Args) -> Result<(), Box<dyn Error>> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(database_url(args)?);
    let pool = Pool::builder(manager).max_size(2).build()?;
    // The library's migrations create the table the naive consumer writes.
    drop(PostgresStore::connect(database_url(args)?).await?);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&args.topic])?;
    let (started, cpu_before) = (Instant::now(), process_cpu_seconds());
    let mut done = 0;
    while done < args.records {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let record = IngestRecord::from_message(&message);
        // The same decoding as the ingest's; a bad record is skipped.
        if let Ok((key, event)) = RecordDecoder::<UserState>::decode(&JsonRecords, &record) {
            naive::naive_command(pool.clone(), key, event.command).await?;
        }
        consumer.commit_message(&message, CommitMode::Sync)?;
        done += 1;
    }
    report(args, "naive", started, cpu_before);
    Ok(())
}
