use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::capability::{ChangeLog, Maintenance, Offsets, StateStore, Timers};
use super::payload::{REDACTED, TOMBSTONE};
use super::rows::{ChangeRow, FeedBounds, StoreStats, StoredRow, StoredTimer, TimerChange, WriteRow};
use super::KAFKA_POSITIONS;
use crate::entity::{PersistenceId, Revision, Slice};
use crate::error::StoreError;

/// A store in process memory, for unit tests of actor logic.
///
/// It keeps the same revision rules as the database stores, a change feed
/// when made with [`with_change_feed`](Self::with_change_feed), and can be
/// told to fail like a database that is down. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
    /// Record every committed revision in the feed.
    feed: bool,
    /// Notified when changes are committed to the feed.
    feed_signal: std::sync::Arc<tokio::sync::Notify>,
    unavailable: AtomicBool,
}

/// Everything the store holds, under one lock: a write and its feed rows
/// are one step, as in a database transaction.
#[derive(Debug, Default)]
struct Tables {
    rows: HashMap<PersistenceId, Row>,
    /// Named reader positions (`load_offset` / `save_offset`).
    offsets: HashMap<String, u64>,
    /// The change feed, in position order.
    changes: Vec<ChangeRow>,
    /// The last feed position given out.
    head: u64,
    /// Pending timers, by entity and name.
    timers: BTreeMap<(PersistenceId, String), StoredTimer>,
    stats: StoreStats,
}

#[derive(Debug)]
struct Row {
    stored: StoredRow,
    /// `db_timestamp`: when the row was last written, for retention.
    written_at: DateTime<Utc>,
}

/// What the memory store fails with while it is told to.
#[derive(Debug, thiserror::Error)]
#[error("the memory store was told to fail")]
struct ToldToFail;

impl MemoryStore {
    /// An empty store without a change feed.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that records every committed revision in its change
    /// feed, as a database store opened with
    /// [`StoreConfig::with_change_feed`](crate::StoreConfig::with_change_feed).
    pub fn with_change_feed() -> Self {
        Self {
            feed: true,
            ..Self::default()
        }
    }

    /// Makes every later load and write fail with [`StoreError::Unavailable`]
    /// (`true`) or succeed again (`false`).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// The tables, once the store is available.
    fn tables(&self) -> Result<MutexGuard<'_, Tables>, StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(ToldToFail));
        }
        Ok(self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl Tables {
    /// Erases the data of `key`'s changes so far, keeping their places.
    fn redact(&mut self, key: &PersistenceId) {
        for change in self.changes.iter_mut().filter(|change| change.key == *key) {
            change.payload = REDACTED.to_vec();
        }
    }

    /// Deletes every timer of `key`.
    fn delete_timers(&mut self, key: &PersistenceId) {
        self.timers.retain(|(id, _), _| id != key);
    }

    /// Whether `write`'s fire, if it commits one, finds its timer still due.
    fn fire_holds(&self, write: &WriteRow) -> bool {
        write.fired.as_ref().is_none_or(|fired| {
            self.timers
                .get(&(write.key.clone(), fired.name.clone()))
                .is_some_and(|timer| timer.due == fired.due)
        })
    }

    /// What a committed `write` does to its entity's timers.
    fn write_timers(&mut self, write: &WriteRow) {
        if write.erases {
            return self.delete_timers(&write.key);
        }
        if let Some(fired) = &write.fired {
            let changed_here = write.timers.iter().any(|change| change.name() == fired.name);
            let slot = (write.key.clone(), fired.name.clone());
            match (changed_here, fired.next) {
                (true, _) => {}
                (false, None) => {
                    self.timers.remove(&slot);
                }
                (false, Some(next)) => {
                    if let Some(timer) = self.timers.get_mut(&slot) {
                        timer.due = next;
                    }
                }
            }
        }
        for change in &write.timers {
            match change {
                TimerChange::Set {
                    name,
                    due,
                    schedule,
                    command,
                    missed,
                } => {
                    let timer = StoredTimer {
                        key: write.key.clone(),
                        name: name.clone(),
                        due: *due,
                        schedule: schedule.clone(),
                        command: command.clone(),
                        missed: *missed,
                    };
                    self.timers.insert((write.key.clone(), name.clone()), timer);
                }
                TimerChange::Cancel { name } => {
                    self.timers.remove(&(write.key.clone(), name.clone()));
                }
            }
        }
    }

    fn record_change(&mut self, key: &PersistenceId, revision: Revision, schema_version: u32, payload: &[u8]) {
        self.head += 1;
        let position = self.head;
        self.changes.push(ChangeRow {
            position,
            key: key.clone(),
            revision,
            schema_version,
            payload: payload.to_vec(),
            committed_at: Utc::now(),
        });
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn load_row(&self, key: &PersistenceId) -> Result<Option<StoredRow>, StoreError> {
        let mut tables = self.tables()?;
        tables.stats.load_statements += 1;
        tables.stats.entities_loaded += 1;
        Ok(tables.rows.get(key).map(|row| row.stored.clone()))
    }

    async fn write_row(&self, write: WriteRow) -> Result<Revision, StoreError> {
        write.check()?;
        let mut tables = self.tables()?;
        tables.stats.write_statements += 1;
        let (stored, generation) = tables.rows.get(&write.key).map_or((Revision::NONE, None), |row| {
            (row.stored.revision, Some(row.stored.generation))
        });
        let other_life = matches!((generation, write.generation), (Some(stored), Some(expected)) if stored != expected);
        if stored != write.expected || other_life {
            tables.stats.conflicts += 1;
            return Err(StoreError::Conflict {
                key: write.key,
                expected: write.expected,
            });
        }
        if !tables.fire_holds(&write) {
            let name = write.fired.map(|fired| fired.name).unwrap_or_default();
            return Err(StoreError::TimerGone { key: write.key, name });
        }
        tables.write_timers(&write);
        tables.stats.rows_written += 1;
        if write.erases {
            tables.redact(&write.key);
        }
        if self.feed {
            for (revision, payload) in write.changes() {
                tables.record_change(&write.key, revision, write.schema_version, payload);
            }
            self.feed_signal.notify_waiters();
        }
        let row = Row {
            stored: StoredRow {
                revision: write.revision,
                generation: generation
                    .or(write.generation)
                    .unwrap_or_else(super::rows::fresh_generation),
                schema_version: write.schema_version,
                payload: write.last_payload().to_vec(),
            },
            written_at: Utc::now(),
        };
        tables.rows.insert(write.key, row);
        Ok(write.revision)
    }

    fn keeps_change_feed(&self) -> bool {
        self.feed
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.tables().map(drop)
    }

    fn stats(&self) -> StoreStats {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .stats
    }
}

#[async_trait]
impl Offsets for MemoryStore {
    async fn load_offset(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.tables()?.offsets.get(consumer).copied())
    }

    async fn save_offset(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        self.tables()?.offsets.insert(consumer.to_owned(), position);
        Ok(())
    }

    async fn offsets_under(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .tables()?
            .offsets
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, position)| (name.clone(), *position))
            .collect())
    }

    async fn remove_offsets_below(&self, prefix: &str, below: u64) -> Result<u64, StoreError> {
        let mut tables = self.tables()?;
        let before = tables.offsets.len();
        tables
            .offsets
            .retain(|name, position| !(name.starts_with(prefix) && *position < below));
        Ok((before - tables.offsets.len()) as u64)
    }
}

#[async_trait]
impl ChangeLog for MemoryStore {
    fn feed_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.feed.then(|| self.feed_signal.clone())
    }

    async fn read_change_rows(
        &self,
        entity_type: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        if !self.feed {
            return Err(StoreError::NoChangeFeed);
        }
        let tables = self.tables()?;
        let start = tables.changes.partition_point(|change| change.position <= after);
        Ok(tables.changes[start..]
            .iter()
            .filter(|change| change.key.entity_type() == entity_type)
            .take(limit.max(1))
            .cloned()
            .collect())
    }

    async fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let tables = self.tables()?;
        let slowest_consumer = tables
            .offsets
            .iter()
            .filter(|(consumer, _)| !consumer.starts_with(KAFKA_POSITIONS))
            .map(|(_, position)| *position)
            .min();
        Ok(FeedBounds {
            head: tables.head,
            slowest_consumer,
        })
    }

    async fn trim_changes(
        &self,
        through: u64,
        committed_before: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let mut tables = self.tables()?;
        let mut left = limit.max(1);
        let before = tables.changes.len();
        tables.changes.retain(|change| {
            let trimmed = left > 0
                && change.position <= through
                && committed_before.is_none_or(|before| change.committed_at < before);
            left -= usize::from(trimmed);
            !trimmed
        });
        Ok((before - tables.changes.len()) as u64)
    }
}

#[async_trait]
impl Maintenance for MemoryStore {
    async fn purge_candidates(
        &self,
        entity_type: &str,
        written_before: DateTime<Utc>,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<(PersistenceId, Revision)>, StoreError> {
        let tables = self.tables()?;
        let mut found: Vec<(PersistenceId, Revision)> = tables
            .rows
            .iter()
            .filter(|(id, row)| {
                id.entity_type() == entity_type
                    && after.is_none_or(|after| *id > after)
                    && row.written_at < written_before
            })
            .map(|(id, row)| (id.clone(), row.stored.revision))
            .collect();
        found.sort_unstable();
        found.truncate(limit.max(1));
        Ok(found)
    }

    async fn purge_rows(
        &self,
        rows: Vec<(PersistenceId, Revision)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let mut tables = self.tables()?;
        let mut purged = Vec::new();
        for (id, revision) in rows {
            let still_idle = tables
                .rows
                .get(&id)
                .is_some_and(|row| row.stored.revision == revision && row.written_at < written_before);
            if still_idle {
                tables.rows.remove(&id);
                tables.redact(&id);
                tables.delete_timers(&id);
                if self.feed {
                    tables.record_change(&id, revision.next(), 1, TOMBSTONE);
                    self.feed_signal.notify_waiters();
                }
                purged.push(id);
            }
        }
        purged.sort_unstable();
        Ok(purged)
    }

    async fn count_entities(&self, entity_type: &str) -> Result<u64, StoreError> {
        let tables = self.tables()?;
        Ok(tables.rows.keys().filter(|id| id.entity_type() == entity_type).count() as u64)
    }

    async fn entity_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let tables = self.tables()?;
        let mut ids: Vec<PersistenceId> = tables
            .rows
            .keys()
            .filter(|id| id.entity_type() == entity_type && after.is_none_or(|after| id.as_str() > after))
            .cloned()
            .collect();
        ids.sort_unstable();
        ids.truncate(limit.max(1));
        Ok(ids)
    }
}

#[async_trait]
impl Timers for MemoryStore {
    async fn due_timers(
        &self,
        entity_type: &str,
        before: DateTime<Utc>,
        slices: Option<&[Slice]>,
        limit: usize,
    ) -> Result<Vec<StoredTimer>, StoreError> {
        let tables = self.tables()?;
        let mut due: Vec<StoredTimer> = tables
            .timers
            .values()
            .filter(|timer| timer.key.entity_type() == entity_type && timer.due < before)
            .filter(|timer| slices.is_none_or(|slices| slices.contains(&timer.key.slice())))
            .cloned()
            .collect();
        due.sort_by(|a, b| (a.due, &a.key, &a.name).cmp(&(b.due, &b.key, &b.name)));
        due.truncate(limit.max(1));
        Ok(due)
    }

    async fn timers_of(&self, key: &PersistenceId) -> Result<Vec<StoredTimer>, StoreError> {
        let tables = self.tables()?;
        Ok(tables
            .timers
            .values()
            .filter(|timer| timer.key == *key)
            .cloned()
            .collect())
    }

    async fn cancel_timer(&self, key: &PersistenceId, name: &str) -> Result<bool, StoreError> {
        let mut tables = self.tables()?;
        Ok(tables.timers.remove(&(key.clone(), name.to_owned())).is_some())
    }
}
