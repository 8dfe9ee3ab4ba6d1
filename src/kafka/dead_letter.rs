//! Dead letters: a copy of a record that cannot be applied, with why and
//! where it came from in headers, on the dead-letter topic; and what makes
//! it end there exactly once in effect, never also applied.
//!
//! A record its entity refused is noted by the entity as refused, with the
//! state before it: read again, it is refused again, never taken for
//! applied. Once the broker has its dead letter, the record is sent to its
//! entity again, marked dead-lettered, and the entity settles the refusal,
//! so that a later read finds it settled and writes no second dead letter.
//! A record its entity could not note (a corrupt row) gets a dead-letter
//! intent in the store first (see `intents`). Either way a crash between the
//! dead letter and what follows it costs a second copy, never a lost or an
//! applied record.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::{error, warn};

use super::ingest::{Counters, Ingest};
use super::state::{Intent, Mark, RawRecord};
use crate::actors::contain::{panic_message, Shown};
use crate::entity::{DurableEntity, EntityEvent, RecordOrigin};
use crate::error::CommandError;

/// A record on its way to the dead-letter topic, and what must go with it.
pub(super) struct Refusal<'a, E: DurableEntity> {
    pub(super) mark: Mark,
    pub(super) raw: &'a RawRecord,
    /// Why, for the dead letter's `persist-durable.error` header.
    pub(super) reason: String,
    /// The entity that noted (or may have noted) the record as refused,
    /// with the record: sent again, marked dead-lettered, once the dead
    /// letter is written.
    pub(super) noted_by: Option<(E::Key, EntityEvent<E::Command>, RecordOrigin)>,
    /// Whether an intent is stored before the dead letter.
    pub(super) intent: IntentToStore,
}

/// The dead-letter intent a [`Refusal`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntentToStore {
    /// None: its entity noted the record as refused.
    NotNeeded,
    /// Stored before the dead letter: nothing else remembers the record.
    Needed,
    /// Stored when the record was first read (this is a read again).
    Stored,
}

impl<'a, E: DurableEntity> Refusal<'a, E> {
    /// The refusal of a record its entity answered with `refused` (not
    /// retryable): whether the entity noted it decides what goes with the
    /// dead letter.
    pub(super) fn answered(
        mark: Mark,
        raw: &'a RawRecord,
        key: &E::Key,
        record: (&EntityEvent<E::Command>, &RecordOrigin),
        refused: &CommandError<E>,
    ) -> Self {
        let noted_by = Some((key.clone(), record.0.clone(), record.1.clone()));
        let (noted_by, intent) = match refused {
            // Answered only once the revision that notes it committed.
            CommandError::Rejected { .. } | CommandError::RefusedBefore { .. } => (noted_by, IntentToStore::NotNeeded),
            // Noted unless the state before it could not be stored either
            // (or its row could not be loaded): the answer does not tell.
            CommandError::Panicked { .. } | CommandError::Unstorable { .. } => (noted_by, IntentToStore::Needed),
            // Its row cannot be read (corrupt), or the key is not one: nothing noted.
            _ => (None, IntentToStore::Needed),
        };
        Self {
            mark,
            raw,
            reason: described(refused),
            noted_by,
            intent,
        }
    }
}

/// `error`'s message, or, if writing it panicked (a key whose `Display`
/// panics), its kind: the dead letter and the log line go out either way.
pub(super) fn described<E: DurableEntity>(error: &CommandError<E>) -> String {
    catch_unwind(AssertUnwindSafe(|| error.to_string())).unwrap_or_else(|panic| {
        format!(
            "{} (its message could not be written: {})",
            error.kind(),
            panic_message(&panic)
        )
    })
}

impl<E: DurableEntity> Ingest<E> {
    /// Dead-letters a refused record with what must go with it (an intent
    /// first; the entity told after), and settles it; or, if its partition
    /// moved to another member before the dead letter was written, drops it
    /// as no longer this member's (the new owner reads it again).
    pub(super) async fn dead_letter_refused(&self, refusal: Refusal<'_, E>) {
        let Refusal {
            mark,
            raw,
            reason,
            noted_by,
            intent,
        } = refusal;
        if intent == IntentToStore::Needed && !self.store_intent(&mark, Intent::Intended).await {
            return self.give_up(&mark);
        }
        if !self.dead_letter(&mark, raw, &reason).await {
            return self.give_up(&mark);
        }
        // The dead letter is written: what follows only spares a second copy
        // when the record is read again, so it is settled whatever comes of it.
        if intent != IntentToStore::NotNeeded {
            self.store_intent(&mark, Intent::Written).await;
        }
        if let Some((key, event, origin)) = noted_by {
            self.settle_refusal(&mark, key, event, origin).await;
        }
        self.settle(std::slice::from_ref(&mark), true);
    }

    /// Tells the entity that noted a record as refused that its dead letter
    /// is written, retried while that may pass and the partition is this
    /// member's: read again, the record is then settled, not dead-lettered again.
    async fn settle_refusal(&self, mark: &Mark, key: E::Key, event: EntityEvent<E::Command>, origin: RecordOrigin) {
        let record = (event, origin.dead_lettered());
        let mut backoff = self.config.retry_backoff.0;
        loop {
            let answer = self
                .entities
                .send_records(key.clone(), vec![record.clone()])
                .await
                .pop();
            let error = match answer {
                None | Some(Ok(_)) => return,
                Some(Err(error)) => error,
            };
            if !error.is_retryable() || !self.owns(mark) {
                warn!(key = %Shown(&key), offset = mark.offset, error = %described(&error),
                    "could not settle a dead-lettered record with its entity: read again, it is dead-lettered again");
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.retry_backoff.1);
        }
    }

    /// Forgets a record whose partition moved to another member before it
    /// was settled here: the new owner reads it again.
    fn give_up(&self, mark: &Mark) {
        Counters::add(&self.counters.dead_letters_dropped, 1);
        let mut state = self.lock();
        state.unsettled -= 1;
        state.unsettled_bytes -= mark.bytes;
        drop(state);
        self.settled.notify_all();
    }

    /// Sends a copy of the record to the dead-letter topic, with why and
    /// where it came from in headers; retried until the broker has it, or
    /// until its partition is no longer this member's (then false).
    pub(super) async fn dead_letter(&self, mark: &Mark, raw: &RawRecord, reason: &str) -> bool {
        let (partition, offset) = (&mark.partition, mark.offset);
        let (Some(producer), Some(topic)) = (&self.dead_letters, &self.config.dead_letter_topic) else {
            error!(topic = %partition.0, partition = partition.1, offset, reason, "record skipped: no dead-letter topic is set");
            return true;
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
                Ok(_) => return true,
                Err((error, _)) => {
                    warn!(%error, topic, retry_in = ?backoff, "could not write a dead letter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
            }
            if !self.owns(mark) {
                warn!(topic = %partition.0, partition = partition.1, offset,
                    "its partition moved to another member: giving up the dead letter, the new owner reads the record");
                return false;
            }
        }
    }
}
