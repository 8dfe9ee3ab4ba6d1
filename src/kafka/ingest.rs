//! The ingest: one consumer thread reading the assigned partitions, per
//! entity one batch of records in flight at a time (so an entity's records
//! commit in offset order), and the rebalance callbacks that make ownership
//! follow the consumer group.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::config::{IngestConfig, StartAt};
use super::decode::{IngestRecord, RecordDecoder};
use super::error::IngestError;
use super::progress::Progress;
use crate::actors::Entities;
use crate::entity::{DurableEntity, EntityEvent, RecordOrigin};
use crate::error::{CommandError, StoreError};
use crate::store::SharedStore;

/// A topic partition.
type Partition = (Arc<str>, i32);

/// Reads Kafka topics in a consumer group and applies each record, once in
/// effect, to its entity through an [`EntityManager`](crate::EntityManager).
///
/// - Each record becomes a command ([`RecordDecoder`]); an entity's records
///   are sent to it in offset order, one batch at a time.
/// - The offset of the last record applied to an entity is written in the
///   same row as the state it led to (`source_offsets`), so state and
///   position never disagree; a record at or below it is acknowledged and
///   not applied again, however often it is redelivered.
/// - Per partition the ingest stores the position below which every record
///   is settled, in the store's offsets table, and resumes there when the
///   partition is assigned (Kafka's committed offsets are updated too, for
///   lag monitoring only).
/// - On revocation it stops taking the partitions' records, waits for those
///   in flight to commit, stores the positions, and passivates the entities
///   it served from partitions it does not get back, so their next owner
///   finds the committed state.
/// - Records received and not yet settled are bounded: beyond
///   [`IngestConfig::with_max_unsettled`] consumption pauses. A record that
///   fails for a reason that may pass (the database is down) is retried with
///   back-off; one that cannot be decoded, or whose command is refused, goes
///   to the dead-letter topic.
///
/// Dropping it stops it as [`stop`](Self::stop) does, without waiting.
pub struct KafkaIngest {
    shared: Arc<dyn IngestControl>,
    finished: Option<oneshot::Receiver<()>>,
    /// The longest `stop` waits for the consumer to close.
    stop_timeout: Duration,
}

/// What an ingest has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IngestStats {
    /// Records read from the assigned partitions.
    pub records_received: u64,
    /// Records whose command was committed, or found applied already.
    pub records_applied: u64,
    /// Records sent to the dead-letter topic (or skipped without one).
    pub records_dead_lettered: u64,
    /// Deliveries retried after a failure that may pass.
    pub retries: u64,
    /// Partitions assigned to this member, over all rebalances.
    pub partitions_assigned: u64,
    /// Partitions revoked from this member, over all rebalances.
    pub partitions_revoked: u64,
    /// Partitions this member owns now.
    pub partitions_owned: u64,
    /// Times consumption paused because too many records were unsettled.
    pub pauses: u64,
    /// Entities asked to passivate (resident or not) because their partition
    /// went to another member, or because this member left the group.
    pub entities_handed_over: u64,
    /// Partition positions written to the store.
    pub positions_saved: u64,
    /// Records received and not yet settled, now.
    pub unsettled: u64,
}

impl KafkaIngest {
    /// Starts reading `config`'s topics into `entities`, each record decoded
    /// by `decoder`. Fails if the Kafka client cannot be created or subscribe.
    pub fn start<E: DurableEntity>(
        config: IngestConfig,
        entities: &Entities<E>,
        decoder: impl RecordDecoder<E>,
    ) -> Result<Self, IngestError> {
        if config.topics.is_empty() {
            return Err(IngestError::InvalidConfig("no topic to read".into()));
        }
        let cooperative = config
            .client_config
            .iter()
            .any(|(key, value)| key == "partition.assignment.strategy" && value.contains("cooperative"));
        if cooperative {
            return Err(IngestError::InvalidConfig(
                "the cooperative rebalance protocol is not supported: the ingest assigns partitions eagerly".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("persist-durable-ingest")
            .enable_all()
            .build()
            .map_err(IngestError::Io)?;
        let handle = runtime.handle().clone();
        let runtime = IngestRuntime(Some(runtime));
        let stop_timeout = config.revocation_timeout + Duration::from_secs(15);
        let (ingest, consumer) = Ingest::prepare(config, entities, decoder, handle)?;
        let (done, finished) = oneshot::channel();
        let thread_ingest = ingest.clone();
        std::thread::Builder::new()
            .name("persist-durable-consumer".into())
            .spawn(move || {
                thread_ingest.consume(&consumer);
                thread_ingest.close(consumer);
                runtime.shutdown(Duration::from_secs(1));
                let _ = done.send(());
            })
            .map_err(IngestError::Io)?;
        Ok(Self {
            shared: ingest,
            finished: Some(finished),
            stop_timeout,
        })
    }

    /// What it has done so far.
    pub fn stats(&self) -> IngestStats {
        self.shared.stats()
    }

    /// Leaves the consumer group gracefully: stops reading, lets the records
    /// in flight commit, stores the positions, passivates the entities it
    /// served, and returns once the consumer is closed (the group then
    /// rebalances its partitions to the other members). Returns after the
    /// revocation timeout plus 15 s at the latest (a broker that cannot be
    /// reached), leaving the consumer to close in the background.
    pub async fn stop(mut self) {
        self.shared.request_stop();
        if let Some(finished) = self.finished.take() {
            if tokio::time::timeout(self.stop_timeout, finished).await.is_err() {
                warn!(timeout = ?self.stop_timeout, "the consumer did not close in time; leaving it to close in the background");
            }
        }
    }
}

impl Drop for KafkaIngest {
    fn drop(&mut self) {
        self.shared.request_stop();
    }
}

/// The ingest's own runtime. Dropped on an error path of `start`, it shuts
/// down in the background: dropping a runtime inside the caller's async
/// context would panic.
struct IngestRuntime(Option<tokio::runtime::Runtime>);

impl IngestRuntime {
    /// From the consumer thread, once it is done: lets deliveries finish.
    fn shutdown(mut self, timeout: Duration) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_timeout(timeout);
        }
    }
}

impl Drop for IngestRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What the handle needs of an ingest of any entity type.
trait IngestControl: Send + Sync {
    fn stats(&self) -> IngestStats;
    fn request_stop(&self);
}

impl<E: DurableEntity> IngestControl for Ingest<E> {
    fn stats(&self) -> IngestStats {
        let state = self.lock();
        let (unsettled, owned) = (state.unsettled as u64, state.owned.len() as u64);
        drop(state);
        IngestStats {
            partitions_owned: owned,
            ..self.counters.snapshot(unsettled)
        }
    }

    fn request_stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

struct Ingest<E: DurableEntity> {
    config: IngestConfig,
    entities: Entities<E>,
    store: SharedStore,
    decoder: Box<dyn RecordDecoder<E>>,
    state: Mutex<State<E>>,
    /// Signalled whenever records settle: a revocation waits on it.
    settled: Condvar,
    counters: Counters,
    stopping: AtomicBool,
    dead_letters: Option<FutureProducer>,
    /// Where deliveries, retries and dead-lettering run.
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    applied: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    assigned: AtomicU64,
    revoked: AtomicU64,
    pauses: AtomicU64,
    handed_over: AtomicU64,
    positions_saved: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self, unsettled: u64) -> IngestStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        IngestStats {
            records_received: get(&self.received),
            records_applied: get(&self.applied),
            records_dead_lettered: get(&self.dead_lettered),
            retries: get(&self.retries),
            partitions_assigned: get(&self.assigned),
            partitions_revoked: get(&self.revoked),
            pauses: get(&self.pauses),
            entities_handed_over: get(&self.handed_over),
            positions_saved: get(&self.positions_saved),
            unsettled,
            partitions_owned: 0,
        }
    }
}

struct State<E: DurableEntity> {
    /// The partitions this member owns.
    owned: HashMap<Partition, Owned<E>>,
    /// Per entity, its records waiting and whether a batch is in flight.
    lanes: HashMap<E::Key, Lane<E>>,
    /// Records received and not settled, over all partitions.
    unsettled: usize,
    /// Entities served from partitions revoked in the last rebalance: handed
    /// over at the next assignment unless their partition comes back.
    revoked: HashMap<Partition, HashSet<E::Key>>,
    /// Numbers each assignment of a partition, so that a record of an
    /// earlier assignment never counts in a later one.
    next_epoch: u64,
}

impl<E: DurableEntity> Default for State<E> {
    fn default() -> Self {
        Self {
            owned: HashMap::new(),
            lanes: HashMap::new(),
            unsettled: 0,
            revoked: HashMap::new(),
            next_epoch: 0,
        }
    }
}

/// An owned partition.
struct Owned<E: DurableEntity> {
    epoch: u64,
    /// `topic/partition`: the key of entities' `source_offsets`.
    label: Arc<str>,
    progress: Progress,
    /// Records of it sent to entities (or to the dead-letter topic) and not settled.
    in_flight: usize,
    /// Entities its records went to.
    served: HashSet<E::Key>,
    /// The position last stored.
    saved: Option<i64>,
}

struct Lane<E: DurableEntity> {
    waiting: VecDeque<Pending<E>>,
    busy: bool,
}

/// A decoded record on its way to its entity.
struct Pending<E: DurableEntity> {
    partition: Partition,
    epoch: u64,
    event: EntityEvent<E::Command>,
    origin: RecordOrigin,
    raw: RawRecord,
}

/// What a dead letter carries of the record it replaces.
struct RawRecord {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// librdkafka's callbacks: the rebalance is the ingest's.
struct IngestContext<E: DurableEntity>(Arc<Ingest<E>>);

impl<E: DurableEntity> ClientContext for IngestContext<E> {}

impl<E: DurableEntity> ConsumerContext for IngestContext<E> {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.0.assigned(consumer, tpl);
                consumer.assign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.0.revoked(consumer, tpl);
                consumer.unassign()
            }
            other => {
                error!(error = ?other, "rebalance failed; dropping the assignment");
                self.0.revoked(consumer, tpl);
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            error!(%error, "could not apply the new assignment");
        }
    }
}

/// A consumer subscribed to the ingest's topics.
type SubscribedConsumer<E> = BaseConsumer<IngestContext<E>>;

impl<E: DurableEntity> Ingest<E> {
    /// Everything that can fail before the consumer thread starts.
    fn prepare(
        config: IngestConfig,
        entities: &Entities<E>,
        decoder: impl RecordDecoder<E>,
        runtime: tokio::runtime::Handle,
    ) -> Result<(Arc<Self>, SubscribedConsumer<E>), IngestError> {
        let dead_letters = match &config.dead_letter_topic {
            None => None,
            Some(_) => {
                let _guard = runtime.enter();
                // The same connection settings (security, ...) as the consumer's.
                let mut client = ClientConfig::new();
                for (key, value) in &config.client_config {
                    client.set(key, value);
                }
                Some(
                    client
                        .set("bootstrap.servers", &config.brokers)
                        .set("enable.idempotence", "true")
                        .create::<FutureProducer>()
                        .map_err(IngestError::Kafka)?,
                )
            }
        };
        let ingest = Arc::new(Ingest {
            entities: entities.clone(),
            store: entities.store().clone(),
            decoder: Box::new(decoder),
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            dead_letters,
            runtime,
            config,
        });
        let consumer = ingest.consumer()?;
        let topics: Vec<&str> = ingest.config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(IngestError::Kafka)?;
        Ok((ingest, consumer))
    }

    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // A panic elsewhere cannot leave the bookkeeping half-done: every
        // change under the lock is a few assignments.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn consumer(self: &Arc<Self>) -> Result<BaseConsumer<IngestContext<E>>, IngestError> {
        let mut client = ClientConfig::new();
        for (key, value) in &self.config.client_config {
            client.set(key, value);
        }
        let reset = match self.config.start_at {
            StartAt::Earliest => "earliest",
            StartAt::Latest => "latest",
        };
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", reset)
            .create_with_context(IngestContext(self.clone()))
            .map_err(IngestError::Kafka)
    }

    /// The consumer thread's loop, until a stop is asked for.
    fn consume(self: &Arc<Self>, consumer: &BaseConsumer<IngestContext<E>>) {
        let mut paused = false;
        let mut last_save = Instant::now();
        while !self.stopping.load(Ordering::Relaxed) {
            paused = self.apply_back_pressure(consumer, paused);
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) => self.receive(&message),
                Some(Err(error)) => warn!(%error, "Kafka consumer error"),
            }
            if last_save.elapsed() >= self.config.position_save_interval {
                self.save_positions(consumer);
                last_save = Instant::now();
            }
        }
    }

    /// Pauses every assigned partition while too many records are
    /// unsettled, and resumes them below the low-water mark.
    fn apply_back_pressure(&self, consumer: &BaseConsumer<IngestContext<E>>, paused: bool) -> bool {
        let unsettled = self.lock().unsettled;
        let over = unsettled >= self.config.max_unsettled;
        if !(over || paused && unsettled <= self.config.resume_below) {
            return paused;
        }
        let Ok(assignment) = consumer.assignment() else {
            return paused;
        };
        if over {
            // Again each time: partitions assigned since are not paused yet.
            if let Err(error) = consumer.pause(&assignment) {
                warn!(%error, "could not pause the partitions");
            }
            if !paused {
                Counters::add(&self.counters.pauses, 1);
                metrics::counter!("persist_durable_ingest_pauses_total", "entity" => E::ENTITY_TYPE).increment(1);
                info!(unsettled, "pausing consumption: too many records in flight");
            }
            return true;
        }
        if let Err(error) = consumer.resume(&assignment) {
            warn!(%error, "could not resume the partitions");
            return true;
        }
        info!(unsettled, "resuming consumption");
        false
    }

    /// Decodes a record and queues it for its entity, or dead-letters it.
    fn receive(self: &Arc<Self>, message: &rdkafka::message::BorrowedMessage<'_>) {
        let record = IngestRecord::from_message(message);
        let decoded = self.decoder.decode(&record);
        // Copied only if it may become a dead letter: without a topic for
        // them, a refused record is logged and skipped.
        let raw = match self.dead_letters {
            Some(_) => RawRecord {
                key: record.key.map(<[u8]>::to_vec),
                payload: record.payload.map(<[u8]>::to_vec),
            },
            None => RawRecord {
                key: None,
                payload: None,
            },
        };
        let partition: Partition = (Arc::from(record.topic), record.partition);
        let mut state = self.lock();
        let Some(owned) = state.owned.get_mut(&partition) else {
            // Fetched before its partition was revoked: its next owner reads it.
            return;
        };
        Counters::add(&self.counters.received, 1);
        owned.progress.received(record.offset);
        let (epoch, label) = (owned.epoch, owned.label.clone());
        let origin = RecordOrigin {
            partition: label,
            offset: record.offset,
        };
        match decoded {
            Ok((key, event)) => {
                // Counted in flight when its batch leaves.
                owned.served.insert(key.clone());
                state.unsettled += 1;
                let lane = state.lanes.entry(key.clone()).or_insert_with(|| Lane {
                    waiting: VecDeque::new(),
                    busy: false,
                });
                lane.waiting.push_back(Pending {
                    partition,
                    epoch,
                    event,
                    origin,
                    raw,
                });
                self.dispatch(&mut state, key);
            }
            Err(invalid) => {
                owned.in_flight += 1;
                state.unsettled += 1;
                drop(state);
                warn!(topic = record.topic, partition = record.partition, offset = record.offset, error = %invalid,
                    "record cannot be decoded; dead-lettering it");
                let this = self.clone();
                let reason = invalid.to_string();
                self.runtime.spawn(async move {
                    this.dead_letter(&partition, origin.offset, &raw, &reason).await;
                    this.settle(&[(partition, epoch, origin.offset)], true);
                });
            }
        }
    }

    /// Sends `key`'s next batch if none is in flight. Called under the lock.
    fn dispatch(self: &Arc<Self>, state: &mut State<E>, key: E::Key) {
        let Some(lane) = state.lanes.get_mut(&key) else {
            return;
        };
        if lane.busy {
            return;
        }
        if lane.waiting.is_empty() {
            state.lanes.remove(&key);
            return;
        }
        let take = lane.waiting.len().min(self.config.max_batch_per_entity);
        let batch: Vec<Pending<E>> = lane.waiting.drain(..take).collect();
        lane.busy = true;
        for pending in &batch {
            if let Some(owned) = state
                .owned
                .get_mut(&pending.partition)
                .filter(|o| o.epoch == pending.epoch)
            {
                owned.in_flight += 1;
            }
        }
        let this = self.clone();
        self.runtime.spawn(async move { this.deliver(key, batch).await });
    }

    /// Delivers one batch to its entity until every record is settled,
    /// retrying from the first that failed for a reason that may pass.
    async fn deliver(self: Arc<Self>, key: E::Key, mut batch: Vec<Pending<E>>) {
        let mut backoff = self.config.retry_backoff.0;
        // Halved when the entity's queue cannot take this many at once.
        let mut chunk = batch.len();
        loop {
            self.drop_unowned(&mut batch);
            if batch.is_empty() {
                break;
            }
            let sending = chunk.min(batch.len());
            let records = batch[..sending]
                .iter()
                .map(|p| (p.event.clone(), p.origin.clone()))
                .collect();
            let results = self.entities.send_records(key.clone(), records).await;
            let mut settled = Vec::with_capacity(batch.len());
            let mut retry_from = None;
            for (index, (pending, result)) in batch.iter().zip(results).enumerate() {
                match result {
                    Ok(_) => settled.push((pending.partition.clone(), pending.epoch, pending.origin.offset)),
                    Err(error) if error.is_retryable() => {
                        retry_from = Some((index, error));
                        break;
                    }
                    Err(refused) => {
                        // Settled in order with the rest once it is in the dead-letter topic.
                        self.settle(&settled, false);
                        settled.clear();
                        warn!(key = %key, offset = pending.origin.offset, error = %refused,
                            "record refused; dead-lettering it");
                        self.dead_letter(
                            &pending.partition,
                            pending.origin.offset,
                            &pending.raw,
                            &refused.to_string(),
                        )
                        .await;
                        self.settle(
                            &[(pending.partition.clone(), pending.epoch, pending.origin.offset)],
                            true,
                        );
                    }
                }
            }
            self.settle(&settled, false);
            let Some((index, error)) = retry_from else {
                batch.drain(..sending);
                continue;
            };
            // Those before it are settled; it and those after it go again,
            // in order (the entity answers any already applied at once).
            batch.drain(..index);
            if index == 0 && sending > 1 && matches!(error, CommandError::Overloaded { .. }) {
                chunk = sending / 2;
                continue;
            }
            Counters::add(&self.counters.retries, 1);
            metrics::counter!("persist_durable_ingest_retries_total", "entity" => E::ENTITY_TYPE).increment(1);
            warn!(key = %key, records = batch.len(), %error, retry_in = ?backoff, "delivery failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.retry_backoff.1);
        }
        let mut state = self.lock();
        if let Some(lane) = state.lanes.get_mut(&key) {
            lane.busy = false;
        }
        self.dispatch(&mut state, key);
    }

    /// Removes from `batch` the records of partitions no longer owned (their
    /// next owner reads them again), as no longer in flight here.
    fn drop_unowned(&self, batch: &mut Vec<Pending<E>>) {
        let mut state = self.lock();
        let before = batch.len();
        batch.retain(|p| state.owned.get(&p.partition).is_some_and(|o| o.epoch == p.epoch));
        let dropped = before - batch.len();
        if dropped > 0 {
            state.unsettled -= dropped;
            self.settled.notify_all();
        }
    }

    /// Marks records settled: applied, found applied, or dead-lettered.
    fn settle(&self, records: &[(Partition, u64, i64)], dead_lettered: bool) {
        if records.is_empty() {
            return;
        }
        let mut state = self.lock();
        for (partition, epoch, offset) in records {
            state.unsettled -= 1;
            if let Some(owned) = state.owned.get_mut(partition).filter(|o| o.epoch == *epoch) {
                owned.progress.settled(*offset);
                owned.in_flight -= 1;
            }
        }
        drop(state);
        let n = records.len() as u64;
        if dead_lettered {
            Counters::add(&self.counters.dead_lettered, n);
            metrics::counter!("persist_durable_ingest_records_total", "entity" => E::ENTITY_TYPE, "outcome" => "dead_lettered").increment(n);
        } else {
            Counters::add(&self.counters.applied, n);
            metrics::counter!("persist_durable_ingest_records_total", "entity" => E::ENTITY_TYPE, "outcome" => "applied").increment(n);
        }
        self.settled.notify_all();
    }

    /// Sends a copy of the record to the dead-letter topic, with why and
    /// where it came from in headers; retried until the broker has it.
    async fn dead_letter(&self, partition: &Partition, offset: i64, raw: &RawRecord, reason: &str) {
        let (Some(producer), Some(topic)) = (&self.dead_letters, &self.config.dead_letter_topic) else {
            error!(topic = %partition.0, partition = partition.1, offset, reason, "record skipped: no dead-letter topic is set");
            return;
        };
        let partition_text = partition.1.to_string();
        let offset_text = offset.to_string();
        let mut backoff = self.config.retry_backoff.0;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "persist-durable.error",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "persist-durable.origin.topic",
                    value: Some(&*partition.0),
                })
                .insert(Header {
                    key: "persist-durable.origin.partition",
                    value: Some(&partition_text),
                })
                .insert(Header {
                    key: "persist-durable.origin.offset",
                    value: Some(&offset_text),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(key) = &raw.key {
                record = record.key(key);
            }
            if let Some(payload) = &raw.payload {
                record = record.payload(payload);
            }
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return,
                Err((error, _)) => {
                    warn!(%error, topic, retry_in = ?backoff, "could not write a dead letter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
            }
        }
    }

    /// Takes over newly assigned partitions: reads where each was left from
    /// the store, and hands over the entities of revoked partitions that did
    /// not come back.
    fn assigned(&self, consumer: &BaseConsumer<IngestContext<E>>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut starts = Vec::with_capacity(partitions.len());
        let mut to_store = Vec::new();
        for (topic, partition) in &partitions {
            let stored = self.stored_position(topic, *partition);
            let mut start = stored.unwrap_or(None);
            if stored == Ok(None) && self.config.start_at == StartAt::Latest {
                // The end as an offset, stored at once: a member that takes
                // the partition over before a record arrives must start here
                // too, not at a later end.
                match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10)) {
                    Ok((_, high)) => {
                        start = Some(high);
                        to_store.push(((Arc::from(topic.as_str()), *partition), high));
                    }
                    Err(error) => warn!(%error, topic, partition, "could not read the partition's end"),
                }
            }
            let offset = match start {
                Some(position) => Offset::Offset(position),
                None => match self.config.start_at {
                    StartAt::Earliest => Offset::Beginning,
                    StartAt::Latest => Offset::End,
                },
            };
            if let Err(error) = tpl.set_partition_offset(topic, *partition, offset) {
                warn!(%error, topic, partition, "could not set the start position");
            }
            starts.push(start);
        }
        let mut state = self.lock();
        for ((topic, partition), start) in partitions.iter().zip(starts) {
            state.next_epoch += 1;
            let owned = Owned {
                epoch: state.next_epoch,
                label: format!("{topic}/{partition}").into(),
                progress: Progress::starting_at(start),
                in_flight: 0,
                served: HashSet::new(),
                saved: start,
            };
            let key: Partition = (Arc::from(topic.as_str()), *partition);
            // Its entities stay here: nobody else wrote them meanwhile.
            if let Some(kept) = state.revoked.remove(&key) {
                let mut owned = owned;
                owned.served = kept;
                state.owned.insert(key, owned);
            } else {
                state.owned.insert(key, owned);
            }
        }
        let handed_over: Vec<E::Key> = std::mem::take(&mut state.revoked).into_values().flatten().collect();
        drop(state);
        self.store_positions(consumer, &to_store);
        Counters::add(&self.counters.assigned, partitions.len() as u64);
        metrics::counter!("persist_durable_ingest_partitions_total", "entity" => E::ENTITY_TYPE, "change" => "assigned")
            .increment(partitions.len() as u64);
        info!(partitions = ?partitions, "partitions assigned");
        self.hand_over(handed_over);
    }

    /// The stored position of a partition; waits out a database outage
    /// (reading from elsewhere could apply nothing twice, but would re-read
    /// the whole partition).
    /// `Err` only when stopping, or for a store that keeps no positions.
    fn stored_position(&self, topic: &str, partition: i32) -> Result<Option<i64>, ()> {
        let name = self.config.position_name(topic, partition);
        let mut backoff = self.config.retry_backoff.0;
        loop {
            match self.runtime.block_on(self.store.load_offset(&name)) {
                Ok(position) => return Ok(position.and_then(|p| i64::try_from(p).ok())),
                Err(error @ StoreError::Unsupported(_)) => {
                    // Correct still (each entity's offsets recognise what was
                    // applied), but every assignment reads from the start.
                    error!(%error, topic, partition, "this store keeps no positions");
                    return Err(());
                }
                Err(error) if !self.stopping.load(Ordering::Relaxed) => {
                    warn!(%error, topic, partition, retry_in = ?backoff, "could not read the stored position; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
                Err(error) => {
                    warn!(%error, topic, partition, "could not read the stored position; stopping anyway");
                    return Err(());
                }
            }
        }
    }

    /// Gives up partitions: takes no more of their records, waits for those
    /// in flight to commit, stores their positions.
    fn revoked(&self, consumer: &BaseConsumer<IngestContext<E>>, tpl: &TopicPartitionList) {
        let partitions: HashSet<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let mut state = self.lock();
        // Waiting records are not sent: the next owner reads them.
        let mut dropped = 0;
        for lane in state.lanes.values_mut() {
            let before = lane.waiting.len();
            lane.waiting.retain(|p| !partitions.contains(&p.partition));
            dropped += before - lane.waiting.len();
        }
        state.unsettled -= dropped;
        state.lanes.retain(|_, lane| lane.busy || !lane.waiting.is_empty());
        let deadline = Instant::now() + self.config.revocation_timeout;
        loop {
            let in_flight: usize = partitions
                .iter()
                .filter_map(|p| state.owned.get(p))
                .map(|o| o.in_flight)
                .sum();
            let now = Instant::now();
            if in_flight == 0 {
                break;
            }
            if now >= deadline {
                warn!(
                    in_flight,
                    "revocation timed out; the next owner takes over the records in flight"
                );
                break;
            }
            state = self
                .settled
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let mut final_positions = Vec::new();
        for partition in &partitions {
            if let Some(owned) = state.owned.remove(partition) {
                if let Some(position) = owned.progress.position() {
                    final_positions.push((partition.clone(), position));
                }
                state.revoked.insert(partition.clone(), owned.served);
            }
        }
        let handed_over: Vec<E::Key> = if self.stopping.load(Ordering::Relaxed) {
            std::mem::take(&mut state.revoked).into_values().flatten().collect()
        } else {
            Vec::new()
        };
        drop(state);
        self.store_positions(consumer, &final_positions);
        Counters::add(&self.counters.revoked, partitions.len() as u64);
        metrics::counter!("persist_durable_ingest_partitions_total", "entity" => E::ENTITY_TYPE, "change" => "revoked")
            .increment(partitions.len() as u64);
        info!(partitions = ?partitions, "partitions revoked");
        self.hand_over(handed_over);
    }

    /// Passivates entities whose partition went to another member.
    fn hand_over(&self, keys: Vec<E::Key>) {
        if keys.is_empty() {
            return;
        }
        debug!(entities = keys.len(), "handing over entities");
        Counters::add(&self.counters.handed_over, keys.len() as u64);
        self.entities.hand_over(keys);
    }

    /// Stores the positions that moved since last stored.
    fn save_positions(&self, consumer: &BaseConsumer<IngestContext<E>>) {
        let moved: Vec<(Partition, i64)> = {
            let state = self.lock();
            state
                .owned
                .iter()
                .filter_map(|(p, o)| {
                    o.progress
                        .position()
                        .filter(|&pos| Some(pos) != o.saved)
                        .map(|pos| (p.clone(), pos))
                })
                .collect()
        };
        let stored = self.store_positions(consumer, &moved);
        let mut state = self.lock();
        for (partition, position) in stored {
            if let Some(owned) = state.owned.get_mut(&partition) {
                owned.saved = Some(owned.saved.map_or(position, |saved| saved.max(position)));
            }
        }
    }

    /// Writes positions to the store, then to Kafka (for lag monitoring);
    /// returns those stored. A position not stored only means re-reading
    /// records that entities recognise as applied.
    fn store_positions(
        &self,
        consumer: &BaseConsumer<IngestContext<E>>,
        positions: &[(Partition, i64)],
    ) -> Vec<(Partition, i64)> {
        let mut stored = Vec::with_capacity(positions.len());
        let mut tpl = TopicPartitionList::new();
        for (partition, position) in positions {
            let name = self.config.position_name(&partition.0, partition.1);
            let Ok(unsigned) = u64::try_from(*position) else {
                continue;
            };
            match self.runtime.block_on(self.store.save_offset(&name, unsigned)) {
                Ok(()) => {
                    stored.push((partition.clone(), *position));
                    let _ = tpl.add_partition_offset(&partition.0, partition.1, Offset::Offset(*position));
                }
                Err(error) => warn!(%error, partition = %name, "could not store the position; it is stored later"),
            }
        }
        Counters::add(&self.counters.positions_saved, stored.len() as u64);
        if tpl.count() > 0 {
            if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                debug!(%error, "could not commit offsets to Kafka (used for lag monitoring only)");
            }
        }
        stored
    }

    /// Leaves the group: the revocation this causes lets in-flight records
    /// commit, stores positions and hands every entity over.
    fn close(&self, consumer: BaseConsumer<IngestContext<E>>) {
        info!("leaving the consumer group");
        consumer.unsubscribe();
        let deadline = Instant::now() + self.config.revocation_timeout + Duration::from_secs(5);
        while Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(50));
            let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            if assigned == 0 && self.lock().owned.is_empty() {
                break;
            }
        }
        let leftover: Vec<E::Key> = std::mem::take(&mut self.lock().revoked)
            .into_values()
            .flatten()
            .collect();
        self.hand_over(leftover);
        drop(consumer);
    }
}
