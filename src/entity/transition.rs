//! The machinery's half of a transition: redelivery protection by event id
//! and the event's time, around the entity's own pure [`DurableEntity::apply`].

use chrono::{DateTime, Utc};

use super::{AppliedOffsets, DurableEntity, EntityEvent, EventId, RecordOrigin, Seen};

/// An entity's state with what the machinery remembers beside it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Durable<E> {
    pub(crate) state: E,
    /// Ids of the most recently applied events, oldest first. Kept through
    /// a delete: a redelivered pre-delete event stays recognised.
    pub(crate) event_ids: Vec<EventId>,
    /// When the entity was last deleted: an event whose own time is before
    /// it (a late pre-delete event) is acknowledged and not applied, so it
    /// cannot bring erased data back.
    pub(crate) erased_at: Option<DateTime<Utc>>,
    /// This state is the revision that deleted the entity.
    pub(crate) tombstone: bool,
    /// Per source partition, the last ingested record settled (and those
    /// refused): a record at or below it is a redelivery. Kept through a
    /// delete, like event ids.
    pub(crate) source_offsets: AppliedOffsets,
}

/// What one event does to a [`Durable`] state.
#[derive(Debug)]
pub(crate) enum Step<E: DurableEntity> {
    /// A read, or a redelivered event: nothing to write.
    Unchanged,
    /// The next state, to be committed before the event is answered.
    Changed(Durable<E>),
    /// The domain refused the command; nothing to write.
    Rejected(E::Rejection),
    /// An ingested record refused when it was first read (for this reason),
    /// read again: refused again, nothing to write.
    RefusedBefore(String),
    /// An ingested record that changed no state (a no-op, a late or
    /// refused one): its offset is written with the state as it is, and it
    /// is answered with the state, or `rejection`, once that commits.
    Noted {
        next: Durable<E>,
        rejection: Option<E::Rejection>,
    },
}

impl<E: DurableEntity> Durable<E> {
    #[cfg(test)]
    pub(crate) fn new(state: E, event_ids: Vec<EventId>) -> Self {
        Self {
            state,
            event_ids,
            erased_at: None,
            tombstone: false,
            source_offsets: AppliedOffsets::default(),
        }
    }

    /// This state is the revision that deleted the entity.
    pub(crate) fn is_tombstone(&self) -> bool {
        self.tombstone
    }

    /// When the entity was last deleted, if ever.
    pub(crate) fn erased_at(&self) -> Option<DateTime<Utc>> {
        self.erased_at
    }

    /// Applies `event`, received at `now` (from `origin` when ingested),
    /// remembering at most `id_memory` event ids.
    pub(crate) fn step(
        &self,
        event: &EntityEvent<E::Command>,
        origin: Option<&RecordOrigin>,
        now: DateTime<Utc>,
        settings: &E::Settings,
        id_memory: usize,
    ) -> Step<E> {
        if let Some(origin) = origin {
            match self.source_offsets.seen(origin) {
                // Its dead letter is written: never applied, and its
                // refusal settled so that a later read does not refuse it again.
                Seen::Refused(_) if origin.dead_lettered => {
                    return Step::Noted {
                        next: self.dead_lettered(origin),
                        rejection: None,
                    }
                }
                _ if origin.dead_lettered => return Step::Unchanged,
                Seen::New => {}
                Seen::Applied => return Step::Unchanged,
                Seen::Refused(reason) => return Step::RefusedBefore(reason),
            }
        }
        if let Some(id) = &event.event_id {
            if self.event_ids.contains(id) {
                return self.unchanged(origin, None);
            }
        }
        // What comes after a delete is ordered by arrival, not by clocks:
        // only an event that carries its own time, strictly before the
        // erasure, is late. Ingest records carry their record's time.
        let late = event
            .event_time
            .zip(self.erased_at)
            .is_some_and(|(happened, erased_at)| happened < erased_at);
        if late {
            return self.unchanged(origin, None);
        }
        let at = event.event_time.unwrap_or(now);
        let (state, tombstone, erased_at) = if E::is_delete(&event.command) {
            // Erased no later than it was applied: a delete dated in the
            // future must not make the events after it look late.
            (E::default(), true, Some(at.min(now)))
        } else {
            match self.state.apply(&event.command, at, settings) {
                Ok(Some(state)) => (state, false, self.erased_at),
                Ok(None) => return self.unchanged(origin, None),
                Err(rejection) => return self.unchanged(origin, Some(rejection)),
            }
        };
        let mut event_ids = self.event_ids.clone();
        if let Some(id) = &event.event_id {
            event_ids.push(id.clone());
            let excess = event_ids.len().saturating_sub(id_memory);
            event_ids.drain(..excess);
        }
        let mut source_offsets = self.source_offsets.clone();
        if let Some(origin) = origin {
            source_offsets.record(origin);
        }
        Step::Changed(Durable {
            state,
            event_ids,
            erased_at,
            tombstone,
            source_offsets,
        })
    }

    /// What an event that changes no state does: nothing, or for an
    /// ingested record, its offset remembered with the state as it is (a
    /// revision of the machinery alone), so that a redelivery of it is
    /// recognised whatever its outcome was.
    fn unchanged(&self, origin: Option<&RecordOrigin>, rejection: Option<E::Rejection>) -> Step<E> {
        let Some(origin) = origin else {
            return rejection.map_or(Step::Unchanged, Step::Rejected);
        };
        let next = match &rejection {
            None => self.noted(origin),
            Some(rejection) => self.refused(origin, &rejection.to_string()),
        };
        Step::Noted { next, rejection }
    }

    /// This state with `origin`'s record remembered as settled. A deleted
    /// entity stays deleted: the revision that notes a record after its
    /// deletion is a tombstone too, so nothing downstream takes it for a
    /// new entity.
    pub(crate) fn noted(&self, origin: &RecordOrigin) -> Self {
        let mut next = self.clone();
        next.source_offsets.record(origin);
        next
    }

    /// This state with `origin`'s refused record settled: its dead letter
    /// is written.
    pub(crate) fn dead_lettered(&self, origin: &RecordOrigin) -> Self {
        let mut next = self.clone();
        next.source_offsets.settle_refused(origin);
        next
    }

    /// This state with `origin`'s record remembered as refused, for
    /// `reason`: read again, it is refused again, never taken for applied.
    pub(crate) fn refused(&self, origin: &RecordOrigin, reason: &str) -> Self {
        let mut next = self.clone();
        next.source_offsets.record_refused(origin, reason);
        next
    }
}
