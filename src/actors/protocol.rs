//! The passivation handshake between an entity actor and its manager.
//!
//! Its own module so that neither side imports the other: the actor knows
//! its manager only through the [`Recipient`](actix::Recipient)s of
//! [`PassivationRequested`] and [`ChildStopped`], and the manager knows the
//! actor through its address.

use actix::Message;

/// From a child to its manager: it has been idle long enough.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PassivationRequested<K> {
    pub(crate) key: K,
    pub(crate) incarnation: u64,
}

/// From a child's `stopped` to its manager: its mailbox is drained and its
/// last write done.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChildStopped<K> {
    pub(crate) key: K,
    pub(crate) incarnation: u64,
}

/// From the manager to a child, once the manager holds back further
/// commands for it: everything forwarded earlier is already in the mailbox
/// ahead of this, so the child stops once it has handled them.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;
