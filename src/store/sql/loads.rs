//! The load path of group commit: the restores of a batch of entities
//! become one query.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::backend::SqlBackend;
use super::batch::Request;
use super::group_commit::{count_by_entity, Counters};
use crate::entity::PersistenceId;
use crate::error::StoreError;
use crate::store::rows::StoredRow;

pub(super) struct LoadRequest {
    pub(super) key: PersistenceId,
    pub(super) reply: oneshot::Sender<Result<Option<StoredRow>, StoreError>>,
}

impl Request for LoadRequest {
    /// Loads of one entity may share a batch: each gets the row.
    fn exclusive_key(&self) -> Option<&PersistenceId> {
        None
    }
}

pub(super) async fn execute_loads<B: SqlBackend>(
    backend: Arc<B>,
    batch: Vec<LoadRequest>,
    timeout: Duration,
    counters: Arc<Counters>,
) {
    let mut keys: Vec<&PersistenceId> = batch.iter().map(|r| &r.key).collect();
    keys.sort_unstable();
    keys.dedup();
    count_by_entity(
        "persist_durable_restores_total",
        keys.iter().map(|key| key.entity_type()),
    );
    // Two actors of one entity may ask at once: then each gets a copy.
    let shared_rows = keys.len() < batch.len();
    Counters::add(&counters.load_statements, 1);
    Counters::add(&counters.entities_loaded, keys.len());
    let outcome = tokio::time::timeout(timeout, backend.load_rows(&keys))
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
    match outcome {
        Ok(mut rows) => {
            for request in batch {
                let row = if shared_rows {
                    rows.get(request.key.as_str()).cloned()
                } else {
                    rows.remove(request.key.as_str())
                };
                let result = match row {
                    Some(row) => row.decode(&request.key).map(Some),
                    None => Ok(None),
                };
                let _ = request.reply.send(result);
            }
        }
        Err(error) => {
            for request in batch {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}
