//! The ingest's handle: [`KafkaIngest`], which starts the consumer thread
//! and its runtime, reports [`IngestStats`] and stops it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::warn;

use super::config::IngestConfig;
use super::decode::RecordDecoder;
use super::error::IngestError;
use super::ingest::Ingest;
use crate::actors::Entities;
use crate::entity::DurableEntity;

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
///   to the dead-letter topic, and is never applied: its entity remembers it
///   as refused until the dead letter is written, and one the entity could
///   not note (its row is corrupt) gets a dead-letter intent in the store
///   first, so that read again it is not delivered. A crash between a dead
///   letter and what follows it writes a second copy at most.
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
    /// Records sent to the dead-letter topic (or skipped without one), or
    /// read again and found there already (a dead-letter intent marked
    /// written).
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
    /// Offsets the broker skipped where reading started again (an
    /// assignment, a resume after back-pressure): the first record came
    /// later than the offset asked for. Kafka leaves such gaps for compacted
    /// or expired records and transaction markers; a broker that serves a
    /// fetch from a later batch than asked (tansu 0.6) shows here too. Each
    /// gap is logged and counted in `persist_durable_ingest_offsets_skipped_total`.
    pub offsets_skipped: u64,
    /// Stored positions found outside what the broker holds at an
    /// assignment (its records expired, or the topic was recreated): read
    /// from the oldest record it holds instead, and logged.
    pub positions_out_of_range: u64,
    /// Records whose dead letter was given up because their partition moved
    /// to another member first: the new owner reads them again.
    pub dead_letters_dropped: u64,
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
        let consumer_protocol = config
            .client_config
            .iter()
            .any(|(key, value)| key == "group.protocol" && value.trim().eq_ignore_ascii_case("consumer"));
        if consumer_protocol {
            return Err(IngestError::InvalidConfig(
                "group.protocol=consumer (KIP-848) is not supported: the ingest assigns partitions eagerly in its \
                 rebalance callback, which would stall partitions under it; use the classic protocol"
                    .into(),
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
