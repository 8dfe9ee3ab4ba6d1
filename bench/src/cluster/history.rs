//! What the client saw, operation by operation, and the check that it is
//! linearizable for counters of distinct adds.
//!
//! Every attempt is recorded with the client's start and end (one
//! monotonic clock, that of the harness) and its answer. A counter's life is
//! split into generations by its deletes, each done while nothing else was
//! in flight on it, so that a generation's operations never overlap
//! another's. Within a generation, an answer `v` of a read that ran from
//! `start` to `end` must count at least every add acknowledged before
//! `start` and at most every add first sent before `end`:
//!
//! `#{adds acknowledged before start} <= v <= #{adds first sent before end}`
//!
//! and an add's own answer must count itself too. Fewer is a stale answer
//! (from a memory that missed a commit); more counts an add twice, or one
//! that was never sent.

use std::collections::HashMap;

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An add, by its sequence number (its event id is `add-<seq>`).
    Add(u64),
    Read,
    Delete,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Applied (or read): the counter's value.
    Value(u64),
    /// An error answer: its HTTP status and the library's error kind.
    Refused { status: u16, kind: String },
    /// No answer: the connection failed or the client gave up waiting.
    Nothing(String),
}

/// One attempt of one operation.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) counter: usize,
    pub(crate) generation: u32,
    pub(crate) kind: Kind,
    pub(crate) node: usize,
    /// Seconds since the run began, before the request was sent.
    pub(crate) start: f64,
    /// Seconds since the run began, once the answer was read (or given up).
    pub(crate) end: f64,
    pub(crate) answer: Answer,
}

impl Op {
    pub(crate) fn value(&self) -> Option<u64> {
        match self.answer {
            Answer::Value(value) => Some(value),
            _ => None,
        }
    }
}

/// The check's figures.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Answers with a value checked (reads and adds).
    pub(crate) answers_checked: u64,
    /// Answers counting fewer adds than were acknowledged before they started.
    pub(crate) stale: u64,
    /// Answers counting more adds than were sent before they ended.
    pub(crate) beyond: u64,
    /// A few of the violations, described.
    pub(crate) examples: Vec<String>,
    /// Distinct adds acknowledged, over all generations.
    pub(crate) adds_acknowledged: u64,
    /// Adds sent more than once.
    pub(crate) adds_resent: u64,
    /// For an add sent more than once: how many adds of its counter were
    /// acknowledged from its first sending to its acknowledgement, at most.
    /// The library recognises an add sent again by its event id only among
    /// the last `event_id_memory` of its counter.
    pub(crate) most_adds_during_a_resend: u64,
    /// Per counter, the distinct adds acknowledged in its last generation.
    pub(crate) acknowledged_by_counter: HashMap<usize, u64>,
}

/// One add's times, from its attempts.
#[derive(Debug, Clone, Copy)]
struct AddTimes {
    counter: usize,
    generation: u32,
    first_start: f64,
    first_ack: Option<f64>,
    attempts: u32,
}

/// Checks `ops` (every attempt of the run).
pub(crate) fn check(ops: &[Op]) -> Verdict {
    let mut adds: HashMap<u64, AddTimes> = HashMap::new();
    for op in ops {
        let Kind::Add(seq) = op.kind else { continue };
        let times = adds.entry(seq).or_insert(AddTimes {
            counter: op.counter,
            generation: op.generation,
            first_start: op.start,
            first_ack: None,
            attempts: 0,
        });
        times.attempts += 1;
        times.first_start = times.first_start.min(op.start);
        if op.value().is_some() {
            times.first_ack = Some(times.first_ack.map_or(op.end, |ack| ack.min(op.end)));
        }
    }
    // Per (counter, generation): acknowledgement times and first sendings, sorted.
    let mut acked: HashMap<(usize, u32), Vec<f64>> = HashMap::new();
    let mut sent: HashMap<(usize, u32), Vec<f64>> = HashMap::new();
    for times in adds.values() {
        let group = (times.counter, times.generation);
        sent.entry(group).or_default().push(times.first_start);
        if let Some(ack) = times.first_ack {
            acked.entry(group).or_default().push(ack);
        }
    }
    for times in acked.values_mut().chain(sent.values_mut()) {
        times.sort_by(f64::total_cmp);
    }
    let before = |times: Option<&Vec<f64>>, at: f64| times.map_or(0, |t| t.partition_point(|&x| x < at) as u64);

    let mut verdict = Verdict::default();
    for op in ops {
        let Some(value) = op.value() else { continue };
        let group = (op.counter, op.generation);
        let (mut lower, upper) = (before(acked.get(&group), op.start), before(sent.get(&group), op.end));
        match op.kind {
            Kind::Delete => continue,
            Kind::Read => {}
            Kind::Add(seq) => {
                // It counts itself, unless it was acknowledged before this attempt began.
                let own = adds.get(&seq).and_then(|times| times.first_ack);
                if own.is_none_or(|ack| ack >= op.start) {
                    lower += 1;
                }
            }
        }
        verdict.answers_checked += 1;
        let wrong = if value < lower {
            verdict.stale += 1;
            "stale"
        } else if value > upper {
            verdict.beyond += 1;
            "beyond the adds sent"
        } else {
            continue;
        };
        if verdict.examples.len() < 10 {
            verdict.examples.push(format!(
                "{wrong}: {:?} of counter {} (generation {}) through node {} from {:.3} s to {:.3} s answered {value}, \
                 expected {lower}..={upper}",
                op.kind, op.counter, op.generation, op.node, op.start, op.end
            ));
        }
    }

    // A counter's last generation, from every operation: after a delete
    // that no add followed, its value is 0.
    let mut last_generation: HashMap<usize, u32> = HashMap::new();
    for op in ops {
        let generation = last_generation.entry(op.counter).or_insert(op.generation);
        *generation = (*generation).max(op.generation);
        verdict.acknowledged_by_counter.entry(op.counter).or_insert(0);
    }
    for times in adds.values() {
        if times.first_ack.is_some() {
            verdict.adds_acknowledged += 1;
            if last_generation.get(&times.counter) == Some(&times.generation) {
                *verdict.acknowledged_by_counter.entry(times.counter).or_insert(0) += 1;
            }
        }
        if times.attempts > 1 {
            verdict.adds_resent += 1;
            if let Some(ack) = times.first_ack {
                let group = acked.get(&(times.counter, times.generation));
                let until_ack = group.map_or(0, |t| t.partition_point(|&x| x <= ack) as u64);
                let during = until_ack - before(group, times.first_start);
                verdict.most_adds_during_a_resend = verdict.most_adds_during_a_resend.max(during);
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, start: f64, end: f64, answer: Answer) -> Op {
        Op {
            counter: 0,
            generation: 0,
            kind,
            node: 0,
            start,
            end,
            answer,
        }
    }

    #[test]
    fn a_read_that_misses_an_add_acknowledged_before_it_started_is_stale() {
        let ops = [
            op(Kind::Add(1), 0.0, 1.0, Answer::Value(1)),
            op(Kind::Read, 2.0, 3.0, Answer::Value(0)),
        ];
        let verdict = check(&ops);
        assert_eq!((verdict.stale, verdict.beyond), (1, 0), "{:?}", verdict.examples);
    }

    #[test]
    fn a_read_concurrent_with_an_add_may_count_it_or_not() {
        let ops = [
            op(Kind::Add(1), 0.0, 2.0, Answer::Value(1)),
            op(Kind::Read, 1.0, 1.5, Answer::Value(0)),
            op(Kind::Read, 1.0, 1.5, Answer::Value(1)),
        ];
        let verdict = check(&ops);
        assert_eq!((verdict.stale, verdict.beyond, verdict.answers_checked), (0, 0, 3));
    }

    #[test]
    fn an_add_counted_twice_or_a_read_counting_an_add_not_yet_sent_is_beyond() {
        let ops = [
            op(Kind::Add(1), 0.0, 1.0, Answer::Nothing("timeout".into())),
            op(Kind::Add(1), 1.0, 2.0, Answer::Value(2)),
            op(Kind::Read, 0.0, 0.5, Answer::Value(1)),
            op(Kind::Read, 0.5, 0.6, Answer::Value(2)),
        ];
        let verdict = check(&ops);
        assert_eq!((verdict.stale, verdict.beyond), (0, 2), "{:?}", verdict.examples);
        assert_eq!((verdict.adds_acknowledged, verdict.adds_resent), (1, 1));
    }

    #[test]
    fn an_add_answered_without_itself_is_stale_and_generations_are_apart() {
        let mut after_delete = op(Kind::Read, 5.0, 6.0, Answer::Value(0));
        after_delete.generation = 1;
        let ops = [
            op(Kind::Add(1), 0.0, 1.0, Answer::Value(1)),
            op(Kind::Add(2), 2.0, 3.0, Answer::Value(1)),
            op(Kind::Delete, 3.0, 4.0, Answer::Value(0)),
            after_delete,
        ];
        let verdict = check(&ops);
        assert_eq!((verdict.stale, verdict.beyond), (1, 0), "{:?}", verdict.examples);
        assert_eq!(verdict.adds_acknowledged, 2);
        assert_eq!(verdict.acknowledged_by_counter.get(&0), Some(&0), "deleted since");
    }
}
