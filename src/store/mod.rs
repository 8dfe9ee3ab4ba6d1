//! Durable storage of user states behind one trait, [`StateStore`], with a
//! backend per database.
//!
//! Rows follow Pekko's `durable_state` table: one row per user, keyed by a
//! persistence id, with a revision that every write must name. A write that
//! finds another revision fails with [`StoreError::Conflict`] instead of
//! overwriting.
//!
//! The database backends run every query on a small runtime of their own
//! ([`DbRuntime`]), not on the caller's. That keeps diesel-async's blocking
//! calls off actix's single-threaded runtime, lets a write in flight finish
//! even if the actor that asked for it stops, and keeps database timeouts on
//! real time even when a test pauses tokio's clock.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

mod config;
mod group_commit;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod row;
mod runtime;
#[cfg(feature = "sqlite")]
mod sqlite;

/// Implements [`StateStore`] for a SQL store by handing every call to its
/// `group_commit` field: the stores differ in their SQL, not in this.
macro_rules! delegate_to_group_commit {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::StateStore for $store {
            async fn load(
                &self,
                key: &$crate::UserKey,
            ) -> Result<Option<$crate::store::StoredState>, $crate::StoreError> {
                self.group_commit.load_state(key).await
            }

            async fn write(
                &self,
                key: &$crate::UserKey,
                expected: $crate::store::Revision,
                revision: $crate::store::Revision,
                state: &$crate::UserState,
            ) -> Result<$crate::store::Revision, $crate::StoreError> {
                self.group_commit
                    .write_state(key, expected, revision, state)
                    .await
            }

            async fn write_changes(
                &self,
                key: &$crate::UserKey,
                expected: $crate::store::Revision,
                states: &[$crate::UserState],
            ) -> Result<$crate::store::Revision, $crate::StoreError> {
                self.group_commit.write_states(key, expected, states).await
            }

            async fn ping(&self) -> Result<(), $crate::StoreError> {
                self.group_commit.ping().await
            }

            fn stats(&self) -> $crate::store::StoreStats {
                self.group_commit.stats()
            }

            async fn read_changes(
                &self,
                after: u64,
                limit: usize,
            ) -> Result<Vec<$crate::store::StateChange>, $crate::StoreError> {
                self.group_commit.read_changes(after, limit).await
            }

            async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, $crate::StoreError> {
                self.group_commit.load_offset(consumer).await
            }

            async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), $crate::StoreError> {
                self.group_commit.save_offset(consumer, position).await
            }
        }
    };
}
pub(crate) use delegate_to_group_commit;

pub use config::StoreConfig;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use row::{JSON_SERIALIZER_ID, STATE_MANIFEST};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// The version of a user's stored state: how many writes it has had.
/// [`Revision::NONE`] means nothing is stored yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl Revision {
    /// No state stored yet.
    pub const NONE: Revision = Revision(0);

    /// The revision a write based on this one produces.
    pub fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A user's state as committed, with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    /// The committed revision.
    pub revision: Revision,
    /// The committed state.
    pub state: UserState,
}

impl StoredState {
    /// What a user never seen before has: the default state at [`Revision::NONE`].
    pub fn initial() -> Self {
        Self {
            revision: Revision::NONE,
            state: UserState::default(),
        }
    }
}

/// Durable storage of user states with revision-checked writes.
///
/// Implementations must make `write` atomic and conditional: it succeeds only
/// if the stored revision is still `expected`.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug + 'static {
    /// The user's committed state, or `None` for a user never written.
    async fn load(&self, key: &UserKey) -> Result<Option<StoredState>, StoreError>;

    /// Stores `state` as `revision` if the stored revision is `expected`
    /// ([`Revision::NONE`]: no row yet); otherwise fails with
    /// [`StoreError::Conflict`] and changes nothing.
    ///
    /// `revision` is `expected` plus the number of commands the state
    /// reflects: an actor that coalesces several commands into one write
    /// still counts each of them. With the change feed on, only `revision`
    /// itself is recorded; [`write_changes`](Self::write_changes), which the
    /// actors use, records every revision.
    async fn write(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        state: &UserState,
    ) -> Result<Revision, StoreError>;

    /// Writes the states after each of several commands as revisions
    /// `expected + 1 ..= expected + states.len()`: the row keeps the last,
    /// the change feed (when the store keeps one) gets every one. Fails like
    /// [`write`](Self::write) and then records nothing.
    ///
    /// The default writes the last state only: a store without a change feed.
    async fn write_changes(
        &self,
        key: &UserKey,
        expected: Revision,
        states: &[UserState],
    ) -> Result<Revision, StoreError> {
        let last = states
            .last()
            .ok_or_else(|| StoreError::Setup("write_changes needs at least one state".into()))?;
        self.write(key, expected, Revision(expected.0 + states.len() as u64), last)
            .await
    }

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What the store has done since it was opened.
    fn stats(&self) -> StoreStats;

    /// Up to `limit` committed changes after feed position `after` (0: from
    /// the start), in position order. See [`ChangeFeed`](crate::ChangeFeed).
    async fn read_changes(&self, after: u64, limit: usize) -> Result<Vec<StateChange>, StoreError> {
        let _ = (after, limit);
        Err(no_change_feed())
    }

    /// The feed position `consumer` saved last, if any.
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        let _ = consumer;
        Err(no_change_feed())
    }

    /// Saves the feed position `consumer` has processed up to, inclusive.
    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let _ = (consumer, position);
        Err(no_change_feed())
    }
}

pub(crate) fn no_change_feed() -> StoreError {
    StoreError::Setup("this store keeps no change feed; open it with StoreConfig::with_change_feed(true)".into())
}

/// One committed revision of a user's state, as the change feed delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Where the change stands in the feed: gapless, in commit order.
    pub position: u64,
    /// The user.
    pub key: UserKey,
    /// The revision this state was committed as.
    pub revision: Revision,
    /// The state at that revision.
    pub state: UserState,
    /// When the writing transaction ran, by the database's clock.
    pub committed_at: chrono::DateTime<chrono::Utc>,
}

/// Counters of a store: how well group commit and bulk restore are batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Write statements (batches) executed.
    pub write_statements: u64,
    /// Rows those statements wrote (conflicts excluded).
    pub rows_written: u64,
    /// Rows refused because their revision had moved on.
    pub conflicts: u64,
    /// Load statements (batches) executed.
    pub load_statements: u64,
    /// Users those statements looked up.
    pub users_loaded: u64,
}

/// A shared, type-erased store, as the actors hold it.
pub type SharedStore = Arc<dyn StateStore>;

/// The `entity_type` column of every row this crate writes.
pub const ENTITY_TYPE: &str = "UserState";

/// The row key of a user: `UserState|<mall>-<user>`, Pekko's
/// `EntityType|entityId` form.
///
/// `%` and `-` inside the ids are percent-escaped, so the encoding is
/// injective: `("a-b", "c")` becomes `UserState|a%2Db-c` and `("a", "b-c")`
/// becomes `UserState|a-b%2Dc`. Ordinary ids read exactly as in the original.
pub fn persistence_id(key: &UserKey) -> String {
    fn escape(id: &str, out: &mut String) {
        for c in id.chars() {
            match c {
                '%' => out.push_str("%25"),
                '-' => out.push_str("%2D"),
                c => out.push(c),
            }
        }
    }
    let mut id = String::with_capacity(ENTITY_TYPE.len() + key.mall_id().len() + key.user_id().len() + 2);
    id.push_str(ENTITY_TYPE);
    id.push('|');
    escape(key.mall_id(), &mut id);
    id.push('-');
    escape(key.user_id(), &mut id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_keep_the_mall_dash_user_form() {
        let key = UserKey::new("mall001", "user001").unwrap();
        assert_eq!(persistence_id(&key), "UserState|mall001-user001");
    }

    #[test]
    fn dashes_and_percents_cannot_make_two_keys_collide() {
        let pairs = [
            (("a-b", "c"), ("a", "b-c")),
            (("a%2Db", "c"), ("a-b", "c")),
            (("a", "b%2Dc"), ("a", "b-c")),
            (("a-", "b"), ("a", "-b")),
        ];
        for ((m1, u1), (m2, u2)) in pairs {
            let left = persistence_id(&UserKey::new(m1, u1).unwrap());
            let right = persistence_id(&UserKey::new(m2, u2).unwrap());
            assert_ne!(left, right, "{m1}/{u1} vs {m2}/{u2}");
        }
    }
}
