//! What the database says: who owns each slice, and who wrote each commit.
//!
//! The audit is a trigger the harness adds to `durable_state` for its
//! counters (never part of the library): at every committed write it records
//! the node that applied the state (the counter's `writer`) beside the
//! slice's owner and epoch as the same transaction sees them. The library's
//! write holds the slice's ownership row `FOR SHARE` from its fence check to
//! its commit, so the two must agree: a row where they differ is a commit
//! by a node that no longer owned the slice.

use std::collections::HashMap;
use std::error::Error;

use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use persist_durable::PostgresStore;

use super::counter::ENTITY_TYPE;

type AnyError = Box<dyn Error + Send + Sync>;

/// The audit table and its trigger, for the rows of `entity_type`.
fn audit(entity_type: &str) -> String {
    format!(
        "
CREATE TABLE IF NOT EXISTS cluster_harness_commits (
    id             BIGSERIAL   PRIMARY KEY,
    persistence_id TEXT        NOT NULL,
    slice          INTEGER,
    revision       BIGINT      NOT NULL,
    writer         TEXT,
    owner          TEXT,
    epoch          BIGINT,
    committed_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
TRUNCATE cluster_harness_commits;
CREATE OR REPLACE FUNCTION cluster_harness_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cluster_harness_commits (persistence_id, slice, revision, writer, owner, epoch)
    SELECT NEW.persistence_id, NEW.slice, NEW.revision,
           convert_from(NEW.state_payload, 'UTF8')::jsonb ->> 'writer', s.owner, s.epoch
    FROM (SELECT 1) AS one LEFT JOIN cluster_slices AS s ON s.slice = NEW.slice;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS cluster_harness_audit ON durable_state;
CREATE TRIGGER cluster_harness_audit AFTER INSERT OR UPDATE ON durable_state
    FOR EACH ROW WHEN (NEW.entity_type = '{entity_type}') EXECUTE FUNCTION cluster_harness_audit();
"
    )
}

/// A fresh cluster on `url`: migrated, no state, no nodes, no owners, the
/// audit in place.
pub(crate) async fn reset(url: &str) -> Result<Database, AnyError> {
    drop(PostgresStore::connect(url).await?);
    let mut conn = AsyncPgConnection::establish(url).await?;
    conn.batch_execute(
        "TRUNCATE durable_state;
         DELETE FROM cluster_nodes;
         DELETE FROM cluster_leases;
         UPDATE cluster_slices SET owner = NULL, epoch = 0;",
    )
    .await?;
    conn.batch_execute(&audit(ENTITY_TYPE)).await?;
    Ok(Database { conn })
}

/// The harness's own connection.
pub(crate) struct Database {
    conn: AsyncPgConnection,
}

#[derive(diesel::QueryableByName)]
struct Slices {
    /// Slices with no owner whose lease holds.
    #[diesel(sql_type = BigInt)]
    orphaned: i64,
    /// Slices the node asked about owns.
    #[diesel(sql_type = BigInt)]
    held: i64,
}

#[derive(diesel::QueryableByName)]
struct Owned {
    #[diesel(sql_type = BigInt)]
    slice: i64,
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

#[derive(diesel::QueryableByName)]
struct Now {
    #[diesel(sql_type = Double)]
    now: f64,
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    persistence_id: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    value: Option<i64>,
}

#[derive(diesel::QueryableByName)]
struct Misfit {
    #[diesel(sql_type = Text)]
    description: String,
}

impl Database {
    /// (slices without a live owner, slices `node` owns), by the database's clock.
    pub(crate) async fn slices(&mut self, node: &str) -> Result<(u64, u64), AnyError> {
        let row: Slices = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE n.node_id IS NULL) AS orphaned,
                    count(*) FILTER (WHERE s.owner = $1) AS held
             FROM cluster_slices AS s
             LEFT JOIN cluster_nodes AS n ON n.node_id = s.owner AND n.lease_expires > now()",
        )
        .bind::<Text, _>(node)
        .get_result(&mut self.conn)
        .await?;
        Ok((row.orphaned as u64, row.held as u64))
    }

    /// The slices `node` owns.
    pub(crate) async fn owned_by(&mut self, node: &str) -> Result<Vec<u16>, AnyError> {
        let rows: Vec<Owned> = diesel::sql_query("SELECT slice::bigint AS slice FROM cluster_slices WHERE owner = $1")
            .bind::<Text, _>(node)
            .load(&mut self.conn)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| u16::try_from(row.slice).ok())
            .collect())
    }

    /// The database's clock, in seconds since the epoch.
    pub(crate) async fn now(&mut self) -> Result<f64, AnyError> {
        let row: Now = diesel::sql_query("SELECT extract(epoch FROM clock_timestamp())::float8 AS now")
            .get_result(&mut self.conn)
            .await?;
        Ok(row.now)
    }

    /// Commits whose writer did not own the slice, by anyone (`None`) or by
    /// `node` from `since` (the database's clock) on.
    pub(crate) async fn commits_by_non_owners(&mut self, node: Option<(&str, f64)>) -> Result<u64, AnyError> {
        let query = diesel::sql_query(
            "SELECT count(*) AS count FROM cluster_harness_commits
             WHERE writer <> '' AND writer IS DISTINCT FROM owner
               AND ($1::text IS NULL OR (writer = $1 AND committed_at >= to_timestamp($2)))",
        )
        .bind::<Nullable<Text>, _>(node.map(|(node, _)| node))
        .bind::<Double, _>(node.map_or(0.0, |(_, since)| since));
        let row: Count = query.get_result(&mut self.conn).await?;
        Ok(row.count as u64)
    }

    /// Up to 10 of those commits, described.
    pub(crate) async fn misfits(&mut self) -> Result<Vec<String>, AnyError> {
        let rows: Vec<Misfit> = diesel::sql_query(
            "SELECT format('%s revision %s in slice %s written by %s at %s while %s owned it at epoch %s',
                           persistence_id, revision, slice, writer, committed_at, owner, epoch) AS description
             FROM cluster_harness_commits
             WHERE writer <> '' AND writer IS DISTINCT FROM owner ORDER BY id LIMIT 10",
        )
        .load(&mut self.conn)
        .await?;
        Ok(rows.into_iter().map(|row| row.description).collect())
    }

    /// Commits audited in all.
    pub(crate) async fn commits(&mut self) -> Result<u64, AnyError> {
        let row: Count = diesel::sql_query("SELECT count(*) AS count FROM cluster_harness_commits")
            .get_result(&mut self.conn)
            .await?;
        Ok(row.count as u64)
    }

    /// Every counter's stored value by persistence id (0 once deleted).
    pub(crate) async fn stored_values(&mut self) -> Result<HashMap<String, u64>, AnyError> {
        let rows: Vec<Stored> = diesel::sql_query(
            "SELECT persistence_id, (convert_from(state_payload, 'UTF8')::jsonb ->> 'value')::bigint AS value
             FROM durable_state WHERE entity_type = $1",
        )
        .bind::<Text, _>(ENTITY_TYPE)
        .load(&mut self.conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.persistence_id, row.value.unwrap_or(0).max(0) as u64))
            .collect())
    }

    /// Removes the audit's trigger, so that other scenarios on this database
    /// write without it; its table stays for inspection.
    pub(crate) async fn drop_audit(&mut self) -> Result<(), AnyError> {
        self.conn
            .batch_execute("DROP TRIGGER IF EXISTS cluster_harness_audit ON durable_state")
            .await?;
        Ok(())
    }
}

/// A transaction holding `cluster_nodes` locked against changes: every
/// node's renewals (and joins) wait for it, as if the database were slow to
/// confirm them, while reads and fenced writes go on. A node that resumes
/// from a stall meanwhile still takes itself for the owner of its slices;
/// only its own clock tells it that its lease can no longer be trusted.
/// (Locking the node's row alone would not do: a renewal skips, without
/// waiting, a row whose lease has already expired.) Held briefly, so that
/// the other nodes' leases, renewed just before, do not run out.
pub(crate) struct HeldRenewals {
    conn: AsyncPgConnection,
}

impl HeldRenewals {
    /// Locks `cluster_nodes` on a connection of its own.
    pub(crate) async fn hold(url: &str) -> Result<Self, AnyError> {
        let mut conn = AsyncPgConnection::establish(url).await?;
        conn.batch_execute("BEGIN; LOCK TABLE cluster_nodes IN SHARE MODE")
            .await?;
        Ok(Self { conn })
    }

    /// Lets the renewals through.
    pub(crate) async fn release(mut self) -> Result<(), AnyError> {
        self.conn.batch_execute("COMMIT").await?;
        Ok(())
    }
}
