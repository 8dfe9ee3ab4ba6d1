//! The messages a manager takes: commands for one entity, an ingest's
//! records and hand-overs, counters and purges. Their own module, so that
//! the manager, its shards and the typed handle share them without
//! importing one another.

use actix::prelude::*;

use super::entity_actor::Records;
use crate::entity::{DurableEntity, EntityEvent};
use crate::error::{CommandError, StoreError};

/// A command for one entity, sent to its [`EntityManager`](crate::EntityManager); for users it is
/// [`UserCommand`](crate::UserCommand).
#[derive(Debug, Clone)]
pub struct EntityCommand<E: DurableEntity> {
    /// The entity.
    pub key: E::Key,
    /// What is asked of it, with the event's id and time if known.
    pub event: EntityEvent<E::Command>,
}

impl<E: DurableEntity> Message for EntityCommand<E> {
    type Result = Result<E, CommandError<E>>;
}

impl<E: DurableEntity> EntityCommand<E> {
    /// `command` (a command or an [`EntityEvent`] of it) for the entity `key`.
    pub fn new(key: E::Key, command: impl Into<EntityEvent<E::Command>>) -> Self {
        Self {
            key,
            event: command.into(),
        }
    }

    /// The command itself.
    pub fn command(&self) -> &E::Command {
        &self.event.command
    }
}

/// Asks a manager for its counters.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ManagerStats")]
pub struct GetManagerStats;

/// What a manager has done since it started, summed over its shards.
///
/// A passivation has one of three causes, counted apart when it begins:
/// [`idle_passivations`](Self::idle_passivations),
/// [`evictions`](Self::evictions) and [`handovers`](Self::handovers).
/// [`passivations`](Self::passivations) counts those of any cause that have
/// completed (the actor stopped), so once no entity is passivating it is
/// their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Entities with an actor now (passivating ones included).
    pub resident_entities: usize,
    /// Actors started: first activations and restores after passivation.
    pub activations: u64,
    /// Passivations completed, of any cause: idleness, eviction or hand-over.
    pub passivations: u64,
    /// Entities whose actor asked to be passivated because it was idle for
    /// [`Config::idle_timeout`](crate::Config::idle_timeout).
    pub idle_passivations: u64,
    /// Commands that arrived while their entity was passivating and were
    /// held for its next actor (at most [`Config::max_queued_per_entity`](crate::Config::max_queued_per_entity) at a
    /// time per entity; beyond it they are refused).
    pub commands_held_during_passivation: u64,
    /// Entities passivated early because [`Config::max_resident`](crate::Config::max_resident) was reached.
    pub evictions: u64,
    /// Entities passivated because the ingest feeding them lost their
    /// source partition to another node (a rebalance).
    pub handovers: u64,
    /// Rows removed by this manager's retention purges ([`Config::retention`](crate::Config::retention), [`PurgeIdle`]).
    pub purged: u64,
    /// Commands refused with [`CommandError::Overloaded`] by the manager:
    /// beyond [`Config::max_commands_in_flight`](crate::Config::max_commands_in_flight), or beyond
    /// [`Config::max_queued_per_entity`](crate::Config::max_queued_per_entity) held for a passivating entity.
    pub commands_refused: u64,
}

impl ManagerStats {
    /// Both counts together: a manager's stats are the sum of its shards'.
    pub(crate) fn add(self, other: Self) -> Self {
        Self {
            resident_entities: self.resident_entities + other.resident_entities,
            activations: self.activations + other.activations,
            passivations: self.passivations + other.passivations,
            idle_passivations: self.idle_passivations + other.idle_passivations,
            commands_held_during_passivation: self.commands_held_during_passivation
                + other.commands_held_during_passivation,
            evictions: self.evictions + other.evictions,
            handovers: self.handovers + other.handovers,
            purged: self.purged + other.purged,
            commands_refused: self.commands_refused + other.commands_refused,
        }
    }
}

/// Asks a manager to purge now, as its periodic retention does, the rows of
/// its entity type not written for [`Config::retention`](crate::Config::retention),
/// skipping resident entities; answered with the number of rows removed.
///
/// Each shard purges the rows of its own keys, and the answer is the sum. A
/// shard's purges never overlap: one asked for while another runs starts
/// when that one ends. Fails with [`StoreError::InvalidConfig`] when retention is off,
/// and with the store's error when a chunk fails (the chunks before it stay
/// purged; the next run goes on).
///
/// ```
/// use std::time::Duration;
/// use actix::Actor;
/// use persist_durable::{Config, MemoryStore, PurgeIdle, UserStateManager};
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let config = Config::default().with_retention(Some(Duration::from_secs(400 * 24 * 60 * 60)));
///     let manager = UserStateManager::new(std::sync::Arc::new(MemoryStore::new()), config).start();
///     assert_eq!(manager.send(PurgeIdle).await??, 0);
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<u64, StoreError>")]
pub struct PurgeIdle;

/// Stops a manager's shards gracefully; see [`Entities::stop`](crate::Entities::stop).
/// Answered true once every shard has stopped.
pub(crate) struct StopGracefully;

impl Message for StopGracefully {
    type Result = bool;
}

/// Records of one source partition for one entity, from an ingest: queued
/// at the entity together, answered one result per record.
pub(crate) struct EntityRecords<E: DurableEntity> {
    pub(crate) key: E::Key,
    pub(crate) records: Records<E>,
}

impl<E: DurableEntity> Message for EntityRecords<E> {
    type Result = Vec<Result<E, CommandError<E>>>;
}

impl<E: DurableEntity> EntityRecords<E> {
    /// The answers to `len` records for `key` that were not delivered.
    pub(crate) fn undelivered(key: &E::Key, len: usize, reason: &str) -> Vec<Result<E, CommandError<E>>> {
        (0..len)
            .map(|_| {
                Err(CommandError::NotDelivered {
                    key: key.clone(),
                    reason: reason.to_owned(),
                })
            })
            .collect()
    }
}

/// Passivates these entities (those not passivating already) once what was
/// sent to them is committed, so that whoever writes them next finds the
/// committed state: what an ingest asks when its partitions move to another
/// node. Answered once every one of them has been told to passivate.
pub(crate) struct HandOver<E: DurableEntity>(pub(crate) Vec<E::Key>);

impl<E: DurableEntity> Message for HandOver<E> {
    type Result = ();
}
