//! When a timer fires: its [`Schedule`], its first due time, the next one
//! after a fire, and what happens to occurrences missed while no node could
//! fire it ([`Missed`]).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::TimerError;

/// When a timer fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Once, at this time (at once if it has passed).
    At(DateTime<Utc>),
    /// Every `period`, at `first` and each `period` after it; when set, the
    /// first occurrence not yet past.
    Every {
        /// The first occurrence.
        first: DateTime<Utc>,
        /// The time between occurrences.
        period: Duration,
    },
    /// At each time the cron expression names, in UTC.
    Cron(String),
}

/// What a recurring timer does with the occurrences it missed (fired more
/// than a minute late, because no node could fire it: all were down, or
/// catching up). Quartz's misfire policies, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Missed {
    /// Fires once for all of them, then goes on from the next occurrence to come.
    #[default]
    Once,
    /// Fires each of them, one after another, oldest first.
    EveryOne,
    /// Fires none of them; goes on from the next occurrence to come.
    Skip,
}

/// How late a fire may be before its occurrence counts as missed.
pub(crate) const MISFIRE_AFTER: chrono::Duration = chrono::Duration::seconds(60);

/// `due` as the store keeps it: in whole milliseconds (SQLite's `TEXT`
/// timestamps hold no more), rounded up so that a fire is never early, and
/// between the earliest and latest times both databases keep.
fn in_range(name: &str, due: DateTime<Utc>) -> Result<DateTime<Utc>, TimerError> {
    let earliest = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).single();
    let latest = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single();
    let due = whole_millis(due);
    match (earliest, latest) {
        (Some(earliest), Some(latest)) if (earliest..=latest).contains(&due) => Ok(due),
        _ => Err(TimerError::DueOutOfRange {
            name: name.to_owned(),
            due,
        }),
    }
}

/// `time` rounded up to a whole millisecond.
pub(crate) fn whole_millis(time: DateTime<Utc>) -> DateTime<Utc> {
    let below = time.timestamp_subsec_nanos() % 1_000_000;
    if below == 0 {
        return time;
    }
    // At the very end of time, left as it is (and refused as out of range).
    time.checked_add_signed(chrono::Duration::nanoseconds(i64::from(1_000_000 - below)))
        .unwrap_or(time)
}

/// A cron expression parsed, five fields taken as seconds-less.
fn cron(name: &str, expression: &str) -> Result<cron::Schedule, TimerError> {
    let fields = expression.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expression}")
    } else {
        expression.to_owned()
    };
    cron::Schedule::from_str(&full).map_err(|error| TimerError::Cron {
        name: name.to_owned(),
        expression: expression.to_owned(),
        reason: error.to_string(),
    })
}

/// `period` as chrono's, refused if under a millisecond or beyond its range.
fn period(name: &str, period: Duration) -> Result<chrono::Duration, TimerError> {
    chrono::Duration::from_std(period)
        .ok()
        .filter(|period| *period >= chrono::Duration::milliseconds(1))
        .ok_or_else(|| TimerError::Period {
            name: name.to_owned(),
            period,
        })
}

impl Schedule {
    /// Checks the schedule, as it is checked when an entity's state wants it.
    pub fn validate(&self) -> Result<(), TimerError> {
        self.first_due("timer", Utc::now()).map(drop)
    }

    /// When a timer set at `now` first fires.
    pub(crate) fn first_due(&self, name: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, TimerError> {
        match self {
            Schedule::At(due) => in_range(name, *due),
            Schedule::Every { first, period: every } => {
                let every = period(name, *every)?;
                in_range(name, *first)?;
                in_range(name, not_before(*first, every, now))
            }
            Schedule::Cron(expression) => {
                let schedule = cron(name, expression)?;
                let next = schedule.after(&now).next().ok_or_else(|| TimerError::Exhausted {
                    name: name.to_owned(),
                    expression: expression.clone(),
                })?;
                in_range(name, next)
            }
        }
    }

    /// After firing the occurrence due at `due`, at `now`: whether to
    /// deliver its command, and when the timer fires next (`None`: it is done).
    pub(crate) fn after_fire(
        &self,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        missed: Missed,
    ) -> (bool, Option<DateTime<Utc>>) {
        let late = now - due > MISFIRE_AFTER;
        let following = |after: DateTime<Utc>| -> Option<DateTime<Utc>> {
            match self {
                Schedule::At(_) => None,
                Schedule::Every { first, period: every } => {
                    let every = chrono::Duration::from_std(*every).ok()?;
                    let next = not_before(*first, every, after + chrono::Duration::milliseconds(1));
                    Some(next)
                }
                Schedule::Cron(expression) => cron("timer", expression).ok()?.after(&after).next(),
            }
        };
        if matches!(self, Schedule::At(_)) {
            return (true, None);
        }
        let (deliver, next) = match (missed, late) {
            (Missed::EveryOne, _) | (_, false) => (true, following(due)),
            (Missed::Once, true) => (true, following(now)),
            (Missed::Skip, true) => (false, following(now)),
        };
        (deliver, next.map(whole_millis))
    }

    /// The form stored beside a timer.
    pub(crate) fn encode(&self) -> String {
        let stored = match self {
            Schedule::At(due) => Stored::At { due: *due },
            Schedule::Every { first, period } => Stored::Every {
                first: *first,
                period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            },
            Schedule::Cron(expression) => Stored::Cron {
                expression: expression.clone(),
            },
        };
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// Read back from [`encode`](Self::encode)'s form.
    pub(crate) fn decode(stored: &str) -> Option<Schedule> {
        Some(match serde_json::from_str(stored).ok()? {
            Stored::At { due } => Schedule::At(due),
            Stored::Every { first, period_ms } => Schedule::Every {
                first,
                period: Duration::from_millis(period_ms),
            },
            Stored::Cron { expression } => Schedule::Cron(expression),
        })
    }
}

impl Missed {
    pub(crate) fn code(self) -> i32 {
        match self {
            Missed::Once => 0,
            Missed::EveryOne => 1,
            Missed::Skip => 2,
        }
    }

    pub(crate) fn from_code(code: i32) -> Missed {
        match code {
            1 => Missed::EveryOne,
            2 => Missed::Skip,
            _ => Missed::Once,
        }
    }
}

/// The first of `first`, `first + every`, ... not before `now`.
fn not_before(first: DateTime<Utc>, every: chrono::Duration, now: DateTime<Utc>) -> DateTime<Utc> {
    if first >= now {
        return first;
    }
    let behind = (now - first).num_milliseconds();
    let step = every.num_milliseconds().max(1);
    let steps = (behind + step - 1) / step;
    first + chrono::Duration::milliseconds(steps.saturating_mul(step))
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    At { due: DateTime<Utc> },
    Every { first: DateTime<Utc>, period_ms: u64 },
    Cron { expression: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn a_recurring_timer_starts_at_its_first_occurrence_not_yet_past() {
        let every_hour = Schedule::Every {
            first: at("2026-01-01T00:00:00Z"),
            period: Duration::from_secs(3600),
        };
        assert_eq!(
            every_hour.first_due("t", at("2026-01-01T05:30:00Z")).unwrap(),
            at("2026-01-01T06:00:00Z")
        );
        assert_eq!(
            every_hour.first_due("t", at("2025-12-31T00:00:00Z")).unwrap(),
            at("2026-01-01T00:00:00Z")
        );
        let weekdays = Schedule::Cron("0 9 * * MON-FRI".into());
        // 2026-01-03 is a Saturday.
        assert_eq!(
            weekdays.first_due("t", at("2026-01-03T10:00:00Z")).unwrap(),
            at("2026-01-05T09:00:00Z")
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_typed_errors() {
        assert!(matches!(
            Schedule::Cron("every tuesday".into()).validate(),
            Err(TimerError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::Every {
                first: Utc::now(),
                period: Duration::ZERO
            }
            .validate(),
            Err(TimerError::Period { .. })
        ));
        assert!(matches!(
            Schedule::At(at("1969-12-31T23:59:59Z")).validate(),
            Err(TimerError::DueOutOfRange { .. })
        ));
        assert!(matches!(
            Schedule::At(DateTime::<Utc>::MAX_UTC).validate(),
            Err(TimerError::DueOutOfRange { .. })
        ));
    }

    /// Occurrences missed while nothing could fire: Quartz's misfire policies.
    #[test]
    fn missed_occurrences_fire_once_each_or_not_at_all() {
        let daily = Schedule::Cron("0 9 * * *".into());
        let due = at("2026-01-05T09:00:00Z");
        let now = at("2026-01-07T10:00:00Z"); // two more 9:00s past
        assert_eq!(
            daily.after_fire(due, now, Missed::EveryOne),
            (true, Some(at("2026-01-06T09:00:00Z")))
        );
        assert_eq!(
            daily.after_fire(due, now, Missed::Once),
            (true, Some(at("2026-01-08T09:00:00Z")))
        );
        assert_eq!(
            daily.after_fire(due, now, Missed::Skip),
            (false, Some(at("2026-01-08T09:00:00Z")))
        );
        // On time: every policy fires it and goes on to the next.
        let on_time = at("2026-01-05T09:00:01Z");
        for missed in [Missed::Once, Missed::EveryOne, Missed::Skip] {
            assert_eq!(
                daily.after_fire(due, on_time, missed),
                (true, Some(at("2026-01-06T09:00:00Z")))
            );
        }
        assert_eq!(
            Schedule::At(due).after_fire(due, now, Missed::Skip),
            (true, None),
            "one-shot timers always fire"
        );
    }

    #[test]
    fn a_schedule_reads_back_as_stored() {
        for schedule in [
            Schedule::At(at("2026-01-05T09:00:00Z")),
            Schedule::Every {
                first: at("2026-01-05T09:00:00Z"),
                period: Duration::from_millis(1500),
            },
            Schedule::Cron("0 9 * * *".into()),
        ] {
            assert_eq!(Schedule::decode(&schedule.encode()), Some(schedule));
        }
    }
}
