use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{StateStore, StoreStats, StoredRow, WriteRow};
use crate::entity::{PersistenceId, Revision};
use crate::error::StoreError;

/// A store in process memory, for unit tests of actor logic.
///
/// It keeps the same revision rules as the database stores, and can be told
/// to fail like a database that is down. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rows: Mutex<HashMap<PersistenceId, StoredRow>>,
    /// When each row was last written (`db_timestamp`), for retention.
    written_at: Mutex<HashMap<PersistenceId, chrono::DateTime<chrono::Utc>>>,
    /// Named reader positions (`load_offset` / `save_offset`).
    offsets: Mutex<HashMap<String, u64>>,
    unavailable: AtomicBool,
    stats: Mutex<StoreStats>,
}

/// What the memory store fails with while it is told to.
#[derive(Debug, thiserror::Error)]
#[error("the memory store was told to fail")]
struct ToldToFail;

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
            Err(StoreError::unavailable(ToldToFail))
        } else {
            Ok(())
        }
    }

    fn record(&self, update: impl FnOnce(&mut StoreStats)) {
        update(&mut self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<PersistenceId, StoredRow>> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

super::typed_access!(MemoryStore);

#[async_trait]
impl StateStore for MemoryStore {
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        self.check_available()?;
        self.record(|stats| {
            stats.load_statements += 1;
            stats.users_loaded += 1;
        });
        Ok(self.rows().get(key).cloned())
    }

    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        write.check()?;
        self.check_available()?;
        let mut rows = self.rows();
        let stored = rows.get(&write.key).map_or(Revision::NONE, |row| row.revision);
        self.record(|stats| stats.write_statements += 1);
        if stored != write.expected {
            self.record(|stats| stats.conflicts += 1);
            return Err(StoreError::Conflict {
                key: write.key,
                expected: write.expected,
            });
        }
        self.record(|stats| stats.rows_written += 1);
        let payload = write.payloads.into_iter().last().unwrap_or_default();
        lock(&self.written_at).insert(write.key.clone(), chrono::Utc::now());
        rows.insert(
            write.key,
            StoredRow {
                revision: write.revision,
                schema_version: write.schema_version,
                payload,
            },
        );
        Ok(write.revision)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check_available()
    }

    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        self.check_available()?;
        Ok(self
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(consumer)
            .copied())
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        self.check_available()?;
        self.offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(consumer.to_owned(), position);
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: chrono::DateTime<chrono::Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        self.check_available()?;
        let rows = self.rows();
        let written_at = lock(&self.written_at);
        let mut found: Vec<(PersistenceId, Revision)> = rows
            .iter()
            .filter(|(id, _)| id.entity_type() == entity_type && after.is_none_or(|after| *id > after))
            .filter(|(id, _)| written_at.get(*id).is_some_and(|at| *at < written_before))
            .map(|(id, row)| (id.clone(), row.revision))
            .collect();
        found.sort_unstable();
        found.truncate(limit.max(1));
        Ok(found)
    }

    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        self.check_available()?;
        let mut stored = self.rows();
        let mut written_at = lock(&self.written_at);
        let mut purged = Vec::new();
        for (id, revision) in rows {
            let still_idle = stored.get(&id).is_some_and(|row| row.revision == revision)
                && written_at.get(&id).is_some_and(|at| *at < written_before);
            if still_idle {
                stored.remove(&id);
                written_at.remove(&id);
                purged.push(id);
            }
        }
        purged.sort_unstable();
        Ok(purged)
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        self.check_available()?;
        Ok(self.rows().keys().filter(|id| id.entity_type() == entity_type).count() as u64)
    }

    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        self.check_available()?;
        let mut ids: Vec<PersistenceId> = self
            .rows()
            .keys()
            .filter(|id| id.entity_type() == entity_type && after.is_none_or(|after| id.as_str() > after))
            .cloned()
            .collect();
        ids.sort_unstable();
        ids.truncate(limit.max(1));
        Ok(ids)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
