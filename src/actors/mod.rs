//! The actors: one [`EntityActor`] per entity; the [`EntityManager`] and
//! its shards, one per arbiter, which route commands to them and hide their
//! passivation from callers; the protocol between a shard and its actors;
//! and the typed handle [`Entities`], which picks the shard itself.

pub(crate) mod contain;
mod entity_actor;
mod handle;
mod manager;
mod messages;
mod placement;
mod protocol;
mod round;
mod shard;

pub(crate) use entity_actor::Records;
pub use entity_actor::{EntityActor, Execute};
pub use handle::Entities;
pub(crate) use handle::Forward;
pub use manager::EntityManager;
pub use messages::{EntityCommand, GetManagerStats, ManagerStats, PurgeIdle};
pub(crate) use round::Answer;

use actix::dev::channel;
use actix::{Actor, Addr, ArbiterHandle, Context};

/// Starts `actor` with an unbounded mailbox, on `arbiter` or on the current one.
///
/// The mailbox must be unbounded from its creation, not from `started`:
/// actix's default holds 16 messages, and a `send` beyond that parks the
/// message in the sender's future, to be queued only when that future is
/// polled. Senders would then be served one at a time, and a later
/// `do_send` (which ignores the bound) could overtake parked messages.
pub(crate) fn start_unbounded<A>(actor: A, arbiter: Option<&ArbiterHandle>) -> Addr<A>
where
    A: Actor<Context = Context<A>> + Send,
{
    let (sender, receiver) = channel::channel(0); // 0: unbounded
    match arbiter {
        None => Context::with_receiver(receiver).run(actor),
        Some(arbiter) => {
            arbiter.spawn_fn(move || {
                actix::spawn(Context::with_receiver(receiver).into_future(actor));
            });
            Addr::new(sender)
        }
    }
}

#[cfg(test)]
mod footprint {
    //! What a resident entity costs, guarded: BENCHMARKS.md's resident
    //! bytes per user rest on these sizes (tokio allocates a task in steps
    //! of 128 bytes, the actor's context inside it).

    use std::mem::size_of;

    use actix::dev::ContextFut;
    use actix::Context;

    use super::EntityActor;
    use crate::domain::UserState;

    type UserContextFut = ContextFut<EntityActor<UserState>, Context<EntityActor<UserState>>>;

    #[test]
    fn a_user_actor_and_its_context_fit_a_640_byte_task() {
        // With tokio's 32-byte header and 48-byte trailer around the future
        // and its 16-byte id and scheduler, 528 bytes make a 632-byte task.
        assert!(size_of::<UserContextFut>() <= 528, "{}", size_of::<UserContextFut>());
    }

    #[test]
    fn a_shard_keeps_a_resident_child_in_24_bytes_of_map_entry() {
        assert!(super::shard::child_size() <= 16, "{}", super::shard::child_size());
        assert_eq!(size_of::<crate::UserKey>(), 8);
    }
}
