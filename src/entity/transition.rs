//! The machinery's half of a transition: redelivery protection by event id
//! and the event's time, around the entity's own pure [`DurableEntity::apply`].

use chrono::{DateTime, Utc};

use super::{DurableEntity, EntityEvent, EventId};

/// An entity's state with what the machinery remembers beside it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Durable<E> {
    pub(crate) state: E,
    /// Ids of the most recently applied events, oldest first.
    pub(crate) event_ids: Vec<EventId>,
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
}

impl<E: DurableEntity> Durable<E> {
    pub(crate) fn new(state: E, event_ids: Vec<EventId>) -> Self {
        Self { state, event_ids }
    }

    /// Applies `event`, received at `now`, remembering at most `id_memory` event ids.
    pub(crate) fn step(
        &self,
        event: &EntityEvent<E::Command>,
        now: DateTime<Utc>,
        settings: &E::Settings,
        id_memory: usize,
    ) -> Step<E> {
        if let Some(id) = &event.event_id {
            if self.event_ids.contains(id) {
                return Step::Unchanged;
            }
        }
        let state = match self
            .state
            .apply(&event.command, event.event_time.unwrap_or(now), settings)
        {
            Ok(Some(state)) => state,
            Ok(None) => return Step::Unchanged,
            Err(rejection) => return Step::Rejected(rejection),
        };
        let mut event_ids = self.event_ids.clone();
        if let Some(id) = &event.event_id {
            event_ids.push(id.clone());
            let excess = event_ids.len().saturating_sub(id_memory);
            event_ids.drain(..excess);
        }
        Step::Changed(Durable { state, event_ids })
    }
}
