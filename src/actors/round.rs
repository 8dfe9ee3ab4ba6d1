//! One round over an entity's queue, decided without I/O: which commands
//! are answered at once, which state is written and which answers wait for
//! that write, and what must happen before the rest. The actor only moves
//! what a round decides to the store and to the callers.
//!
//! The rules a round keeps:
//! - a command is answered only from a state the store is known to hold:
//!   one its write committed, or one loaded after it arrived (with
//!   [`Config::exclusive_writer`](crate::Config::exclusive_writer), any
//!   answer without a write comes from memory);
//! - an answer without a write of its own (a read, a redelivery, a no-op, a
//!   refusal, a panic, an unstorable state) waits for the changes queued
//!   before it to commit, and is decided again if they do not;
//! - a panic in the entity's code, or a state that cannot be encoded, fails
//!   that one command; the commands before it still commit. An ingested
//!   record failing so is settled all the same: its offset is noted with the
//!   state before it, as refused, so that it is never taken for applied;
//! - a command marked to be written alone (its write was refused with
//!   others') gets a write of its own, so that a refusal falls on it alone;
//! - a timer's fire is always written alone, and always writes a revision
//!   (the state as it is, if the fire changes nothing): the statement that
//!   commits it consumes the timer, and commits nothing if the timer is no
//!   longer due (fired elsewhere, moved or cancelled);
//! - the timers the state wants are compared before and after the write,
//!   and their changes committed with it; a state wanting a timer that
//!   cannot be stored fails the command that made it, as an unstorable
//!   state does.

use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, Utc};
use tracing::debug;

use super::contain::panic_message;
use super::protocol::ReplyTo;
use crate::entity::{Durable, DurableEntity, EntityEvent, EntityKey, PersistenceId, RecordOrigin, Revision, Step};
use crate::error::{CommandError, StoreError};
use crate::store::payload::{encode as encode_durable, REDACTED};
use crate::store::{TimerChange, TimerFired};
use crate::timers::{self, Declared, Fire, TimerError};

/// What a command is answered with: the state after it, or why not.
pub(crate) type Answer<E> = Result<E, CommandError<E>>;

/// What a queued item asks of the entity.
pub(crate) enum Work<C> {
    /// A command, with its event's id and time.
    Command(EntityEvent<C>),
    /// A durable timer's fire: its command is decoded by the state that
    /// wants the timer, when the fire is decided.
    Fire(Box<Fire>),
}

/// A command in an entity's queue.
pub(crate) struct Queued<E: DurableEntity> {
    pub(crate) work: Work<E::Command>,
    /// Where an ingested record came from.
    pub(crate) origin: Option<RecordOrigin>,
    pub(crate) received_at: DateTime<Utc>,
    pub(crate) reply: ReplyTo<Answer<E>>,
    /// The command's name for metrics, asked of the entity once.
    pub(crate) name: &'static str,
    /// Writes of this event lost to a conflict so far.
    pub(crate) conflicts: u32,
    /// It was queued when the load in flight started.
    pub(crate) awaiting_load: bool,
    /// A load that started after it arrived has completed: the state it
    /// meets is at least what the store held when it arrived.
    pub(crate) fresh: bool,
    /// Write the state after it in a write of its own: its state, or the
    /// write it shared, was refused (or did not encode), and which command's
    /// state it was is found by writing each alone.
    pub(crate) alone: bool,
    /// An ingested record whose state the database refused when written
    /// alone: next time its offset is noted, as refused, with the state
    /// before it.
    pub(crate) refused: Option<StoreError>,
    /// The last round wrote a revision for it (it is not only answered).
    pub(crate) changed: bool,
    /// The command's span: the entity, the command, and the revision written.
    pub(crate) span: tracing::Span,
}

impl<E: DurableEntity> Queued<E> {
    /// Answers the command, counted by its outcome.
    pub(crate) fn answer(self, answer: Answer<E>) {
        let outcome = answer.as_ref().map_or_else(CommandError::kind, |_| "ok");
        metrics::counter!(
            "persist_durable_commands_total",
            "entity" => E::ENTITY_TYPE,
            "command" => self.name,
            "outcome" => outcome
        )
        .increment(1);
        // Within the command's span, so that a subscriber printing events
        // (the fmt one at `debug`) shows each command with its entity, key,
        // revision and outcome.
        self.span.in_scope(|| debug!(outcome, "answered"));
        self.reply.send(answer);
    }
}

/// What a round needs to know besides the queue and the state.
pub(crate) struct Rules<'a, E: DurableEntity> {
    pub(crate) key: &'a E::Key,
    pub(crate) settings: &'a E::Settings,
    pub(crate) event_id_memory: usize,
    /// The store keeps a change feed, which gets every state.
    pub(crate) every_change: bool,
    /// No other process writes these entities: answers without a write may
    /// come from memory.
    pub(crate) exclusive: bool,
    /// The clock's now: when timers set by this round first fire, and how
    /// late a fire is.
    pub(crate) now: DateTime<Utc>,
}

/// What a round decided.
pub(crate) struct Round<E: DurableEntity> {
    /// To answer now.
    pub(crate) answered: Vec<(Queued<E>, Answer<E>)>,
    /// Back to the front of the queue, in order, for a later round.
    pub(crate) rest: Vec<Queued<E>>,
    /// What becomes of the state.
    pub(crate) next: Next<E>,
}

/// What becomes of the state after a round.
pub(crate) enum Next<E: DurableEntity> {
    /// Nothing to write: the state stays.
    Stay(Revision, Durable<E>),
    /// Nothing to write, but the rest needs the stored state first: read the
    /// row, and keep this state if it is still the stored revision.
    Check(Revision, Durable<E>),
    /// The state in memory cannot be trusted (the entity's code panicked, or
    /// a state did not encode): load it again before the rest.
    Reload,
    /// Commit this write.
    Write(Write<E>),
}

/// A write a round decided.
pub(crate) struct Write<E: DurableEntity> {
    pub(crate) expected: Revision,
    pub(crate) revision: Revision,
    pub(crate) state: Durable<E>,
    /// With a feed every revision's encoded state, else the last alone.
    pub(crate) payloads: Vec<Vec<u8>>,
    /// It deletes the entity: the feed's earlier rows of it are redacted.
    pub(crate) erases: bool,
    /// Answered once the write commits.
    pub(crate) waiting: Vec<(Queued<E>, Answer<E>)>,
    /// Load the state again once committed (a later command panicked).
    pub(crate) reload_after: bool,
    /// The timers it sets and cancels.
    pub(crate) timers: Vec<TimerChange>,
    /// The timer whose fire it commits.
    pub(crate) fired: Option<TimerFired>,
}

/// What one command comes to, decided on the state before it.
enum Decision<E: DurableEntity> {
    /// A new revision, answered once it commits (with the state after it
    /// unless the answer is given).
    Revision(Durable<E>, Option<Answer<E>>),
    /// No revision: only an answer.
    Answer(Answer<E>),
    /// The entity's code panicked on it.
    Panicked(CommandError<E>),
}

/// Decides `queued` on `current`, a panic of the entity's code caught.
fn decide<E: DurableEntity>(rules: &Rules<'_, E>, current: &Durable<E>, queued: &mut Queued<E>) -> Decision<E> {
    if let (Some(refused), Some(origin)) = (&queued.refused, &queued.origin) {
        let error = CommandError::from_store(rules.key, refused.clone());
        return Decision::Revision(current.refused(origin, &why(&error)), Some(Err(error)));
    }
    let event = match &queued.work {
        Work::Command(event) => event,
        Work::Fire(fire) => {
            if let Some(refused) = &queued.refused {
                // Its state was refused: consumed with the state as it is.
                let error = CommandError::from_store(rules.key, refused.clone());
                return Decision::Revision(current.clone(), Some(Err(error)));
            }
            return decide_fire(rules, current, fire);
        }
    };
    let step = catch_unwind(AssertUnwindSafe(|| {
        current.step(
            event,
            queued.origin.as_ref(),
            queued.received_at,
            rules.settings,
            rules.event_id_memory,
        )
    }));
    let key = rules.key;
    match step {
        Err(panic) => Decision::Panicked(panicked(key, panic)),
        Ok(Step::Changed(next)) => Decision::Revision(next, None),
        // Written like a change (the offset is the machinery's), answered as what it was.
        Ok(Step::Noted { next, rejection }) => {
            let answer = match rejection {
                None => Ok(next.state.clone()),
                Some(reason) => Err(CommandError::Rejected {
                    key: key.clone(),
                    reason,
                }),
            };
            Decision::Revision(next, Some(answer))
        }
        Ok(Step::Rejected(reason)) => Decision::Answer(Err(CommandError::Rejected {
            key: key.clone(),
            reason,
        })),
        Ok(Step::RefusedBefore(reason)) => Decision::Answer(Err(CommandError::RefusedBefore {
            key: key.clone(),
            reason,
        })),
        Ok(Step::Unchanged) => Decision::Answer(Ok(current.state.clone())),
    }
}

/// Decides a timer's fire on `current`. It always writes a revision, so
/// that the write consumes the timer: the state after its command, or the
/// state as it is when the command changes nothing, is refused, or panics,
/// when a missed occurrence is skipped, and when the state no longer wants
/// the timer. Only a stored command that no longer decodes is answered
/// without a write: the timer stays, to fire once the code reads it again.
fn decide_fire<E: DurableEntity>(rules: &Rules<'_, E>, current: &Durable<E>, fire: &Fire) -> Decision<E> {
    let key = rules.key;
    let as_it_is = |answer: Answer<E>| Decision::Revision(current.clone(), Some(answer));
    let (deliver, _) = fire.outcome(rules.now);
    if !deliver {
        return as_it_is(Ok(current.state.clone()));
    }
    let command = catch_unwind(AssertUnwindSafe(|| {
        timers::command_of(&current.state, rules.settings, &fire.name, &fire.command)
    }));
    let command = match command {
        Err(panic) => return as_it_is(Err(panicked(key, panic))),
        // Not wanted any more (a transition that cancelled it raced its fire).
        Ok(None) => return as_it_is(Ok(current.state.clone())),
        Ok(Some(Err(source))) => {
            return Decision::Answer(Err(CommandError::InvalidTimer {
                key: key.clone(),
                source,
            }))
        }
        Ok(Some(Ok(command))) => command,
    };
    // Applied at the time it was due, whenever it fired.
    let event = EntityEvent::from(command);
    let step = catch_unwind(AssertUnwindSafe(|| {
        current.step(&event, None, fire.due, rules.settings, rules.event_id_memory)
    }));
    match step {
        Err(panic) => as_it_is(Err(panicked(key, panic))),
        Ok(Step::Changed(next)) => Decision::Revision(next, None),
        Ok(Step::Noted { next, rejection }) => {
            let answer = rejection.map_or_else(
                || Ok(next.state.clone()),
                |reason| {
                    Err(CommandError::Rejected {
                        key: key.clone(),
                        reason,
                    })
                },
            );
            Decision::Revision(next, Some(answer))
        }
        Ok(Step::Rejected(reason)) => as_it_is(Err(CommandError::Rejected {
            key: key.clone(),
            reason,
        })),
        Ok(Step::RefusedBefore(reason)) => as_it_is(Err(CommandError::RefusedBefore {
            key: key.clone(),
            reason,
        })),
        Ok(Step::Unchanged) => as_it_is(Ok(current.state.clone())),
    }
}

/// The timers `durable` wants, for comparing: none for a deleted entity
/// (its erasure deleted them) or one not stored yet; a panic of the
/// entity's code caught.
fn wanted<E: DurableEntity>(rules: &Rules<'_, E>, durable: &Durable<E>) -> Result<Vec<Declared>, TimerError> {
    if durable.is_tombstone() {
        return Ok(Vec::new());
    }
    catch_unwind(AssertUnwindSafe(|| timers::declared(&durable.state, rules.settings)))
        .unwrap_or_else(|panic| Err(TimerError::Panicked(panic_message(&panic))))
}

/// What a write from `before` (the timers the stored state wants) to
/// `after` does to the timers.
fn timer_changes<E: DurableEntity>(
    rules: &Rules<'_, E>,
    before: &[Declared],
    after: &Durable<E>,
) -> Result<Vec<TimerChange>, TimerError> {
    timers::changes(before, &wanted(rules, after)?, rules.now)
}

/// Runs `queue` over the state stored at `expected`.
pub(crate) fn run<E: DurableEntity>(
    rules: &Rules<'_, E>,
    expected: Revision,
    mut current: Durable<E>,
    queue: Vec<Queued<E>>,
) -> Round<E> {
    let mut answered = Vec::new();
    let mut waiting: Vec<(Queued<E>, Answer<E>)> = Vec::new();
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    // The revision the last payload is of, without a feed (the row needs
    // only the last state).
    let mut encoded_revision = expected;
    let mut persistence_id: Option<PersistenceId> = None;
    let mut revision = expected;
    let mut stopped = Stop::No;
    let mut erases = false;
    // The timers the stored state wants, read at the round's first change.
    let mut before: Option<Vec<Declared>> = None;
    let mut fired: Option<TimerFired> = None;
    // A command to be written alone, met after others changed the state.
    let mut next_round: Option<Queued<E>> = None;
    let mut queue = queue.into_iter();
    while let Some(mut queued) = queue.next() {
        if queued.alone && revision != expected {
            next_round = Some(queued);
            break;
        }
        queued.changed = false;
        let (next, answer) = match decide(rules, &current, &mut queued) {
            Decision::Revision(next, answer) => (next, answer),
            Decision::Answer(answer) => {
                let is_read = answer.is_ok();
                if revision != expected {
                    // Answered once the changes before it are committed.
                    waiting.push((queued, answer));
                } else if queued.fresh || (rules.exclusive && is_read) {
                    answered.push((queued, answer));
                } else {
                    // Decided on a state the store may have moved past: read it first.
                    let mut rest = vec![queued];
                    rest.extend(queue);
                    return Round {
                        answered,
                        rest,
                        next: Next::Check(expected, current),
                    };
                }
                continue;
            }
            Decision::Panicked(error) => {
                // The state in memory may not be what it was: reload after.
                stopped = Stop::Panicked;
                match &queued.origin {
                    // Settled like a refusal: its offset noted with the state before it.
                    Some(origin) => (current.refused(origin, &why(&error)), Some(Err(error))),
                    None if revision == expected => {
                        answered.push((queued, Err(error)));
                        break;
                    }
                    None => {
                        waiting.push((queued, Err(error)));
                        break;
                    }
                }
            }
        };
        let before = before.get_or_insert_with(|| {
            // A stored state whose timers no longer read (the code changed)
            // is taken to want none: what the new state wants is set anew.
            if expected == Revision::NONE {
                Vec::new()
            } else {
                wanted(rules, &current).unwrap_or_default()
            }
        });
        if let Work::Fire(fire) = &queued.work {
            fired = Some(fire.outcome(rules.now).1);
        }
        let (next, answer) = if rules.every_change || queued.alone {
            let key = persistence_id.get_or_insert_with(|| EntityKey::persistence_id(rules.key));
            let checked = encode(key, &next)
                .map_err(|error| CommandError::from_store(rules.key, error))
                .and_then(|payload| {
                    // Written alone: its timers are its own, checked now.
                    if !queued.alone {
                        return Ok(payload);
                    }
                    match timer_changes(rules, before, &next) {
                        Ok(_) => Ok(payload),
                        Err(source) => Err(CommandError::InvalidTimer {
                            key: rules.key.clone(),
                            source,
                        }),
                    }
                });
            match checked {
                Ok(payload) => {
                    if !rules.every_change {
                        payloads.clear();
                    }
                    payloads.push(payload);
                    encoded_revision = revision.next();
                    (next, answer)
                }
                Err(error) => {
                    // Its state is never committed; those after it apply
                    // to the state before it. A record is noted as refused,
                    // a fire consumed with the state as it is.
                    let noted = match (&queued.origin, &queued.work) {
                        (Some(origin), _) => Some(current.refused(origin, &why(&error))),
                        (None, Work::Fire(_)) => Some(current.clone()),
                        (None, Work::Command(_)) => None,
                    };
                    match noted.map(|noted| encode(key, &noted).map(|payload| (noted, payload))) {
                        Some(Ok((noted, payload))) => {
                            if !rules.every_change {
                                payloads.clear();
                            }
                            payloads.push(payload);
                            encoded_revision = revision.next();
                            (noted, Some(Err(error)))
                        }
                        _ if revision == expected => {
                            answered.push((queued, Err(error)));
                            continue;
                        }
                        _ => {
                            waiting.push((queued, Err(error)));
                            continue;
                        }
                    }
                }
            }
        } else {
            (next, answer)
        };
        // Only the revision that deletes erases: one that notes a record
        // on a deleted entity stays a tombstone and erases nothing more.
        let erasing = next.is_tombstone() && !current.is_tombstone();
        if erasing && rules.every_change {
            // The states before the delete never reach the feed.
            let last = payloads.len().saturating_sub(1);
            payloads[..last].fill(REDACTED.to_vec());
        }
        erases |= erasing;
        current = next;
        revision = revision.next();
        queued.span.record("revision", revision.0);
        queued.changed = true;
        let alone = queued.alone;
        let answer = answer.unwrap_or_else(|| Ok(current.state.clone()));
        waiting.push((queued, answer));
        if alone || matches!(stopped, Stop::Panicked) {
            break;
        }
    }
    let rest: Vec<Queued<E>> = next_round.into_iter().chain(queue).collect();
    if revision == expected {
        let next = match stopped {
            Stop::Panicked => Next::Reload,
            Stop::No => Next::Stay(expected, current),
        };
        return Round { answered, rest, next };
    }
    if !rules.every_change && encoded_revision != revision {
        let key = persistence_id.get_or_insert_with(|| EntityKey::persistence_id(rules.key));
        match encode(key, &current) {
            Ok(payload) => payloads = vec![payload],
            // Some command of the round made a state that cannot be encoded,
            // and only the last was: each again alone, so only it fails.
            Err(_) => return each_alone(answered, waiting, rest),
        }
    }
    let timers = match timer_changes(rules, before.as_deref().unwrap_or_default(), &current) {
        Ok(timers) => timers,
        // Some command of the round made a state wanting a timer that
        // cannot be stored: each again alone, so only it fails.
        Err(_) => return each_alone(answered, waiting, rest),
    };
    Round {
        answered,
        rest,
        next: Next::Write(Write {
            expected,
            revision,
            state: current,
            payloads,
            erases,
            waiting,
            reload_after: matches!(stopped, Stop::Panicked),
            timers,
            fired,
        }),
    }
}

/// The round again from the stored state, each command that changed it in
/// a write of its own: one of them made a state that cannot be stored, and
/// which one is found by writing each alone.
fn each_alone<E: DurableEntity>(
    answered: Vec<(Queued<E>, Answer<E>)>,
    waiting: Vec<(Queued<E>, Answer<E>)>,
    rest: Vec<Queued<E>>,
) -> Round<E> {
    let mut again: Vec<Queued<E>> = waiting
        .into_iter()
        .map(|(mut queued, _)| {
            queued.alone = queued.changed;
            queued
        })
        .collect();
    again.extend(rest);
    Round {
        answered,
        rest: again,
        next: Next::Reload,
    }
}

/// Why a record failed, as its entity remembers it: without the key (whose
/// `Display` is the application's code, and shown elsewhere anyway).
fn why<E: DurableEntity>(error: &CommandError<E>) -> String {
    match error {
        CommandError::Panicked { message, .. } => format!("panicked: {message}"),
        CommandError::Unstorable { source, .. } => format!("unstorable: {source}"),
        other => other.kind().to_owned(),
    }
}

/// Why a round ended before the queue did.
enum Stop {
    No,
    /// The entity's code panicked on a command.
    Panicked,
}

/// `durable` encoded for its row, with a panic of the state's serde caught.
fn encode<E: DurableEntity>(key: &PersistenceId, durable: &Durable<E>) -> Result<Vec<u8>, StoreError> {
    catch_unwind(AssertUnwindSafe(|| encode_durable(key, durable))).unwrap_or_else(|panic| {
        Err(StoreError::Panicked {
            during: "encoding a state",
            message: panic_message(&panic),
        })
    })
}

/// The error a command whose transition panicked is answered with.
fn panicked<E: DurableEntity>(key: &E::Key, panic: Box<dyn std::any::Any + Send>) -> CommandError<E> {
    CommandError::Panicked {
        key: key.clone(),
        message: panic_message(&panic),
    }
}
