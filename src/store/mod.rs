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
    /// still counts each of them.
    async fn write(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        state: &UserState,
    ) -> Result<Revision, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What the store has done since it was opened.
    fn stats(&self) -> StoreStats;
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
