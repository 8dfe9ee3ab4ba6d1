//! Ownership following the consumer group: the rebalance callback,
//! assignment, revocation, hand-over of entities, and leaving the group.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::config::StartAt;
use super::ingest::{Counters, Ingest, IngestContext};
use super::positions::StoredPosition;
use super::progress::Progress;
use super::state::{Owned, Partition, Served};

/// The most entities one hand-over message names: a revocation of many
/// entities does not become one huge message held by every shard at once.
const HAND_OVER_CHUNK: usize = 1_000;
use crate::entity::DurableEntity;

impl<E: DurableEntity> Ingest<E> {
    /// Takes over newly assigned partitions: reads where each was left from
    /// the store, and hands over the entities of revoked partitions that did
    /// not come back.
    pub(super) fn assigned(&self, consumer: &BaseConsumer<IngestContext<E>>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut starts = Vec::with_capacity(partitions.len());
        let mut to_store = Vec::new();
        for (topic, partition) in &partitions {
            let stored = self.stored_position(topic, *partition);
            let mut start = stored.offset();
            if let Some(position) = start {
                // A position the broker no longer has (its records expired,
                // or the topic was recreated) reads from the oldest record it
                // has: never from the end, past records still there.
                match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10)) {
                    Ok((low, high)) if position < low || position > high => {
                        Counters::add(&self.counters.positions_out_of_range, 1);
                        metrics::counter!("persist_durable_ingest_positions_out_of_range_total", "entity" => E::ENTITY_TYPE)
                            .increment(1);
                        warn!(
                            topic,
                            partition,
                            position,
                            low,
                            high,
                            "the stored position is outside what the broker holds; reading from its oldest record"
                        );
                        start = Some(low);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        warn!(%error, topic, partition, "could not check the stored position against the partition")
                    }
                }
            }
            if stored == StoredPosition::None && self.config.start_at == StartAt::Latest {
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
            starts.push((start, self.stored_intents(topic, *partition, start)));
        }
        let mut state = self.lock();
        for ((topic, partition), (start, intents)) in partitions.iter().zip(starts) {
            state.next_epoch += 1;
            let owned = Owned {
                epoch: state.next_epoch,
                label: format!("{topic}/{partition}").into(),
                progress: Progress::starting_at(start),
                in_flight: 0,
                served: Served::new(self.config.max_served),
                saved: start,
                committed_to_kafka: start,
                expect_next: start,
                intents,
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

    /// Gives up partitions: takes no more of their records, waits for those
    /// in flight to commit, stores their positions.
    pub(super) fn revoked(&self, consumer: &BaseConsumer<IngestContext<E>>, tpl: &TopicPartitionList) {
        let partitions: HashSet<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let mut state = self.lock();
        // Waiting records are not sent: the next owner reads them.
        let (mut dropped, mut dropped_bytes) = (0, 0);
        for lane in state.lanes.values_mut() {
            lane.waiting.retain(|p| {
                let kept = !partitions.contains(&p.partition);
                if !kept {
                    dropped += 1;
                    dropped_bytes += p.raw.len();
                }
                kept
            });
        }
        state.unsettled -= dropped;
        state.unsettled_bytes -= dropped_bytes;
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

    /// Passivates entities whose partition went to another member, in
    /// messages of at most [`HAND_OVER_CHUNK`] entities.
    pub(super) fn hand_over(&self, keys: Vec<E::Key>) {
        if keys.is_empty() {
            return;
        }
        debug!(entities = keys.len(), "handing over entities");
        Counters::add(&self.counters.handed_over, keys.len() as u64);
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            self.entities.hand_over(keys.by_ref().take(HAND_OVER_CHUNK).collect());
        }
    }

    /// Leaves the group: the revocation this causes lets in-flight records
    /// commit, stores positions and hands every entity over.
    pub(super) fn close(&self, consumer: BaseConsumer<IngestContext<E>>) {
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
