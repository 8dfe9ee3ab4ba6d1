//! The passivation handshake between an entity actor and its manager.
//!
//! Its own module so that neither side imports the other: the actor knows
//! its manager only through a [`Recipient`](actix::Recipient) of
//! [`FromChild`], and the manager knows the actor through its address.

use actix::Message;

/// From a child to its manager. One message type, so a child holds a single
/// [`Recipient`](actix::Recipient) (each one boxes a sender of its own: two
/// would cost every resident entity another allocation).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FromChild<K> {
    pub(crate) key: K,
    pub(crate) incarnation: u64,
    pub(crate) event: ChildEvent,
}

/// What a child tells its manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildEvent {
    /// It has been idle long enough: hold its commands and tell it to passivate.
    PassivationRequested,
    /// It has stopped (from its `stopped`): its mailbox is drained and its last write done.
    Stopped,
}

/// From the manager to a child, once the manager holds back further
/// commands for it: everything forwarded earlier is already in the mailbox
/// ahead of this, so the child stops once it has handled them.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;
