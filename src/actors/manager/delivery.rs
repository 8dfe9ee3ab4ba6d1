//! What a manager routes to an entity: a caller's command, or an ingest's
//! records of one partition. Both take the same way (the in-flight bound,
//! holding during a passivation or a purge, the per-entity bound), so the
//! manager routes either through one [`Delivery`].

use actix::prelude::*;
use tokio::sync::oneshot;

use super::super::entity_actor::{count_overloaded, EntityActor, Execute, ExecuteRecords, Records};
use crate::entity::{DurableEntity, EntityEvent};
use crate::error::CommandError;

/// Something the manager delivers to one entity's actor.
pub(super) trait Delivery<E: DurableEntity>: Sized + 'static {
    /// What the caller is answered.
    type Answer: 'static;

    /// The commands in it, each counted in flight.
    fn len(&self) -> usize;

    /// Sends it to `child` now (so it is queued in order) and answers with the child's reply.
    fn forward(self, key: E::Key, child: &Addr<EntityActor<E>>) -> ResponseFuture<Self::Answer>;

    /// Refused with [`CommandError::Overloaded`], counted per command.
    fn refuse(self, key: E::Key, reason: String) -> Self::Answer;

    /// Not delivered: `len` commands failing with [`CommandError::NotDelivered`].
    fn undelivered(len: usize, key: E::Key, reason: &str) -> Self::Answer;

    /// Kept for the entity's next actor, answered through `reply`.
    fn held(self, reply: oneshot::Sender<Self::Answer>) -> Held<E>;
}

/// One command of a caller.
pub(super) struct One<E: DurableEntity>(pub(super) EntityEvent<E::Command>);

/// Records of an ingest, queued together.
pub(super) struct Batch<E: DurableEntity>(pub(super) Records<E>);

/// A delivery waiting for the entity's next actor.
pub(super) enum Held<E: DurableEntity> {
    One(One<E>, oneshot::Sender<Result<E, CommandError<E>>>),
    Batch(Batch<E>, oneshot::Sender<Vec<Result<E, CommandError<E>>>>),
}

impl<E: DurableEntity> Held<E> {
    /// The commands it holds.
    pub(super) fn len(&self) -> usize {
        match self {
            Held::One(..) => 1,
            Held::Batch(batch, _) => batch.0.len(),
        }
    }

    /// Forwards it to `successor` now, in order, and the reply to its caller later.
    pub(super) fn forward_to(self, key: E::Key, successor: &Addr<EntityActor<E>>) {
        fn relay<T: 'static>(answer: ResponseFuture<T>, reply: oneshot::Sender<T>) {
            actix::spawn(async move {
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(answer.await);
            });
        }
        match self {
            Held::One(one, reply) => relay(one.forward(key, successor), reply),
            Held::Batch(batch, reply) => relay(batch.forward(key, successor), reply),
        }
    }
}

fn not_delivered<E: DurableEntity>(key: E::Key, reason: impl Into<String>) -> CommandError<E> {
    CommandError::NotDelivered {
        key,
        reason: reason.into(),
    }
}

impl<E: DurableEntity> Delivery<E> for One<E> {
    type Answer = Result<E, CommandError<E>>;

    fn len(&self) -> usize {
        1
    }

    fn forward(self, key: E::Key, child: &Addr<EntityActor<E>>) -> ResponseFuture<Self::Answer> {
        // `send` queues the message now, in order; only the reply is awaited.
        let request = child.send(Execute(self.0));
        Box::pin(async move {
            request
                .await
                .unwrap_or_else(|error| Err(not_delivered(key, error.to_string())))
        })
    }

    fn refuse(self, key: E::Key, reason: String) -> Self::Answer {
        count_overloaded::<E>(&self.0);
        Err(CommandError::Overloaded { key, reason })
    }

    fn undelivered(_len: usize, key: E::Key, reason: &str) -> Self::Answer {
        Err(not_delivered(key, reason))
    }

    fn held(self, reply: oneshot::Sender<Self::Answer>) -> Held<E> {
        Held::One(self, reply)
    }
}

impl<E: DurableEntity> Delivery<E> for Batch<E> {
    type Answer = Vec<Result<E, CommandError<E>>>;

    fn len(&self) -> usize {
        self.0.len()
    }

    fn forward(self, key: E::Key, child: &Addr<EntityActor<E>>) -> ResponseFuture<Self::Answer> {
        let len = self.0.len();
        let request = child.send(ExecuteRecords(self.0));
        Box::pin(async move {
            request
                .await
                .unwrap_or_else(|error| Self::undelivered(len, key, &error.to_string()))
        })
    }

    fn refuse(self, key: E::Key, reason: String) -> Self::Answer {
        self.0
            .iter()
            .map(|(event, _)| {
                count_overloaded::<E>(event);
                Err(CommandError::Overloaded {
                    key: key.clone(),
                    reason: reason.clone(),
                })
            })
            .collect()
    }

    fn undelivered(len: usize, key: E::Key, reason: &str) -> Self::Answer {
        (0..len).map(|_| Err(not_delivered(key.clone(), reason))).collect()
    }

    fn held(self, reply: oneshot::Sender<Self::Answer>) -> Held<E> {
        Held::Batch(self, reply)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{EntityCommand, EntityManager, EntityRecords};
    use crate::domain::{Command, ProductId, UserKey, UserState};
    use crate::entity::{EntityEvent, RecordOrigin};
    use crate::error::CommandError;
    use crate::store::{MemoryStore, SharedStore};
    use crate::Config;
    use actix::Actor;

    fn view(product: &str, offset: i64) -> (EntityEvent<Command>, RecordOrigin) {
        let command = Command::ViewProduct {
            product_id: ProductId::new(product).unwrap(),
        };
        let origin = RecordOrigin {
            partition: "views/0".into(),
            offset,
        };
        (command.into(), origin)
    }

    fn records(key: &UserKey, records: Vec<(EntityEvent<Command>, RecordOrigin)>) -> EntityRecords<UserState> {
        EntityRecords {
            key: key.clone(),
            records,
        }
    }

    /// A manager of users on a memory store, and the store.
    fn users() -> (
        actix::Addr<EntityManager<UserState>>,
        Arc<MemoryStore>,
        SharedStore,
        UserKey,
    ) {
        let memory = Arc::new(MemoryStore::new());
        let store: SharedStore = memory.clone();
        let manager = EntityManager::<UserState>::new(store.clone(), Config::default()).start();
        (manager, memory, store, UserKey::new("m", "u").unwrap())
    }

    async fn recent_products(store: &SharedStore, key: &UserKey) -> Vec<String> {
        let stored = store.load(key).await.unwrap().unwrap();
        stored
            .state
            .recent_products
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect()
    }

    #[actix_rt::test]
    async fn a_redelivered_record_is_acknowledged_and_not_applied_again() {
        let (manager, _, store, key) = users();
        let first = manager
            .send(records(&key, vec![view("p1", 0), view("p2", 1)]))
            .await
            .unwrap();
        assert!(first.iter().all(Result::is_ok), "{first:?}");

        // Both again, behind them a new one: only the new one applies.
        let again = manager
            .send(records(&key, vec![view("p1", 0), view("p2", 1), view("p3", 2)]))
            .await
            .unwrap();
        assert!(again.iter().all(Result::is_ok), "{again:?}");
        let stored = store.load(&key).await.unwrap().unwrap();
        assert_eq!(stored.revision.0, 3, "one revision per record applied once");
        assert_eq!(
            stored.source_offsets["views/0"], 2,
            "the last offset applied is stored with the state"
        );
        assert_eq!(recent_products(&store, &key).await, ["p3", "p2", "p1"]);
    }

    #[actix_rt::test]
    async fn records_of_a_failed_write_fail_together_and_apply_in_order_when_sent_again() {
        let (manager, memory, store, key) = users();
        let batch = vec![view("p1", 0), view("p2", 1), view("p3", 2)];
        // Restored first, so that the outage hits the write.
        let restored = manager
            .send(EntityCommand::new(key.clone(), Command::GetUserState))
            .await
            .unwrap();
        assert!(restored.is_ok());
        memory.set_unavailable(true);
        let failed = manager.send(records(&key, batch.clone())).await.unwrap();
        assert!(
            failed
                .iter()
                .all(|r| matches!(r, Err(CommandError::StoreUnavailable { .. }))),
            "{failed:?}"
        );
        memory.set_unavailable(false);
        let applied = manager.send(records(&key, batch)).await.unwrap();
        assert!(applied.iter().all(Result::is_ok), "{applied:?}");
        let stored = store.load(&key).await.unwrap().unwrap();
        assert_eq!(stored.revision.0, 3);
        assert_eq!(recent_products(&store, &key).await, ["p3", "p2", "p1"]);
    }
}
