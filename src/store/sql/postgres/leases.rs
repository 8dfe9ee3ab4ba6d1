//! Cluster mode's statements on PostgreSQL ([`Leases`]): the nodes' lease
//! rows, the slices' ownership rows and the named leases, each changed by
//! compare-and-set with the database's clock deciding every expiry.

use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{PostgresBackend, PostgresStore};
use chrono::{DateTime, Utc};

use crate::entity::{PersistenceId, Revision, Slice, SLICES};
use crate::error::StoreError;
use crate::store::capability::{ClusterView, JoinedNode, Leases, NodeRow};
use crate::store::sql::backend::bigint;
use crate::store::Fence;

use super::writer::sent_write_error;

/// A duration as the milliseconds the statements add to `now()`.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresBackend {
    /// Runs `sql` with `binds` on a connection of its own (the writers').
    async fn lease_statement(
        &self,
        sql: &'static str,
        binds: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut conn = self.writers.get().await.map_err(StoreError::unavailable)?;
        let statement = conn.statement(sql).await.map_err(sent_write_error)?;
        conn.client().query(&statement, binds).await.map_err(sent_write_error)
    }
}

/// A slice's epoch as the column holds it.
fn epoch(row: &Row, column: usize) -> u64 {
    u64::try_from(row.get::<_, i64>(column)).unwrap_or(0)
}

#[async_trait]
impl Leases for PostgresStore {
    async fn join(&self, node: &str, address: &str, ttl: Duration) -> Result<(), StoreError> {
        let (node, address) = (node.to_owned(), address.to_owned());
        self.run_write(move |backend| async move {
            // One statement, one transaction: registered, and every epoch of
            // what a previous process of this name held moved on (waiting
            // for its fenced writes in flight).
            backend
                .lease_statement(
                    "WITH registered AS (
                        INSERT INTO cluster_nodes (node_id, address, lease_expires, joined_at, leaving)
                        VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond', now(), false)
                        ON CONFLICT (node_id) DO UPDATE SET address = EXCLUDED.address,
                            lease_expires = EXCLUDED.lease_expires, joined_at = now(), leaving = false
                        RETURNING node_id
                    ), slices AS (
                        UPDATE cluster_slices SET epoch = epoch + 1 WHERE owner = $1 RETURNING slice
                    ), named AS (
                        UPDATE cluster_leases SET epoch = epoch + 1 WHERE holder = $1 RETURNING name
                    )
                    SELECT (SELECT count(*) FROM registered), (SELECT count(*) FROM slices), (SELECT count(*) FROM named)",
                    &[&node, &address, &millis(ttl)],
                )
                .await
                .map(drop)
        })
        .await
    }

    async fn renew(&self, node: &str, ttl: Duration) -> Result<bool, StoreError> {
        let node = node.to_owned();
        self.run_write(move |backend| async move {
            let renewed = backend
                .lease_statement(
                    "UPDATE cluster_nodes SET lease_expires = now() + $2::bigint * interval '1 millisecond'
                     WHERE node_id = $1 AND lease_expires > now() RETURNING node_id",
                    &[&node, &millis(ttl)],
                )
                .await?;
            Ok(!renewed.is_empty())
        })
        .await
    }

    async fn view(&self) -> Result<ClusterView, StoreError> {
        self.run(|backend| async move {
            let nodes = backend
                .lease_statement(
                    "SELECT node_id, address, lease_expires > now(), leaving FROM cluster_nodes ORDER BY node_id",
                    &[],
                )
                .await?
                .iter()
                .map(|row| NodeRow {
                    node: row.get(0),
                    address: row.get(1),
                    alive: row.get(2),
                    leaving: row.get(3),
                })
                .collect();
            let rows = backend
                .lease_statement("SELECT slice, owner, epoch FROM cluster_slices ORDER BY slice", &[])
                .await?;
            let mut slices = vec![(None, 0); usize::from(SLICES)];
            for row in &rows {
                if let Some(slot) = usize::try_from(row.get::<_, i32>(0))
                    .ok()
                    .and_then(|i| slices.get_mut(i))
                {
                    *slot = (row.get::<_, Option<String>>(1), epoch(row, 2));
                }
            }
            Ok(ClusterView { nodes, slices })
        })
        .await
    }

    async fn acquire(&self, node: &str, slices: &[Slice]) -> Result<Vec<(Slice, u64)>, StoreError> {
        let node = node.to_owned();
        let slices: Vec<i32> = slices.iter().map(|slice| i32::from(slice.index())).collect();
        self.run_write(move |backend| async move {
            let taken = backend
                .lease_statement(
                    "UPDATE cluster_slices SET owner = $1, epoch = epoch + 1
                     WHERE slice = ANY($2::integer[])
                       AND (owner IS NULL OR owner NOT IN (SELECT node_id FROM cluster_nodes WHERE lease_expires > now()))
                     RETURNING slice, epoch",
                    &[&node, &slices],
                )
                .await?;
            Ok(taken
                .iter()
                .filter_map(|row| {
                    let slice = u16::try_from(row.get::<_, i32>(0)).ok().and_then(Slice::new)?;
                    Some((slice, epoch(row, 1)))
                })
                .collect())
        })
        .await
    }

    async fn transfer(
        &self,
        node: &str,
        moves: &[(Slice, u64, Option<String>)],
    ) -> Result<Vec<(Slice, u64)>, StoreError> {
        let node = node.to_owned();
        let slices: Vec<i32> = moves.iter().map(|(slice, _, _)| i32::from(slice.index())).collect();
        let held: Vec<i64> = moves
            .iter()
            .map(|(_, held, _)| bigint(*held))
            .collect::<Result<_, _>>()?;
        let to: Vec<Option<String>> = moves.iter().map(|(_, _, to)| to.clone()).collect();
        self.run_write(move |backend| async move {
            // Locked in slice order, as the writes' fences take their share
            // locks: a transfer and a write never wait for each other in a circle.
            let moved = backend
                .lease_statement(
                    "WITH moves AS (
                         SELECT * FROM unnest($2::integer[], $3::bigint[], $4::text[]) AS m(slice, held, to_node)
                     ), locked AS (
                         SELECT s.slice, m.to_node
                         FROM cluster_slices AS s JOIN moves AS m ON m.slice = s.slice
                         WHERE s.owner = $1 AND s.epoch = m.held
                         ORDER BY s.slice
                         FOR UPDATE OF s
                     )
                     UPDATE cluster_slices AS s SET owner = l.to_node, epoch = s.epoch + 1
                     FROM locked AS l WHERE s.slice = l.slice
                     RETURNING s.slice, s.epoch",
                    &[&node, &slices, &held, &to],
                )
                .await?;
            Ok(moved
                .iter()
                .filter_map(|row| {
                    let slice = u16::try_from(row.get::<_, i32>(0)).ok().and_then(Slice::new)?;
                    Some((slice, epoch(row, 1)))
                })
                .collect())
        })
        .await
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.run_write(move |backend| async move {
            backend
                .lease_statement("UPDATE cluster_nodes SET leaving = true WHERE node_id = $1", &[&node])
                .await
                .map(drop)
        })
        .await
    }

    async fn deregister(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.run_write(move |backend| async move {
            backend
                .lease_statement("DELETE FROM cluster_nodes WHERE node_id = $1", &[&node])
                .await
                .map(drop)
        })
        .await
    }

    async fn acquire_named(&self, name: &str, node: &str) -> Result<Option<u64>, StoreError> {
        let (name, node) = (name.to_owned(), node.to_owned());
        self.run_write(move |backend| async move {
            let taken = backend
                .lease_statement(
                    "INSERT INTO cluster_leases AS l (name, holder, epoch) VALUES ($1, $2, 1)
                     ON CONFLICT (name) DO UPDATE SET holder = $2, epoch = l.epoch + 1
                     WHERE l.holder IS NULL OR l.holder = $2
                        OR l.holder NOT IN (SELECT node_id FROM cluster_nodes WHERE lease_expires > now())
                     RETURNING epoch",
                    &[&name, &node],
                )
                .await?;
            Ok(taken.first().map(|row| epoch(row, 0)))
        })
        .await
    }

    async fn release_named(&self, name: &str, node: &str, epoch_held: u64) -> Result<(), StoreError> {
        let (name, node, held) = (name.to_owned(), node.to_owned(), bigint(epoch_held)?);
        self.run_write(move |backend| async move {
            backend
                .lease_statement(
                    "UPDATE cluster_leases SET holder = NULL WHERE name = $1 AND holder = $2 AND epoch = $3",
                    &[&name, &node, &held],
                )
                .await
                .map(drop)
        })
        .await
    }

    async fn purge_rows_fenced(
        &self,
        rows: Vec<(PersistenceId, Revision, Fence)>,
        written_before: DateTime<Utc>,
    ) -> Result<Vec<PersistenceId>, StoreError> {
        let rows = rows
            .into_iter()
            .map(|(id, revision, fence)| (id, revision, Some(fence)))
            .collect();
        self.purge(rows, written_before).await
    }

    fn joined(&self) -> Option<std::sync::Arc<dyn JoinedNode>> {
        let joined = self
            .backend
            .joined
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        joined.clone()
    }

    fn set_joined(&self, node: std::sync::Arc<dyn JoinedNode>) {
        *self
            .backend
            .joined
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(node);
    }

    async fn save_offset_fenced(
        &self,
        consumer: &str,
        position: u64,
        lease: &str,
        node: &str,
        epoch_held: u64,
    ) -> Result<bool, StoreError> {
        let (consumer, lease, node) = (consumer.to_owned(), lease.to_owned(), node.to_owned());
        let (position, held) = (bigint(position)?, bigint(epoch_held)?);
        self.run_write(move |backend| async move {
            let saved = backend
                .lease_statement(
                    "WITH fence AS (
                        SELECT 1 FROM cluster_leases AS l JOIN cluster_nodes AS n ON n.node_id = l.holder
                        WHERE l.name = $3 AND l.holder = $4 AND l.epoch = $5 AND n.lease_expires > now()
                        FOR SHARE OF l
                    )
                    INSERT INTO feed_offsets (consumer, position, updated_at)
                    SELECT $1, $2, now() FROM fence
                    ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
                    RETURNING consumer",
                    &[&consumer, &position, &lease, &node, &held],
                )
                .await?;
            Ok(!saved.is_empty())
        })
        .await
    }
}
