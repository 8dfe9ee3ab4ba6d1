use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{persistence_id, Revision, StateStore, StoreStats, StoredState};
use crate::domain::{UserKey, UserState};
use crate::error::StoreError;

/// A store in process memory, for unit tests of actor logic.
///
/// It keeps the same revision rules as the database stores, and can be told
/// to fail like a database that is down. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rows: Mutex<HashMap<String, StoredState>>,
    unavailable: AtomicBool,
    stats: Mutex<StoreStats>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every later load and write fail with [`StoreError::Unavailable`]
    /// (`true`) or succeed again (`false`).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    fn check_available(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("the memory store was told to fail".into()))
        } else {
            Ok(())
        }
    }

    fn count(&self, update: impl FnOnce(&mut StoreStats)) {
        update(&mut self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoredState>> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn load(&self, key: &UserKey) -> Result<Option<StoredState>, StoreError> {
        self.check_available()?;
        self.count(|stats| {
            stats.load_statements += 1;
            stats.users_loaded += 1;
        });
        Ok(self.rows().get(&persistence_id(key)).cloned())
    }

    async fn write(
        &self,
        key: &UserKey,
        expected: Revision,
        revision: Revision,
        state: &UserState,
    ) -> Result<Revision, StoreError> {
        self.check_available()?;
        let mut rows = self.rows();
        let id = persistence_id(key);
        let stored = rows.get(&id).map_or(Revision::NONE, |row| row.revision);
        self.count(|stats| stats.write_statements += 1);
        if stored != expected {
            self.count(|stats| stats.conflicts += 1);
            return Err(StoreError::Conflict {
                key: key.clone(),
                expected,
            });
        }
        self.count(|stats| stats.rows_written += 1);
        rows.insert(
            id,
            StoredState {
                revision,
                state: state.clone(),
            },
        );
        Ok(revision)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check_available()
    }

    fn stats(&self) -> StoreStats {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
