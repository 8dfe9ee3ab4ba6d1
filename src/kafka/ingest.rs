//! What one ingest is: the state its consumer thread, its deliveries and its
//! rebalance callbacks share, and how it is set up. Its jobs are in files of
//! their own: `consume` (the consumer loop and back-pressure), `deliver`
//! (delivery and retry), `dead_letter`, `rebalance` (assignment, revocation,
//! hand-over) and `positions` (stored partition positions).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::error;

use super::config::IngestConfig;
use super::decode::RecordDecoder;
use super::error::IngestError;
use super::handle::IngestStats;
use super::state::State;
use crate::actors::Entities;
use crate::entity::DurableEntity;
use crate::store::SharedStore;

/// One ingest of entities of `E`: what the consumer thread, the deliveries
/// and the rebalance callbacks share.
pub(super) struct Ingest<E: DurableEntity> {
    pub(super) config: IngestConfig,
    pub(super) entities: Entities<E>,
    pub(super) store: SharedStore,
    pub(super) decoder: Box<dyn RecordDecoder<E>>,
    pub(super) state: Mutex<State<E>>,
    /// Signalled whenever records settle: a revocation waits on it.
    pub(super) settled: Condvar,
    pub(super) counters: Counters,
    pub(super) stopping: AtomicBool,
    /// A periodic position save is running.
    pub(super) saving: AtomicBool,
    pub(super) dead_letters: Option<FutureProducer>,
    /// Where deliveries, retries and dead-lettering run.
    pub(super) runtime: tokio::runtime::Handle,
}

/// What the ingest counts, for [`IngestStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) applied: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) assigned: AtomicU64,
    pub(super) revoked: AtomicU64,
    pub(super) pauses: AtomicU64,
    pub(super) handed_over: AtomicU64,
    pub(super) positions_saved: AtomicU64,
    pub(super) offset_gaps: AtomicU64,
    pub(super) dead_letters_dropped: AtomicU64,
    pub(super) positions_out_of_range: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self, unsettled: u64) -> IngestStats {
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
            offsets_skipped: get(&self.offset_gaps),
            dead_letters_dropped: get(&self.dead_letters_dropped),
            positions_out_of_range: get(&self.positions_out_of_range),
            unsettled,
            partitions_owned: 0,
        }
    }
}

/// librdkafka's callbacks: the rebalance is the ingest's.
pub(super) struct IngestContext<E: DurableEntity>(Arc<Ingest<E>>);

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
pub(super) type SubscribedConsumer<E> = BaseConsumer<IngestContext<E>>;

impl<E: DurableEntity> Ingest<E> {
    /// Everything that can fail before the consumer thread starts.
    pub(super) fn prepare(
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
            saving: AtomicBool::new(false),
            dead_letters,
            runtime,
            config,
        });
        let consumer = ingest.consumer()?;
        let topics: Vec<&str> = ingest.config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(IngestError::Kafka)?;
        Ok((ingest, consumer))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State<E>> {
        // A panic elsewhere cannot leave the bookkeeping half-done: every
        // change under the lock is a few assignments.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn consumer(self: &Arc<Self>) -> Result<BaseConsumer<IngestContext<E>>, IngestError> {
        let mut client = ClientConfig::new();
        for (key, value) in &self.config.client_config {
            client.set(key, value);
        }
        // Where a partition starts is set explicitly at each assignment
        // (its stored position, or the start or end as StartAt says). This
        // only decides what happens to a stored position the broker no
        // longer has: read from the oldest record it still has, never skip
        // to the end past records still there; the gap is counted.
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(IngestContext(self.clone()))
            .map_err(IngestError::Kafka)
    }
}
