//! Partition positions in the store: read when a partition is assigned,
//! saved as records settle, and committed to Kafka for lag monitoring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use super::ingest::{Counters, Ingest, IngestContext};
use super::state::Partition;
use crate::entity::DurableEntity;

/// What the store holds of a partition's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoredPosition {
    /// The next offset to read.
    At(i64),
    /// Nothing stored: the partition was never read by this group.
    None,
    /// Not read: the ingest is stopping and the store did not answer.
    Unread,
}

impl StoredPosition {
    /// The offset to resume at, if one is known.
    pub(super) fn offset(self) -> Option<i64> {
        match self {
            StoredPosition::At(offset) => Some(offset),
            StoredPosition::None | StoredPosition::Unread => None,
        }
    }
}

impl<E: DurableEntity> Ingest<E> {
    /// The stored position of a partition; waits out a database outage
    /// (reading from elsewhere could apply nothing twice, but would re-read
    /// the whole partition), unless the ingest is stopping.
    pub(super) fn stored_position(&self, topic: &str, partition: i32) -> StoredPosition {
        let name = self.config.position_name(topic, partition);
        let mut backoff = self.config.retry_backoff.0;
        loop {
            match self.runtime.block_on(self.store.load_offset(&name)) {
                Ok(Some(position)) => match i64::try_from(position) {
                    Ok(position) => return StoredPosition::At(position),
                    Err(_) => return StoredPosition::None,
                },
                Ok(None) => return StoredPosition::None,
                Err(error) if !self.stopping.load(Ordering::Relaxed) => {
                    warn!(%error, topic, partition, retry_in = ?backoff, "could not read the stored position; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
                Err(error) => {
                    warn!(%error, topic, partition, "could not read the stored position; stopping anyway");
                    return StoredPosition::Unread;
                }
            }
        }
    }

    /// Stores the positions that moved since last stored, off the consumer
    /// thread: a database outage must not stall the thread that keeps the
    /// member in its group. One save runs at a time; what it stores is
    /// committed to Kafka (for lag monitoring) by the next call.
    pub(super) fn save_positions(self: &Arc<Self>, consumer: &BaseConsumer<IngestContext<E>>) {
        self.commit_saved_to_kafka(consumer);
        if self.saving.swap(true, Ordering::AcqRel) {
            return;
        }
        let moved: Vec<(Partition, u64, i64)> = {
            let state = self.lock();
            state
                .owned
                .iter()
                .filter_map(|(p, o)| {
                    o.progress
                        .position()
                        .filter(|&pos| Some(pos) != o.saved)
                        .map(|pos| (p.clone(), o.epoch, pos))
                })
                .collect()
        };
        let this = self.clone();
        self.runtime.spawn(async move {
            let saves = moved
                .iter()
                .map(|(partition, _, position)| this.save(partition, *position));
            let outcomes = futures_util::future::join_all(saves).await;
            let stored: Vec<(Partition, u64, i64)> = moved
                .into_iter()
                .zip(outcomes)
                .filter_map(|(moved, saved)| saved.then_some(moved))
                .collect();
            {
                let mut state = this.lock();
                for (partition, epoch, position) in &stored {
                    if let Some(owned) = state.owned.get_mut(partition).filter(|o| o.epoch == *epoch) {
                        owned.saved = Some(owned.saved.map_or(*position, |saved| saved.max(*position)));
                    }
                }
            }
            // Reading never starts below a stored position again.
            this.remove_passed_intents(&stored).await;
            this.saving.store(false, Ordering::Release);
        });
    }

    /// Commits the positions stored since the last commit to Kafka, where
    /// they serve lag monitoring only.
    fn commit_saved_to_kafka(&self, consumer: &BaseConsumer<IngestContext<E>>) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut state = self.lock();
            for (partition, owned) in state.owned.iter_mut() {
                if let Some(saved) = owned.saved.filter(|&saved| Some(saved) != owned.committed_to_kafka) {
                    let _ = tpl.add_partition_offset(&partition.0, partition.1, Offset::Offset(saved));
                    owned.committed_to_kafka = Some(saved);
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                debug!(%error, "could not commit offsets to Kafka (used for lag monitoring only)");
            }
        }
    }

    /// Stores one partition's position; false if it could not be (it is
    /// stored later, and until then only records the entities recognise as
    /// applied are read again).
    async fn save(&self, partition: &Partition, position: i64) -> bool {
        let name = self.config.position_name(&partition.0, partition.1);
        let Ok(unsigned) = u64::try_from(position) else {
            return false;
        };
        match self.store.save_offset(&name, unsigned).await {
            Ok(()) => {
                Counters::add(&self.counters.positions_saved, 1);
                true
            }
            Err(error) => {
                warn!(%error, partition = %name, "could not store the position; it is stored later");
                false
            }
        }
    }

    /// Writes positions to the store before a partition changes hands, all
    /// at once and within the revocation timeout in all, then to Kafka;
    /// returns those stored.
    pub(super) fn store_positions(
        &self,
        consumer: &BaseConsumer<IngestContext<E>>,
        positions: &[(Partition, i64)],
    ) -> Vec<(Partition, i64)> {
        if positions.is_empty() {
            return Vec::new();
        }
        let saves = futures_util::future::join_all(positions.iter().map(|(p, position)| self.save(p, *position)));
        let bound = self.config.revocation_timeout;
        let outcomes = self
            .runtime
            .block_on(async { tokio::time::timeout(bound, saves).await })
            .unwrap_or_else(|_| {
                warn!(timeout = ?bound, "storing the positions timed out; the next owner re-reads what is applied");
                vec![false; positions.len()]
            });
        let stored: Vec<(Partition, i64)> = positions
            .iter()
            .zip(outcomes)
            .filter(|(_, saved)| *saved)
            .map(|(position, _)| position.clone())
            .collect();
        let mut tpl = TopicPartitionList::new();
        for (partition, position) in &stored {
            let _ = tpl.add_partition_offset(&partition.0, partition.1, Offset::Offset(*position));
        }
        if tpl.count() > 0 {
            if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                debug!(%error, "could not commit offsets to Kafka (used for lag monitoring only)");
            }
        }
        stored
    }
}
