//! Dead-letter intents in the store: what keeps a record that its entity
//! could not note as refused (its row is corrupt, or the database refused
//! the row that would note it) from being delivered again once it is in the
//! dead-letter topic, or on its way there.
//!
//! Before such a record's dead letter, the ingest stores an intent under
//! `kafka/<group>/<topic>/<partition>/dead-letters/<offset>`, and once the
//! broker has acknowledged the dead letter, `.../<offset>/written` beside it
//! (each with the record's offset as its position). A record read again that
//! has an intent is never delivered to its entity, so never applied, even
//! once its row is repaired: with `written` it is settled as it is, without
//! it is dead-lettered again (the second copy at most, after a crash between
//! the dead letter and `written`). Intents below the partition's stored
//! position are removed: reading never starts below it again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use tracing::warn;

use super::ingest::Ingest;
use super::state::{Intent, Mark, Partition};
use crate::entity::DurableEntity;

/// What the name of a stored intent adds once its dead letter is acknowledged.
const WRITTEN: &str = "/written";

impl<E: DurableEntity> Ingest<E> {
    /// The intents stored for `topic`'s `partition` at or past `start`, read
    /// when the partition is assigned; those below `start` are removed from
    /// the store. Waits out a database outage (a record with an intent must
    /// not reach its entity), unless the ingest is stopping.
    pub(super) fn stored_intents(&self, topic: &str, partition: i32, start: Option<i64>) -> BTreeMap<i64, Intent> {
        let prefix = self.config.intents_prefix(topic, partition);
        let mut backoff = self.config.retry_backoff.0;
        let stored = loop {
            match self.runtime.block_on(self.store.offsets_under(&prefix)) {
                Ok(stored) => break stored,
                Err(error) if !self.stopping.load(Ordering::Relaxed) => {
                    warn!(%error, topic, partition, retry_in = ?backoff, "could not read the dead-letter intents; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
                Err(error) => {
                    warn!(%error, topic, partition, "could not read the dead-letter intents; stopping anyway");
                    return BTreeMap::new();
                }
            }
        };
        let mut intents = BTreeMap::new();
        for (name, _) in &stored {
            if let Some((offset, intent)) = parsed(&prefix, name) {
                let known = intents.entry(offset).or_insert(intent);
                if intent == Intent::Written {
                    *known = Intent::Written;
                }
            }
        }
        if let Some(start) = start {
            let passed = intents.range(..start).count();
            intents.retain(|&offset, _| offset >= start);
            if passed > 0 {
                if let Err(error) = self
                    .runtime
                    .block_on(self.store.remove_offsets_below(&prefix, unsigned(start)))
                {
                    warn!(%error, topic, partition, "could not remove passed dead-letter intents; they are removed later");
                }
            }
        }
        intents
    }

    /// Stores `intent` for `mark`'s record, retried until it is stored, or
    /// until its partition is no longer this member's (then false).
    pub(super) async fn store_intent(&self, mark: &Mark, intent: Intent) -> bool {
        let (topic, partition) = (&mark.partition.0, mark.partition.1);
        let mut name = format!("{}{}", self.config.intents_prefix(topic, partition), mark.offset);
        if intent == Intent::Written {
            name.push_str(WRITTEN);
        }
        let mut backoff = self.config.retry_backoff.0;
        loop {
            match self.store.save_offset(&name, unsigned(mark.offset)).await {
                Ok(()) => break,
                Err(error) => {
                    warn!(%error, intent = name, retry_in = ?backoff, "could not store a dead-letter intent; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.retry_backoff.1);
            if !self.owns(mark) {
                return false;
            }
        }
        let mut state = self.lock();
        if let Some(owned) = state.owned.get_mut(&mark.partition).filter(|o| o.epoch == mark.epoch) {
            owned.intents.insert(mark.offset, intent);
        }
        true
    }

    /// Removes the intents below positions just stored (`(partition, epoch,
    /// position)`), from the store and from memory, where there are any.
    pub(super) async fn remove_passed_intents(&self, stored: &[(Partition, u64, i64)]) {
        let passed: Vec<&(Partition, u64, i64)> = {
            let state = self.lock();
            stored
                .iter()
                .filter(|(partition, epoch, position)| {
                    state
                        .owned
                        .get(partition)
                        .filter(|o| o.epoch == *epoch)
                        .is_some_and(|o| o.intents.range(..*position).next().is_some())
                })
                .collect()
        };
        for (partition, epoch, position) in passed {
            let prefix = self.config.intents_prefix(&partition.0, partition.1);
            if let Err(error) = self.store.remove_offsets_below(&prefix, unsigned(*position)).await {
                warn!(%error, partition = %prefix, "could not remove passed dead-letter intents; they are removed later");
                continue;
            }
            let mut state = self.lock();
            if let Some(owned) = state.owned.get_mut(partition).filter(|o| o.epoch == *epoch) {
                owned.intents = owned.intents.split_off(position);
            }
        }
    }
}

/// The offset and kind of the intent stored under `name`, if it is one.
fn parsed(prefix: &str, name: &str) -> Option<(i64, Intent)> {
    let rest = name.strip_prefix(prefix)?;
    let (offset, intent) = match rest.strip_suffix(WRITTEN) {
        Some(offset) => (offset, Intent::Written),
        None => (rest, Intent::Intended),
    };
    Some((offset.parse().ok()?, intent))
}

/// An offset as a stored position: offsets are never negative.
fn unsigned(offset: i64) -> u64 {
    u64::try_from(offset).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_names_read_back_as_offset_and_kind() {
        let prefix = "kafka/g/t/0/dead-letters/";
        assert_eq!(
            parsed(prefix, "kafka/g/t/0/dead-letters/17"),
            Some((17, Intent::Intended))
        );
        assert_eq!(
            parsed(prefix, "kafka/g/t/0/dead-letters/17/written"),
            Some((17, Intent::Written))
        );
        assert_eq!(parsed(prefix, "kafka/g/t/0/dead-letters/x"), None);
        assert_eq!(parsed(prefix, "kafka/g/t/0"), None);
    }
}
