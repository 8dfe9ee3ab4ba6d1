//! The consumer thread's loop: polling, back-pressure, decoding each record
//! and queueing it in its entity's lane.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::{info, warn};

use super::dead_letter::{IntentToStore, Refusal};
use super::decode::IngestRecord;
use super::ingest::{Counters, Ingest, IngestContext};
use super::state::{Intent, Lane, Mark, Partition, Pending, RawRecord, State};
use crate::entity::{DurableEntity, RecordOrigin};

/// The reason a record read again with a dead-letter intent carries in
/// its dead letter: the first reason is not stored with the intent.
const REFUSED_BEFORE_A_RESTART: &str =
    "refused when it was first read (its first dead letter, if written, says why); read again after a restart";

impl<E: DurableEntity> Ingest<E> {
    /// The consumer thread's loop, until a stop is asked for.
    pub(super) fn consume(self: &Arc<Self>, consumer: &BaseConsumer<IngestContext<E>>) {
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
    pub(super) fn apply_back_pressure(&self, consumer: &BaseConsumer<IngestContext<E>>, paused: bool) -> bool {
        let (unsettled, bytes) = {
            let state = self.lock();
            (state.unsettled, state.unsettled_bytes)
        };
        let max_bytes = self.config.max_unsettled_bytes;
        let over = unsettled >= self.config.max_unsettled || bytes >= max_bytes;
        let below = unsettled <= self.config.resume_below && bytes <= max_bytes / 2;
        if !(over || paused && below) {
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
                info!(unsettled, bytes, "pausing consumption: too many records in flight");
            }
            return true;
        }
        if let Err(error) = consumer.resume(&assignment) {
            warn!(%error, "could not resume the partitions");
            return true;
        }
        // Reading starts again: the first record of each must be the next one.
        for owned in self.lock().owned.values_mut() {
            owned.expect_next = owned.progress.next_offset();
        }
        info!(unsettled, bytes, "resuming consumption");
        false
    }

    /// Decodes a record and queues it for its entity, or dead-letters it.
    pub(super) fn receive(self: &Arc<Self>, message: &rdkafka::message::BorrowedMessage<'_>) {
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
        if let Some(expected) = owned.expect_next.take().filter(|&expected| record.offset > expected) {
            let skipped = (record.offset - expected) as u64;
            Counters::add(&self.counters.offset_gaps, skipped);
            metrics::counter!("persist_durable_ingest_offsets_skipped_total", "entity" => E::ENTITY_TYPE)
                .increment(skipped);
            warn!(
                topic = record.topic,
                partition = record.partition,
                expected,
                first = record.offset,
                "the broker served a later record than the offset asked for; the offsets between were skipped"
            );
        }
        owned.progress.received(record.offset);
        let (epoch, label) = (owned.epoch, owned.label.clone());
        let origin = RecordOrigin::new(label, record.offset);
        let mark = Mark {
            partition: partition.clone(),
            epoch,
            offset: origin.offset,
            bytes: raw.len(),
        };
        match owned.intents.get(&record.offset).copied() {
            None => {}
            // Read again after its dead letter: never delivered, so never
            // applied, whatever became of its entity's row since.
            Some(Intent::Written) => {
                owned.in_flight += 1;
                state.unsettled += 1;
                state.unsettled_bytes += mark.bytes;
                drop(state);
                self.settle(&[mark], true);
                return;
            }
            Some(Intent::Intended) => {
                owned.in_flight += 1;
                state.unsettled += 1;
                state.unsettled_bytes += mark.bytes;
                drop(state);
                warn!(
                    topic = record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    "record read again with a dead-letter intent; dead-lettering it again"
                );
                let this = self.clone();
                self.runtime.spawn(async move {
                    let refusal = Refusal::<E> {
                        mark,
                        raw: &raw,
                        reason: REFUSED_BEFORE_A_RESTART.to_owned(),
                        noted_by: None,
                        intent: IntentToStore::Stored,
                    };
                    this.dead_letter_refused(refusal).await;
                });
                return;
            }
        }
        match decoded {
            Ok((key, event)) => {
                // Counted in flight when its batch leaves.
                owned.served.insert(&key);
                state.unsettled += 1;
                state.unsettled_bytes += raw.len();
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
                state.unsettled_bytes += raw.len();
                drop(state);
                warn!(topic = record.topic, partition = record.partition, offset = record.offset, error = %invalid,
                    "record cannot be decoded; dead-lettering it");
                let this = self.clone();
                let reason = invalid.to_string();
                self.runtime.spawn(async move {
                    // It has no entity: retried on its own, blocking no other
                    // record. Its intent keeps a later decoder from applying
                    // it when it is read again.
                    let refusal = Refusal::<E> {
                        mark,
                        raw: &raw,
                        reason,
                        noted_by: None,
                        intent: IntentToStore::Needed,
                    };
                    this.dead_letter_refused(refusal).await;
                });
            }
        }
    }

    /// Sends `key`'s next batch if none is in flight. Called under the lock.
    pub(super) fn dispatch(self: &Arc<Self>, state: &mut State<E>, key: E::Key) {
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
}
