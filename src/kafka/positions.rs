//! Partition positions in the store: read when a partition is assigned,
//! saved as records settle, and committed to Kafka for lag monitoring.

use std::sync::atomic::Ordering;

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

    /// Stores the positions that moved since last stored.
    pub(super) fn save_positions(&self, consumer: &BaseConsumer<IngestContext<E>>) {
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
    pub(super) fn store_positions(
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
}
