//! What an entity's state wants of timers, checked and encoded for the
//! store, and what changes between two states: the timers a write sets and
//! cancels.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::{Missed, Schedule, TimerError};
use crate::entity::{DurableEntity, MAX_ID_BYTES};
use crate::store::TimerChange;

/// A timer a state wants, its command encoded: what a change compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Declared {
    pub(crate) name: String,
    pub(crate) schedule: Schedule,
    pub(crate) command: Vec<u8>,
    pub(crate) missed: Missed,
}

/// The timers `state` wants, checked and encoded: a name empty, too long
/// or given twice, or a command that did not encode, is refused here; a
/// schedule is checked when it is set.
pub(crate) fn declared<E: DurableEntity>(state: &E, settings: &E::Settings) -> Result<Vec<Declared>, TimerError> {
    let timers = state.timers(settings);
    if timers.is_empty() {
        return Ok(Vec::new());
    }
    let mut names = HashSet::with_capacity(timers.len());
    timers
        .into_iter()
        .map(|timer| {
            if timer.name.is_empty() || timer.name.len() > MAX_ID_BYTES || !names.insert(timer.name.clone()) {
                return Err(TimerError::Name(timer.name));
            }
            let command = timer.command.map_err(|reason| TimerError::Command {
                name: timer.name.clone(),
                reason,
            })?;
            Ok(Declared {
                name: timer.name,
                schedule: timer.schedule,
                command,
                missed: timer.missed,
            })
        })
        .collect()
}

/// The command of `state`'s timer `name`, decoded from the form it was
/// stored in (`stored`) by that timer's own decoder; `None` when the state
/// no longer wants a timer of that name.
pub(crate) fn command_of<E: DurableEntity>(
    state: &E,
    settings: &E::Settings,
    name: &str,
    stored: &[u8],
) -> Option<Result<E::Command, TimerError>> {
    let timer = state.timers(settings).into_iter().find(|timer| timer.name == name)?;
    Some((timer.decode)(stored).map_err(|reason| TimerError::Command {
        name: name.to_owned(),
        reason,
    }))
}

/// What a write from a state wanting `before` to one wanting `after` does
/// to the timers, at `now`: a timer wanted differently (or newly) is set,
/// with its first due time from `now`; one no longer wanted is cancelled;
/// one wanted alike is left as it is (a recurring timer keeps its next
/// occurrence, a one-shot timer that fired is not set again).
pub(crate) fn changes(
    before: &[Declared],
    after: &[Declared],
    now: DateTime<Utc>,
) -> Result<Vec<TimerChange>, TimerError> {
    let mut changes = Vec::new();
    for timer in after {
        if before.iter().any(|old| old == timer) {
            continue;
        }
        changes.push(TimerChange::Set {
            due: timer.schedule.first_due(&timer.name, now)?,
            name: timer.name.clone(),
            schedule: timer.schedule.encode(),
            command: timer.command.clone(),
            missed: timer.missed.code(),
        });
    }
    for old in before {
        if !after.iter().any(|timer| timer.name == old.name) {
            changes.push(TimerChange::Cancel { name: old.name.clone() });
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(name: &str, due: &str) -> Declared {
        Declared {
            name: name.into(),
            schedule: Schedule::At(DateTime::parse_from_rfc3339(due).unwrap().to_utc()),
            command: b"{}".to_vec(),
            missed: Missed::Once,
        }
    }

    #[test]
    fn only_timers_wanted_differently_are_set_and_those_no_longer_wanted_cancelled() {
        let now = Utc::now();
        let before = [
            declared("kept", "2030-01-01T00:00:00Z"),
            declared("moved", "2030-01-01T00:00:00Z"),
            declared("gone", "2030-01-01T00:00:00Z"),
        ];
        let after = [
            declared("kept", "2030-01-01T00:00:00Z"),
            declared("moved", "2031-01-01T00:00:00Z"),
            declared("new", "2030-06-01T00:00:00Z"),
        ];

        let changes = changes(&before, &after, now).unwrap();

        let names: Vec<(&str, bool)> = changes
            .iter()
            .map(|change| match change {
                TimerChange::Set { name, .. } => (name.as_str(), true),
                TimerChange::Cancel { name } => (name.as_str(), false),
            })
            .collect();
        assert_eq!(names, [("moved", true), ("new", true), ("gone", false)]);
    }
}
