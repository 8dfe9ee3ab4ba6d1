//! Delivery of an entity's records to its manager, with retry of what may
//! pass, and settling each record once it is applied or dead-lettered.

use std::sync::Arc;

use tracing::warn;

use super::ingest::{Counters, Ingest};
use super::state::{Partition, Pending};
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
    pub(super) fn drop_unowned(&self, batch: &mut Vec<Pending<E>>) {
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
    pub(super) fn settle(&self, records: &[(Partition, u64, i64)], dead_lettered: bool) {
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
}
