use std::fmt;

use actix::Addr;

use super::entity_actor::{Answer, Records};
use super::manager::{EntityManager, Shards};
use super::messages::{
    EntityCommand, EntityRecords, GetManagerStats, HandOver, ManagerStats, PurgeIdle, StopGracefully,
};
use crate::config::Config;
use crate::entity::{DurableEntity, EntityEvent};
use crate::error::{CommandError, ManagerStopped, StoreError};
use crate::store::SharedStore;

/// A cloneable, typed handle to the entities of one type: one `?` per command.
///
/// `send(key, command).await` returns the state after the command, or a
/// [`CommandError`]: a manager that cannot be reached is
/// [`CommandError::NotDelivered`], not a second layer of `Result`. Share it
/// with actix-web handlers as `web::Data<Entities<E>>`; the manager's
/// [`Addr`] stays available through [`addr`](Self::addr). For users it is
/// [`UserStates`](crate::UserStates).
///
/// A handle from [`start`](Self::start) picks the entity's shard in the
/// caller's thread and sends the command there, one hop shorter than a
/// message to the manager's address, which passes it on.
///
/// ```
/// use persist_durable::{Command, Config, MemoryStore, UserKey, UserStates};
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let users = UserStates::start(std::sync::Arc::new(MemoryStore::new()), Config::default());
///     let state = users.send(UserKey::new("mall001", "user001")?, Command::UserLogin).await?;
///     assert!(state.last_login.is_some());
///     Ok(())
/// }
/// ```
pub struct Entities<E: DurableEntity> {
    manager: Addr<EntityManager<E>>,
    /// The manager's shards, when this handle started it.
    shards: Option<Shards<E>>,
    store: SharedStore,
}

impl<E: DurableEntity> Entities<E> {
    /// Starts a manager for `E` on `store`, with the entity's default
    /// settings, and returns its handle.
    pub fn start(store: SharedStore, config: Config) -> Self {
        Self::start_with(store, config, E::Settings::default())
    }

    /// Starts a manager for `E` on `store` whose entities' transitions use
    /// `settings` (for users a [`StatePolicy`](crate::StatePolicy)), and
    /// returns its handle.
    pub fn start_with(store: SharedStore, config: Config, settings: E::Settings) -> Self {
        let (manager, shards) = EntityManager::<E>::with_settings(store.clone(), config, settings).start_with_shards();
        Self {
            manager,
            shards: Some(shards),
            store,
        }
    }

    /// A handle to a manager already started on `store`; its commands go
    /// through the manager's address.
    pub fn new(manager: Addr<EntityManager<E>>, store: SharedStore) -> Self {
        Self {
            manager,
            shards: None,
            store,
        }
    }

    /// Sends `command` (a command, or an [`EntityEvent`] with its id and
    /// time) to the entity `key` and returns the state after it, once committed.
    pub async fn send(&self, key: E::Key, command: impl Into<EntityEvent<E::Command>>) -> Result<E, CommandError<E>> {
        if let Some(shards) = &self.shards {
            return shards.send(key, command.into()).await;
        }
        let request = self.manager.send(EntityCommand::new(key.clone(), command));
        request.await.unwrap_or_else(|error| {
            Err(CommandError::NotDelivered {
                key,
                reason: error.to_string(),
            })
        })
    }

    /// The manager's counters, summed over its shards.
    pub async fn stats(&self) -> Result<ManagerStats, ManagerStopped> {
        match &self.shards {
            Some(shards) => Ok(shards.stats().await),
            None => self.manager.send(GetManagerStats).await.map_err(|_| ManagerStopped),
        }
    }

    /// Purges now, as retention does periodically, the rows of `E` not
    /// written for [`Config::retention`], skipping resident entities, and
    /// returns how many were removed; see [`PurgeIdle`](crate::PurgeIdle).
    /// Fails with [`StoreError::InvalidConfig`] when retention is off.
    pub async fn purge_idle(&self) -> Result<u64, StoreError> {
        match &self.shards {
            Some(shards) => shards.purge_idle().await,
            None => self.manager.send(PurgeIdle).await.map_err(|_| StoreError::Stopped)?,
        }
    }

    /// Stops gracefully: every resident entity passivates once what is
    /// queued at it is committed (and answered), and this returns once none
    /// is left. A command sent from then on is answered
    /// [`CommandError::NotDelivered`], not applied. Call it before the
    /// process exits, so that no acknowledged command is cut short.
    pub async fn stop(&self) -> Result<(), ManagerStopped> {
        let drained = match &self.shards {
            Some(shards) => shards.drain().await,
            None => self.manager.send(StopGracefully).await.map_err(|_| ManagerStopped)?,
        };
        if drained {
            Ok(())
        } else {
            Err(ManagerStopped)
        }
    }

    /// Sends an ingest's `records` for `key`, answered one result per record.
    #[allow(dead_code)] // used by the `kafka` feature
    pub(crate) async fn send_records(&self, key: E::Key, records: Records<E>) -> Vec<Answer<E>> {
        if let Some(shards) = &self.shards {
            return shards.send_records(key, records).await;
        }
        let len = records.len();
        let request = self.manager.send(EntityRecords {
            key: key.clone(),
            records,
        });
        request
            .await
            .unwrap_or_else(|error| EntityRecords::undelivered(&key, len, &format!("the manager is gone: {error}")))
    }

    /// Passivates `keys` once what was sent to them is committed (see [`HandOver`]).
    #[allow(dead_code)] // used by the `kafka` feature
    pub(crate) fn hand_over(&self, keys: Vec<E::Key>) {
        match &self.shards {
            Some(shards) => shards.hand_over(keys),
            None => self.manager.do_send(HandOver(keys)),
        }
    }

    /// Whether `key` has an actor that is not passivating (false for a
    /// handle made from an address).
    pub(crate) async fn is_resident(&self, key: &E::Key) -> bool {
        match &self.shards {
            Some(shards) => shards.is_resident(key).await.unwrap_or(false),
            None => false,
        }
    }

    /// Whether `key` has an actor, passivating or not (false for a handle
    /// made from an address).
    #[cfg(feature = "testkit")]
    pub(crate) async fn has_actor(&self, key: &E::Key) -> bool {
        match &self.shards {
            Some(shards) => shards.has_actor(key).await.unwrap_or(false),
            None => false,
        }
    }

    /// Checks that the store's database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// The manager's address, for sending [`EntityCommand`]s yourself.
    pub fn addr(&self) -> &Addr<EntityManager<E>> {
        &self.manager
    }

    /// The store the entities persist to.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }
}

impl<E: DurableEntity> Clone for Entities<E> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
            shards: self.shards.clone(),
            store: self.store.clone(),
        }
    }
}

impl<E: DurableEntity> fmt::Debug for Entities<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entities")
            .field("entity_type", &E::ENTITY_TYPE)
            .field("store", &self.store)
            .finish()
    }
}
