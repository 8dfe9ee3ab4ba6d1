//! Kafka ingest, exactly once in effect, against a real Kafka-protocol
//! broker (`tansu`) that each test starts on a port of its own.
//!
//! Counting as in RELIABILITY.md: every record the broker acknowledged to
//! the producer must be applied to its entity exactly once. The entity here
//! is a tally that keeps the sequence number of every record applied to it,
//! in order, so a lost record, a double apply and a reordering each show.
//!
//! Without `tansu` on the PATH these tests print a loud SKIPPED line and
//! pass, unless `CI` or `PERSIST_DURABLE_REQUIRE_KAFKA` is set: then they fail.
#![cfg(feature = "kafka")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{test_store_config, Backend, TestDb};
use persist_durable::kafka::{IngestConfig, IngestError, JsonRecords, KafkaIngest, StartAt};
use persist_durable::{Config, DurableEntity, Entities, Id, PostgresStore, SharedStore, StateStoreExt, StoreError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// The entity: a tally of applied sequence numbers.

/// The ready validated key.
type TallyId = Id<Tally>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    applied: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TallyCommand {
    /// Appends `seq`; a `seq` of 0 is refused by the domain.
    Add { seq: u64 },
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("sequence number 0 is refused")]
struct ZeroRefused;

impl DurableEntity for Tally {
    const ENTITY_TYPE: &'static str = "Tally";
    const MANIFEST: &'static str = "Tally/v1";
    type Key = TallyId;
    type Command = TallyCommand;
    type Settings = ();
    type Rejection = ZeroRefused;

    fn apply(&self, command: &TallyCommand, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, ZeroRefused> {
        let TallyCommand::Add { seq } = command;
        if *seq == 0 {
            return Err(ZeroRefused);
        }
        let mut next = self.clone();
        next.applied.push(*seq);
        Ok(Some(next))
    }
}

fn tally(id: &str) -> TallyId {
    TallyId::new(id).unwrap()
}

// ---------------------------------------------------------------------------
// The broker.

/// A `tansu` broker with in-memory storage, killed on drop.
struct Broker {
    process: Child,
    address: String,
}

impl Broker {
    /// A fresh broker, or `None` (after saying so loudly) when `tansu` is not
    /// installed and Kafka tests are not required.
    fn start() -> Option<Broker> {
        let required = std::env::var_os("CI").is_some() || std::env::var_os("PERSIST_DURABLE_REQUIRE_KAFKA").is_some();
        let tansu = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
        if Process::new(&tansu).arg("--version").output().is_err() {
            assert!(
                !required,
                "`{tansu}` is not installed and Kafka tests are required (cargo install tansu --locked --features dynostore)"
            );
            eprintln!(
                "\n*** SKIPPED a Kafka test: `{tansu}` is not installed \
                 (cargo install tansu --locked --features dynostore) ***\n"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("tcp://127.0.0.1:{port}");
        let process = Process::new(&tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let broker = Broker {
            process,
            address: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&broker.address).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {}", broker.address);
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(broker)
    }

    fn create_topic(&self, name: &str, partitions: u32) {
        let tansu = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
        let status = Process::new(tansu)
            .args(["topic", "create", "--broker", &format!("tcp://{}", self.address)])
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create runs");
        assert!(status.success(), "topic {name} created");
    }

    /// A producer writing each record as a batch of its own: tansu 0.6 serves
    /// a fetch that starts inside a batch from the next batch on, skipping
    /// the rest of that one (Kafka returns the whole batch), and a consumer
    /// resuming at a stored position fetches from anywhere.
    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("enable.idempotence", "true")
            .set("batch.num.messages", "1")
            .create()
            .expect("a producer")
    }

    /// Every record of `topic` (all partitions), with its headers.
    fn read_all(&self, topic: &str, expected: usize) -> Vec<ReadRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("group.id", format!("reader-{topic}"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while records.len() < expected && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| {
                                let value = h
                                    .value
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default();
                                (h.key.to_owned(), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push((message.payload().map(<[u8]>::to_vec), headers));
            }
        }
        records
    }
}

/// A record's value and headers.
type ReadRecord = (Option<Vec<u8>>, BTreeMap<String, String>);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// One record to produce: the tally it is for and its JSON.
fn add(id: &str, seq: u64) -> (String, String) {
    (
        id.to_owned(),
        format!(r#"{{"type":"add","seq":{seq},"event_id":"{id}-{seq}"}}"#),
    )
}

/// Produces `records` in order (idempotent producer: each acknowledged
/// record is in the topic once), failing the test if one is not acknowledged.
async fn produce(producer: &FutureProducer, topic: &str, records: &[(String, String)]) {
    let sends = records.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key.as_str()).payload(payload.as_str()),
            Duration::from_secs(10),
        )
    });
    for (sent, (key, payload)) in futures_util::future::join_all(sends).await.into_iter().zip(records) {
        if let Err((error, _)) = sent {
            panic!("record {key} {payload} not acknowledged: {error}");
        }
    }
}

/// `n` records for each of `tallies` tallies, sequence numbers `from..from + n`, interleaved.
fn workload(tallies: usize, from: u64, n: u64) -> Vec<(String, String)> {
    (from..from + n)
        .flat_map(|seq| (0..tallies).map(move |t| add(&format!("tally{t}"), seq)))
        .collect()
}

/// What each tally must hold: every acknowledged sequence number once, in order.
fn expected(tallies: usize, seqs: impl Iterator<Item = u64> + Clone) -> BTreeMap<String, Vec<u64>> {
    (0..tallies)
        .map(|t| (format!("tally{t}"), seqs.clone().collect()))
        .collect()
}

async fn stored(store: &SharedStore, tallies: usize) -> Result<BTreeMap<String, Vec<u64>>, StoreError> {
    let mut all = BTreeMap::new();
    for t in 0..tallies {
        let id = format!("tally{t}");
        let state = store.load(&tally(&id)).await?;
        all.insert(id, state.map(|s| s.state.applied).unwrap_or_default());
    }
    Ok(all)
}

/// Waits (polling the database another process writes) until the tallies
/// hold `expected`; then asserts exactly that.
async fn assert_tallies_reach(store: &SharedStore, expected: &BTreeMap<String, Vec<u64>>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = stored(store, expected.len()).await;
        let total: usize = now.as_ref().map(|n| n.values().map(Vec::len).sum()).unwrap_or(0);
        let wanted: usize = expected.values().map(Vec::len).sum();
        if total >= wanted || Instant::now() >= deadline {
            let now = now.expect("the tallies load");
            for (id, want) in expected {
                let got = &now[id];
                let lost: Vec<_> = want.iter().filter(|s| !got.contains(s)).collect();
                let mut twice: Vec<_> = got.clone();
                twice.sort_unstable();
                twice.dedup();
                assert!(
                    lost.is_empty(),
                    "{id}: {} acknowledged records lost: {lost:?}",
                    lost.len()
                );
                assert_eq!(twice.len(), got.len(), "{id}: records applied twice: {got:?}");
                assert_eq!(got, want, "{id}: applied out of order");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The consumer settings every ingest here uses: a short session, so that
/// rebalances take seconds, not the default 45.
fn ingest_config(broker: &Broker, group: &str, topic: &str) -> IngestConfig {
    IngestConfig::new(&broker.address, group, [topic])
        .with_client_config("session.timeout.ms", "6000")
        .with_client_config("heartbeat.interval.ms", "500")
        .with_position_save_interval(Duration::from_millis(200))
        .with_retry_backoff(Duration::from_millis(20), Duration::from_millis(500))
}

/// Logs to the test's output as `RUST_LOG` says.
fn log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn setup(topic: &str, partitions: u32) -> Option<(Broker, TestDb)> {
    log();
    let broker = Broker::start()?;
    let db = TestDb::open(Backend::Postgres).await?;
    broker.create_topic(topic, partitions);
    Some((broker, db))
}

// ---------------------------------------------------------------------------
// Scenarios in this process.

#[actix_rt::test]
async fn duplicates_and_redeliveries_of_every_record_apply_each_record_once() {
    let Some((broker, db)) = setup("tallies", 4).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    // 100 records per tally, each produced twice in a row (a producer
    // retrying without idempotence): the duplicates carry the same event id.
    let records: Vec<_> = workload(6, 1, 100).into_iter().flat_map(|r| [r.clone(), r]).collect();
    produce(&broker.producer(), "tallies", &records).await;
    let want = expected(6, 1..=100);

    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &want, Duration::from_secs(60)).await;
    ingest.stop().await;

    // Every record again: the stored positions are gone, so the whole topic
    // is redelivered, 200 records per tally, far beyond the 32 remembered
    // event ids. The offsets stored with each tally recognise them.
    db.execute("DELETE FROM feed_offsets");
    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    let total = records.len() as u64;
    wait_until(
        "every record is redelivered and settled",
        Duration::from_secs(60),
        async || {
            let stats = ingest.stats();
            stats.records_applied >= total && stats.unsettled == 0
        },
    )
    .await;
    assert_tallies_reach(&store, &want, Duration::from_secs(5)).await;
    let state = store.load(&tally("tally0")).await.unwrap().unwrap();
    assert_eq!(
        state.revision.0, 200,
        "one revision per record: a duplicate's notes its offset, so a redelivery of it is recognised however late"
    );
    assert_eq!(
        state.source_offsets.len(),
        1,
        "one partition feeds tally0: {:?}",
        state.source_offsets
    );
    ingest.stop().await;
}

#[actix_rt::test]
async fn positions_are_stored_and_reading_resumes_there() {
    let Some((broker, db)) = setup("tallies", 2).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    produce(&broker.producer(), "tallies", &workload(2, 1, 10)).await;
    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(2, 1..=10), Duration::from_secs(60)).await;
    ingest.stop().await;

    let mut positions = 0;
    for partition in 0..2 {
        let name = format!("kafka/g1/tallies/{partition}");
        positions += store.load_offset(&name).await.unwrap().unwrap_or(0);
    }
    assert_eq!(
        positions, 20,
        "each partition's stored position is past its last record"
    );

    produce(&broker.producer(), "tallies", &workload(2, 11, 5)).await;
    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(2, 1..=15), Duration::from_secs(60)).await;
    wait_until("the new records are settled", Duration::from_secs(10), async || {
        ingest.stats().records_applied >= 10
    })
    .await;
    assert_eq!(
        ingest.stats().records_received,
        10,
        "only the records after the stored positions are read again"
    );
    ingest.stop().await;
}

#[actix_rt::test]
async fn a_poison_record_goes_to_the_dead_letter_topic_and_its_partition_moves_on() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    broker.create_topic("tallies.dead", 1);
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    let records = vec![
        add("tally0", 1),
        ("tally0".to_owned(), "{not json".to_owned()),
        add("tally0", 0), // decodes, and the domain refuses it
        add("tally0", 2),
    ];
    produce(&broker.producer(), "tallies", &records).await;
    let config = ingest_config(&broker, "g1", "tallies").with_dead_letter_topic("tallies.dead");
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(1, 1..=2), Duration::from_secs(60)).await;
    wait_until(
        "both poison records are dead-lettered",
        Duration::from_secs(30),
        async || ingest.stats().records_dead_lettered == 2,
    )
    .await;

    let dead = broker.read_all("tallies.dead", 2);
    assert_eq!(dead.len(), 2, "two dead letters");
    assert_eq!(
        dead[0].0.as_deref(),
        Some(&b"{not json"[..]),
        "the record is kept as it was"
    );
    assert_eq!(dead[0].1["persist-durable.origin.topic"], "tallies");
    assert_eq!(dead[0].1["persist-durable.origin.partition"], "0");
    assert_eq!(dead[0].1["persist-durable.origin.offset"], "1");
    assert!(
        dead[0].1["persist-durable.error"].contains("malformed"),
        "{:?}",
        dead[0].1
    );
    assert_eq!(dead[1].1["persist-durable.origin.offset"], "2");
    assert!(
        dead[1].1["persist-durable.error"].contains("refused"),
        "{:?}",
        dead[1].1
    );
    ingest.stop().await;
}

#[actix_rt::test]
async fn a_database_outage_pauses_consumption_and_loses_nothing() {
    let Some((broker, db)) = setup("tallies", 4).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    let producer = broker.producer();
    produce(&producer, "tallies", &workload(8, 1, 5)).await;
    let config = ingest_config(&broker, "g1", "tallies").with_max_unsettled(40, 10);
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(8, 1..=5), Duration::from_secs(60)).await;

    db.make_unavailable();
    produce(&producer, "tallies", &workload(8, 6, 20)).await;
    wait_until(
        "deliveries fail and consumption pauses",
        Duration::from_secs(60),
        async || {
            let stats = ingest.stats();
            stats.retries > 0 && stats.pauses > 0
        },
    )
    .await;
    let during = ingest.stats();
    assert!(
        during.unsettled <= 40 + 8,
        "records held while paused stay bounded: {during:?}"
    );
    db.make_available();

    let reader = db.connect().await;
    assert_tallies_reach(&reader, &expected(8, 1..=25), Duration::from_secs(60)).await;
    ingest.stop().await;
}

#[actix_rt::test]
async fn an_entity_whose_queue_is_smaller_than_a_batch_still_gets_every_record_in_order() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default().with_max_queued_per_entity(4));
    produce(&broker.producer(), "tallies", &workload(1, 1, 50)).await;
    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(1, 1..=50), Duration::from_secs(60)).await;
    ingest.stop().await;
}

#[actix_rt::test]
async fn starting_at_the_latest_record_stores_that_position_before_any_record_arrives() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    let producer = broker.producer();
    produce(&producer, "tallies", &workload(1, 1, 5)).await;
    let config = || ingest_config(&broker, "g1", "tallies").with_start_at(StartAt::Latest);
    let ingest = KafkaIngest::start(config(), &tallies, JsonRecords).unwrap();
    wait_until("the partition is assigned", Duration::from_secs(30), async || {
        ingest.stats().partitions_assigned == 1
    })
    .await;
    ingest.stop().await;
    assert_eq!(store.load_offset("kafka/g1/tallies/0").await.unwrap(), Some(5));

    // Produced while no member reads: the next one starts where the first did.
    produce(&producer, "tallies", &workload(1, 6, 3)).await;
    let ingest = KafkaIngest::start(config(), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(1, 6..=8), Duration::from_secs(60)).await;
    ingest.stop().await;
}

#[actix_rt::test]
async fn stopping_after_the_broker_is_gone_returns_in_bounded_time() {
    let Some((mut broker, db)) = setup("tallies", 1).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    produce(&broker.producer(), "tallies", &workload(1, 1, 3)).await;
    let config = ingest_config(&broker, "g1", "tallies").with_revocation_timeout(Duration::from_secs(2));
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(1, 1..=3), Duration::from_secs(60)).await;
    broker.process.kill().unwrap();
    broker.process.wait().unwrap();
    let started = Instant::now();
    ingest.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2 + 15 + 5),
        "stop took {:?}",
        started.elapsed()
    );
}

#[actix_rt::test]
async fn a_client_configuration_the_ingest_cannot_run_with_is_an_error_not_a_panic() {
    let store: SharedStore = Arc::new(persist_durable::MemoryStore::new());
    let tallies = Entities::<Tally>::start(store, Config::default());
    let unknown = IngestConfig::new("127.0.0.1:1", "g", ["t"]).with_client_config("no.such.property", "1");
    assert!(matches!(
        KafkaIngest::start(unknown, &tallies, JsonRecords),
        Err(IngestError::Kafka(_))
    ));
    let cooperative = IngestConfig::new("127.0.0.1:1", "g", ["t"])
        .with_client_config("partition.assignment.strategy", "cooperative-sticky");
    assert!(matches!(
        KafkaIngest::start(cooperative, &tallies, JsonRecords),
        Err(IngestError::InvalidConfig(_))
    ));
    let consumer_protocol =
        IngestConfig::new("127.0.0.1:1", "g", ["t"]).with_client_config("group.protocol", "consumer");
    assert!(
        matches!(
            KafkaIngest::start(consumer_protocol, &tallies, JsonRecords),
            Err(IngestError::InvalidConfig(_))
        ),
        "the README says group.protocol=consumer is refused"
    );
    let no_topic = IngestConfig::new("127.0.0.1:1", "g", Vec::<String>::new());
    assert!(matches!(
        KafkaIngest::start(no_topic, &tallies, JsonRecords),
        Err(IngestError::InvalidConfig(_))
    ));
}

/// Before, a refused record (and a no-op) was not remembered by its
/// entity: read again, it was refused and dead-lettered again, or applied to
/// a newer state. Now its offset is written with the state as it is.
#[actix_rt::test]
async fn a_refused_record_read_again_is_recognised_and_not_dead_lettered_again() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    broker.create_topic("tallies.dead", 1);
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    produce(
        &broker.producer(),
        "tallies",
        &[add("tally0", 1), add("tally0", 0), add("tally0", 2)],
    )
    .await;
    let config = || ingest_config(&broker, "g1", "tallies").with_dead_letter_topic("tallies.dead");
    let ingest = KafkaIngest::start(config(), &tallies, JsonRecords).unwrap();
    assert_tallies_reach(&store, &expected(1, 1..=2), Duration::from_secs(60)).await;
    wait_until(
        "the refused record is dead-lettered",
        Duration::from_secs(30),
        async || ingest.stats().records_dead_lettered == 1,
    )
    .await;
    ingest.stop().await;
    let stored = store.load(&tally("tally0")).await.unwrap().unwrap();
    assert_eq!(
        stored.revision.0, 3,
        "the refused record's offset is a revision of its own"
    );
    assert_eq!(stored.source_offsets["tallies/0"], 2);

    // Read the whole partition again, as after a crash before the position save.
    store.save_offset("kafka/g1/tallies/0", 0).await.unwrap();
    let ingest = KafkaIngest::start(config(), &tallies, JsonRecords).unwrap();
    wait_until(
        "every record is read again and settled",
        Duration::from_secs(60),
        async || ingest.stats().records_applied == 3,
    )
    .await;

    assert_eq!(ingest.stats().records_dead_lettered, 0, "not dead-lettered again");
    assert_tallies_reach(&store, &expected(1, 1..=2), Duration::from_secs(5)).await;
    ingest.stop().await;
    assert_eq!(broker.read_all("tallies.dead", 2).len(), 1, "one dead letter in all");
}

/// Before, with `StartAt::Latest`, a stored position the broker no longer
/// had was reset to the end, past every record still on the broker.
#[actix_rt::test]
async fn a_stored_position_the_broker_does_not_have_reads_from_the_oldest_record_not_the_end() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    produce(&broker.producer(), "tallies", &workload(1, 1, 5)).await;
    store.save_offset("kafka/g1/tallies/0", 1_000).await.unwrap();

    let config = ingest_config(&broker, "g1", "tallies").with_start_at(StartAt::Latest);
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).unwrap();

    assert_tallies_reach(&store, &expected(1, 1..=5), Duration::from_secs(60)).await;
    assert_eq!(ingest.stats().positions_out_of_range, 1);
    ingest.stop().await;
}

/// tansu 0.6 serves a fetch that starts inside a batch of several records
/// from the next batch on (../shared/NOTES.md): the records between are
/// skipped. Offsets may legitimately have gaps in Kafka, so the ingest
/// cannot refuse them, but it counts and logs every one where reading
/// starts, so a broker that skips shows.
#[actix_rt::test]
async fn offsets_a_broker_skips_where_reading_starts_are_counted() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    // Ten records in one batch: not the one-record batches the other tests use.
    let batching: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("linger.ms", "200")
        .create()
        .unwrap();
    produce(&batching, "tallies", &workload(1, 1, 10)).await;
    // The next record to read sits inside that batch.
    store.save_offset("kafka/g1/tallies/0", 5).await.unwrap();
    produce(&broker.producer(), "tallies", &workload(1, 11, 1)).await;

    let ingest = KafkaIngest::start(ingest_config(&broker, "g1", "tallies"), &tallies, JsonRecords).unwrap();
    wait_until(
        "the record after the batch is applied",
        Duration::from_secs(60),
        async || ingest.stats().records_applied >= 1,
    )
    .await;

    let stats = ingest.stats();
    let applied = store
        .load(&tally("tally0"))
        .await
        .unwrap()
        .map(|s| s.state.applied)
        .unwrap_or_default();
    let missed = 6 - applied.iter().filter(|&&seq| (6..=10).contains(&seq)).count() as u64 - 1;
    assert_eq!(
        stats.offsets_skipped, missed,
        "every offset the broker skipped is counted: {stats:?} {applied:?}"
    );
    ingest.stop().await;
}

#[actix_rt::test]
async fn record_copies_held_for_dead_letters_are_bounded_in_bytes() {
    let Some((broker, db)) = setup("tallies", 1).await else {
        return;
    };
    broker.create_topic("tallies.dead", 1);
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());
    let config = ingest_config(&broker, "g1", "tallies")
        .with_dead_letter_topic("tallies.dead")
        .with_max_unsettled_bytes(1_000);
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).unwrap();
    produce(&broker.producer(), "tallies", &workload(1, 1, 1)).await;
    assert_tallies_reach(&store, &expected(1, 1..=1), Duration::from_secs(60)).await;

    // Nothing settles while the database is down: the copies pile up.
    db.make_unavailable();
    produce(&broker.producer(), "tallies", &workload(4, 2, 20)).await;
    wait_until("consumption pauses on bytes", Duration::from_secs(60), async || {
        ingest.stats().pauses > 0
    })
    .await;
    let during = ingest.stats();
    assert!(
        during.unsettled < 80,
        "paused before every record was read: {during:?} (each copy is about 45 bytes)"
    );
    db.make_available();

    let mut want = expected(4, 2..=21);
    want.get_mut("tally0").unwrap().insert(0, 1);
    assert_tallies_reach(&db.connect().await, &want, Duration::from_secs(60)).await;
    ingest.stop().await;
}

// ---------------------------------------------------------------------------
// Scenarios across processes.

/// Not a test on its own: the consumer process the scenarios below start,
/// kill and restart. It reads the tallies' topic into PostgreSQL until its
/// stdin closes, then leaves the group gracefully and prints its stats.
#[actix_rt::test]
#[ignore = "the consumer process of the multi-process Kafka tests; started by them"]
async fn consumer_process() {
    log();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"));
    let store: SharedStore = Arc::new(
        PostgresStore::connect_with(&var("TALLY_DATABASE_URL"), test_store_config())
            .await
            .expect("the database opens"),
    );
    let tallies = Entities::<Tally>::start(store, Config::default());
    let config = IngestConfig::new(var("TALLY_BROKERS"), "tally-consumers", [var("TALLY_TOPIC")])
        .with_client_config("session.timeout.ms", "6000")
        .with_client_config("heartbeat.interval.ms", "500")
        .with_position_save_interval(Duration::from_millis(100));
    let ingest = KafkaIngest::start(config, &tallies, JsonRecords).expect("the ingest starts");
    // On a line of its own: libtest has already printed `test consumer_process ... `.
    println!("\nconsumer ready");
    let stdin_closed = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()));
    tokio::pin!(stdin_closed);
    // Reports each change of the partitions it owns, until stdin closes.
    let mut owned = None;
    loop {
        tokio::select! {
            _ = &mut stdin_closed => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                let now = ingest.stats().partitions_owned;
                if owned != Some(now) {
                    println!("owned {now}");
                    owned = Some(now);
                }
            }
        }
    }
    let stats = ingest.stats();
    ingest.stop().await;
    println!("stats {} {}", stats.partitions_assigned, stats.records_applied);
}

/// A consumer process (this test binary running [`consumer_process`]).
struct ConsumerProcess {
    process: Child,
    stdin: Option<ChildStdin>,
    /// Its last line, `stats <partitions assigned> <records applied>`.
    stats: std::sync::mpsc::Receiver<(u64, u64)>,
    /// The partitions it owns now, as it last reported (`owned <n>`).
    owned: Arc<std::sync::atomic::AtomicU64>,
}

impl ConsumerProcess {
    fn start(broker: &Broker, db: &TestDb, topic: &str) -> Self {
        let mut process = Process::new(std::env::current_exe().unwrap())
            .args([
                "consumer_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TALLY_BROKERS", &broker.address)
            .env("TALLY_TOPIC", topic)
            .env("TALLY_DATABASE_URL", db.postgres_url().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the consumer process starts");
        let stdin = process.stdin.take();
        let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line == "consumer ready" => break,
                Some(Ok(_)) => continue,
                _ => panic!("the consumer process exited before it was ready"),
            }
        }
        // Its log, prefixed, in this test's output.
        let pid = process.id();
        let (report, stats) = std::sync::mpsc::channel();
        let owned = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let owned_report = owned.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("owned ") {
                    owned_report.store(n.parse().unwrap(), std::sync::atomic::Ordering::SeqCst);
                }
                if let Some(numbers) = line.strip_prefix("stats ") {
                    let mut numbers = numbers.split(' ').map(|n| n.parse().unwrap());
                    let _ = report.send((numbers.next().unwrap(), numbers.next().unwrap()));
                }
                eprintln!("[consumer {pid}] {line}");
            }
        });
        Self {
            process,
            stdin,
            stats,
            owned,
        }
    }

    fn owned(&self) -> u64 {
        self.owned.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// SIGKILL: no revocation, no stored position, writes cut off anywhere.
    fn kill(mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }

    /// Closes stdin: the process leaves the group gracefully. Returns the
    /// partitions it was assigned and the records it applied.
    fn stop(mut self) -> (u64, u64) {
        let mut stdin = self.stdin.take().unwrap();
        let _ = stdin.flush();
        drop(stdin);
        let status = self.process.wait().unwrap();
        assert!(status.success(), "the consumer process stopped cleanly");
        self.stats
            .recv_timeout(Duration::from_secs(5))
            .expect("the consumer reported its stats")
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// How many records of the tallies are stored.
async fn applied_count(store: &SharedStore, tallies: usize) -> usize {
    stored(store, tallies)
        .await
        .map(|s| s.values().map(Vec::len).sum())
        .unwrap_or(0)
}

#[actix_rt::test]
async fn a_consumer_killed_mid_stream_and_restarted_loses_nothing_and_applies_nothing_twice() {
    let Some((broker, db)) = setup("tallies", 4).await else {
        return;
    };
    let store = db.connect().await;
    let producer = broker.producer();
    let (tallies, per_round) = (32, 400);
    let mut consumer = ConsumerProcess::start(&broker, &db, "tallies");
    let mut kills_mid_stream = 0;
    for round in 0..3u64 {
        produce(
            &producer,
            "tallies",
            &workload(tallies, round * per_round + 1, per_round),
        )
        .await;
        let produced = tallies * ((round + 1) * per_round) as usize;
        let started = tallies * (round * per_round) as usize + 1;
        wait_until("the consumer is mid-stream", Duration::from_secs(60), async || {
            applied_count(&store, tallies).await >= started
        })
        .await;
        consumer.kill();
        let at_kill = applied_count(&store, tallies).await;
        eprintln!("round {round}: killed with {at_kill} of {produced} records applied");
        kills_mid_stream += usize::from(at_kill < produced);
        consumer = ConsumerProcess::start(&broker, &db, "tallies");
    }
    assert_tallies_reach(&store, &expected(tallies, 1..=3 * per_round), Duration::from_secs(90)).await;
    assert!(
        kills_mid_stream > 0,
        "no kill interrupted the stream: the test proved nothing"
    );
    let _ = consumer.stop();
}

#[actix_rt::test]
async fn partitions_move_between_consumers_and_every_record_is_applied_once() {
    let Some((broker, db)) = setup("tallies", 4).await else {
        return;
    };
    let store = db.connect().await;
    let producer = broker.producer();
    let tallies = 8;
    let a = ConsumerProcess::start(&broker, &db, "tallies");
    let b = ConsumerProcess::start(&broker, &db, "tallies");
    wait_until(
        "the two members share the 4 partitions",
        Duration::from_secs(60),
        async || a.owned() > 0 && b.owned() > 0 && a.owned() + b.owned() == 4,
    )
    .await;
    produce(&producer, "tallies", &workload(tallies, 1, 100)).await;
    wait_until("both consumers are mid-stream", Duration::from_secs(60), async || {
        applied_count(&store, tallies).await >= tallies * 40
    })
    .await;

    // A leaves gracefully: B takes over its partitions.
    let (_, applied_by_a) = a.stop();
    assert!(applied_by_a > 0, "A consumed before it left");
    produce(&producer, "tallies", &workload(tallies, 101, 100)).await;
    assert_tallies_reach(&store, &expected(tallies, 1..=200), Duration::from_secs(90)).await;

    // A replacement joins, then B is killed and its replacement joins.
    let c = ConsumerProcess::start(&broker, &db, "tallies");
    wait_until("B and C share the partitions", Duration::from_secs(60), async || {
        b.owned() > 0 && c.owned() > 0 && b.owned() + c.owned() == 4
    })
    .await;
    produce(&producer, "tallies", &workload(tallies, 201, 100)).await;
    wait_until("the new member is consuming", Duration::from_secs(60), async || {
        applied_count(&store, tallies).await >= tallies * 240
    })
    .await;
    b.kill();
    let d = ConsumerProcess::start(&broker, &db, "tallies");
    wait_until(
        "C and the replacement D share the partitions",
        Duration::from_secs(60),
        async || c.owned() > 0 && d.owned() > 0 && c.owned() + d.owned() == 4,
    )
    .await;
    produce(&producer, "tallies", &workload(tallies, 301, 100)).await;
    assert_tallies_reach(&store, &expected(tallies, 1..=400), Duration::from_secs(120)).await;
    let (c_partitions, c_applied) = c.stop();
    let (d_partitions, d_applied) = d.stop();
    assert!(
        c_partitions > 0 && d_partitions > 0 && c_applied > 0 && d_applied > 0,
        "the partitions are spread over the two members: C {c_partitions}/{c_applied}, D {d_partitions}/{d_applied}"
    );
}
