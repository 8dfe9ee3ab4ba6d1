//! Delivery of an entity's records to its manager, with retry of what may
//! pass, and settling each record once it is applied or dead-lettered.

use std::sync::Arc;

use tracing::warn;

use super::dead_letter::{described, Refusal};
use super::ingest::{Counters, Ingest};
use super::state::{Mark, Pending};
use crate::actors::contain::Shown;
use crate::entity::DurableEntity;
use crate::error::CommandError;

impl<E: DurableEntity> Ingest<E> {
    /// Delivers one batch to its entity until every record is settled,
    /// retrying from the first that failed for a reason that may pass.
    pub(super) async fn deliver(self: Arc<Self>, key: E::Key, mut batch: Vec<Pending<E>>) {
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
                    Ok(_) => settled.push(pending.mark()),
                    Err(error) if error.is_retryable() => {
                        retry_from = Some((index, error));
                        break;
                    }
                    Err(refused) => {
                        // Settled in order with the rest once it is in the dead-letter topic.
                        self.settle(&settled, false);
                        settled.clear();
                        let record = (&pending.event, &pending.origin);
                        let refusal = Refusal::answered(pending.mark(), &pending.raw, &key, record, &refused);
                        warn!(key = %Shown(&key), offset = pending.origin.offset, error = %refusal.reason,
                            "record refused; dead-lettering it");
                        // Its entity's later records wait behind it meanwhile.
                        self.dead_letter_refused(refusal).await;
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
            warn!(key = %Shown(&key), records = batch.len(), error = %described(&error), retry_in = ?backoff,
                "delivery failed; retrying");
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
    pub(super) fn drop_unowned(&self, batch: &mut Vec<Pending<E>>) {
        let mut state = self.lock();
        let (mut dropped, mut bytes) = (0, 0);
        batch.retain(|p| {
            let owned = state.owned.get(&p.partition).is_some_and(|o| o.epoch == p.epoch);
            if !owned {
                dropped += 1;
                bytes += p.raw.len();
            }
            owned
        });
        if dropped > 0 {
            state.unsettled -= dropped;
            state.unsettled_bytes -= bytes;
            self.settled.notify_all();
        }
    }

    /// Whether this member still owns `mark`'s partition in the assignment it was read in.
    pub(super) fn owns(&self, mark: &Mark) -> bool {
        self.lock()
            .owned
            .get(&mark.partition)
            .is_some_and(|owned| owned.epoch == mark.epoch)
    }

    /// Marks records settled: applied, found applied, or dead-lettered.
    pub(super) fn settle(&self, records: &[Mark], dead_lettered: bool) {
        if records.is_empty() {
            return;
        }
        let mut state = self.lock();
        for mark in records {
            state.unsettled -= 1;
            state.unsettled_bytes -= mark.bytes;
            if let Some(owned) = state.owned.get_mut(&mark.partition).filter(|o| o.epoch == mark.epoch) {
                owned.progress.settled(mark.offset);
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
}
