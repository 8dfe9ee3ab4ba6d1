//! What a shard routes to an entity: a caller's command, or an ingest's
//! records of one partition, each with the reply its caller waits on. Both
//! take the same way (the in-flight bound, holding during a passivation or a
//! purge, the per-entity bound), so the shard routes either through one
//! [`Delivery`].

use actix::prelude::*;

use super::super::entity_actor::{count_overloaded, Answer, Deliver, EntityActor, ExecuteRecords, Records};
use super::super::protocol::{InFlight, ReplyTo};
use super::super::round::Work;
use crate::entity::DurableEntity;
use crate::error::CommandError;

/// Something a shard delivers to one entity's actor.
pub(super) trait Delivery<E: DurableEntity>: Sized + 'static {
    /// The commands in it, each counted in flight.
    fn len(&self) -> usize;

    /// The same delivery, counted in flight until answered.
    fn holding(self, slot: InFlight) -> Self;

    /// Queues it at `child` now, in order; the child answers the caller.
    /// A child that has stopped (`None`) drops it, and the caller hears
    /// [`CommandError::NotDelivered`].
    fn forward(self, child: Option<Addr<EntityActor<E>>>);

    /// Answers [`CommandError::Overloaded`], counted per command.
    fn refuse(self, key: E::Key, reason: String);

    /// Kept for the entity's next actor.
    fn held(self) -> Held<E>;
}

/// One command of a caller, or one timer's fire.
pub(crate) struct One<E: DurableEntity> {
    pub(crate) work: Work<E::Command>,
    pub(crate) reply: ReplyTo<Answer<E>>,
}

/// Records of an ingest, queued together.
pub(super) struct Batch<E: DurableEntity> {
    pub(super) records: Records<E>,
    pub(super) reply: ReplyTo<Vec<Answer<E>>>,
}

/// A delivery waiting for the entity's next actor.
pub(super) enum Held<E: DurableEntity> {
    One(One<E>),
    Batch(Batch<E>),
}

impl<E: DurableEntity> Held<E> {
    /// The commands it holds.
    pub(super) fn len(&self) -> usize {
        match self {
            Held::One(one) => one.len(),
            Held::Batch(batch) => batch.len(),
        }
    }

    /// Queues it at `successor` now, in order.
    pub(super) fn forward_to(self, successor: Option<Addr<EntityActor<E>>>) {
        match self {
            Held::One(one) => one.forward(successor),
            Held::Batch(batch) => batch.forward(successor),
        }
    }
}

impl<E: DurableEntity> Delivery<E> for One<E> {
    fn len(&self) -> usize {
        1
    }

    fn holding(self, slot: InFlight) -> Self {
        Self {
            work: self.work,
            reply: self.reply.holding(slot),
        }
    }

    fn forward(self, child: Option<Addr<EntityActor<E>>>) {
        // Unbounded mailbox: queued now. If it is closed, the reply is
        // dropped with the message and the caller hears `NotDelivered`.
        let Some(child) = child else { return };
        child.do_send(Deliver {
            work: self.work,
            reply: self.reply,
        });
    }

    fn refuse(self, key: E::Key, reason: String) {
        count_overloaded::<E>(&self.work);
        self.reply.send(Err(CommandError::Overloaded { key, reason }));
    }

    fn held(self) -> Held<E> {
        Held::One(self)
    }
}

impl<E: DurableEntity> Delivery<E> for Batch<E> {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn holding(self, slot: InFlight) -> Self {
        Self {
            records: self.records,
            reply: self.reply.holding(slot),
        }
    }

    fn forward(self, child: Option<Addr<EntityActor<E>>>) {
        let Some(child) = child else { return };
        child.do_send(ExecuteRecords {
            records: self.records,
            reply: self.reply,
        });
    }

    fn refuse(self, key: E::Key, reason: String) {
        let refused = self
            .records
            .iter()
            .map(|(event, _)| {
                count_overloaded::<E>(&Work::Command(event.clone()));
                Err(CommandError::Overloaded {
                    key: key.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        self.reply.send(refused);
    }

    fn held(self) -> Held<E> {
        Held::Batch(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::actors::manager::EntityManager;
    use crate::actors::messages::{EntityCommand, EntityRecords};
    use crate::domain::{Command, ProductId, UserKey, UserState};
    use crate::entity::{EntityEvent, RecordOrigin};
    use crate::error::CommandError;
    use crate::store::{MemoryStore, SharedStore, StateStoreExt};
    use crate::Config;
    use actix::Actor;

    fn view(product: &str, offset: i64) -> (EntityEvent<Command>, RecordOrigin) {
        let command = Command::ViewProduct {
            product_id: ProductId::new(product).unwrap(),
        };
        let origin = RecordOrigin::new("views/0".into(), offset);
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

    fn origin(offset: i64) -> RecordOrigin {
        RecordOrigin::new("events/0".into(), offset)
    }

    /// Before, a late, duplicate or refused record after a delete wrote a
    /// revision with `deleted = false`, and the feed showed an `Updated`
    /// default state right after `Deleted`: downstream, a blank new user.
    #[actix_rt::test]
    async fn after_a_delete_records_that_change_nothing_keep_the_entity_deleted() {
        use crate::feed::{ChangeKind, EntityFeed};
        use crate::{Event, EventId};
        let store: SharedStore = Arc::new(MemoryStore::with_change_feed());
        let manager = EntityManager::<UserState>::new(store.clone(), Config::default()).start();
        let key = UserKey::new("m", "u").unwrap();
        let viewed = Event::from(Command::ViewProduct {
            product_id: ProductId::new("p1").unwrap(),
        })
        .with_id(EventId::new("e1").unwrap());
        let applied = manager
            .send(records(&key, vec![(viewed.clone(), origin(0))]))
            .await
            .unwrap();
        assert!(applied[0].is_ok());
        manager
            .send(EntityCommand::new(key.clone(), Command::DeleteUser))
            .await
            .unwrap()
            .unwrap();

        // A redelivery under a new offset (the same event id), and a record
        // from before the erasure (late).
        let late = Event::from(Command::UserLogin).at(chrono::DateTime::UNIX_EPOCH);
        let answers = manager
            .send(records(&key, vec![(viewed, origin(1)), (late, origin(2))]))
            .await
            .unwrap();

        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        let stored = store.load(&key).await.unwrap().unwrap();
        assert!(stored.deleted, "still a tombstone: {stored:?}");
        assert_eq!(stored.source_offsets["events/0"], 2, "the records are noted");
        let changes = EntityFeed::<UserState>::from_position(store.clone(), 0)
            .next_batch()
            .await
            .unwrap();
        let kinds: Vec<ChangeKind> = changes.iter().map(|change| change.kind).collect();
        assert_eq!(
            kinds,
            [
                ChangeKind::Redacted,
                ChangeKind::Deleted,
                ChangeKind::Deleted,
                ChangeKind::Deleted
            ],
            "nothing after the deletion looks like a new entity"
        );
    }

    /// Before, a refused record's offset was noted like an applied one's:
    /// read again (its dead letter never written, after a crash), it was
    /// taken for applied and went nowhere.
    #[actix_rt::test]
    async fn a_refused_record_read_again_is_refused_again_never_taken_for_applied() {
        use crate::cart::{Cart, CartCommand, CartId};
        let store: SharedStore = Arc::new(MemoryStore::new());
        let manager = EntityManager::<Cart>::new(store.clone(), Config::default()).start();
        let cart = CartId::new("c").unwrap();
        let add = CartCommand::AddItem {
            sku: "a".into(),
            quantity: 1,
        };
        let batch = vec![(CartCommand::Checkout.into(), origin(0)), (add.into(), origin(1))];
        let first = manager
            .send(EntityRecords {
                key: cart.clone(),
                records: batch.clone(),
            })
            .await
            .unwrap();
        assert!(matches!(first[0], Err(CommandError::Rejected { .. })), "{first:?}");
        assert!(first[1].is_ok());

        let again = manager
            .send(EntityRecords {
                key: cart.clone(),
                records: batch,
            })
            .await
            .unwrap();

        assert!(
            matches!(&again[0], Err(error @ CommandError::RefusedBefore { reason, .. })
                if reason.contains("empty") && !error.is_retryable()),
            "{again:?}"
        );
        assert_eq!(again[1].as_ref().unwrap().items.len(), 1, "applied once, not twice");
        assert_eq!(store.load(&cart).await.unwrap().unwrap().revision.0, 2);
    }
}
