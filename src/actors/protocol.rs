//! What an entity actor and its manager's shard say to each other: the
//! passivation handshake, and the reply a command carries to the actor.
//!
//! Its own module so that neither side imports the other: the actor knows
//! its shard only through a [`Recipient`](actix::Recipient) of
//! [`FromChild`], and the shard knows the actor through its address.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Message;
use tokio::sync::oneshot;

/// From a child to its shard. One message type, so a child holds a single
/// [`Recipient`](actix::Recipient) (each one boxes a sender of its own: two
/// would cost every resident entity another allocation).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FromChild<K> {
    pub(crate) key: K,
    pub(crate) incarnation: u32,
    pub(crate) event: ChildEvent,
}

/// What a child tells its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildEvent {
    /// It has been idle long enough: hold its commands and tell it to passivate.
    PassivationRequested,
    /// It has stopped (from its `stopped`): its mailbox is drained and its last write done.
    Stopped,
}

/// From the shard to a child, once the shard holds back further
/// commands for it: everything forwarded earlier is already in the mailbox
/// ahead of this, so the child stops once it has handled them.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;

/// Where an answer goes, holding its commands' place under
/// [`Config::max_commands_in_flight`](crate::Config::max_commands_in_flight)
/// until it is sent. Passed along from the caller to the entity's actor, so
/// the answer goes straight back, whichever threads it crossed.
pub(crate) struct ReplyTo<T> {
    sender: oneshot::Sender<T>,
    _slot: Option<InFlight>,
}

impl<T> ReplyTo<T> {
    /// Answers through `sender`; `slot` is released with the answer.
    pub(crate) fn new(sender: oneshot::Sender<T>, slot: Option<InFlight>) -> Self {
        Self { sender, _slot: slot }
    }

    /// The same reply, holding `slot` until it is sent.
    pub(crate) fn holding(self, slot: InFlight) -> Self {
        Self {
            sender: self.sender,
            _slot: Some(slot),
        }
    }

    /// Sends the answer; a caller that gave up waiting is not an error.
    pub(crate) fn send(self, answer: T) {
        let _ = self.sender.send(answer);
    }
}

/// Commands counted in flight until dropped.
pub(crate) struct InFlight {
    counter: Arc<AtomicUsize>,
    commands: usize,
}

impl InFlight {
    /// Takes `commands` places in `counter` if that keeps it within `limit`.
    pub(crate) fn acquire(counter: &Arc<AtomicUsize>, commands: usize, limit: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now + commands <= limit).then_some(now + commands)
            })
            .ok()?;
        Some(Self {
            counter: counter.clone(),
            commands,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.commands, Ordering::Relaxed);
    }
}
