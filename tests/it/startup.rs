//! Several processes starting together on one database all come up: a
//! rolling deploy, or N replicas started at once on a database with pending
//! migrations. One migrates at a time, the others wait without holding
//! anything the migrating one waits for, and an index a failed concurrent
//! build left INVALID is rebuilt at the next start.

use rstest::rstest;

use crate::common::{Backend, ChildProcess, TestDb};

/// Starts `processes` processes at once on `db`, each opening the store and
/// writing a row of its own; asserts that every one of them did.
pub(crate) fn start_together(db: &TestDb, location: &str, processes: usize) {
    let children: Vec<ChildProcess> = (0..processes)
        .map(|i| ChildProcess::start("open-and-write", &[location, &format!("process{i}")]))
        .collect();
    for (i, mut child) in children.into_iter().enumerate() {
        let said = child.line("written ");
        assert!(said.is_some(), "process {i} did not start");
        assert!(child.wait(), "process {i} failed");
    }
    db.assert_sql(&format!(
        "(SELECT count(*) FROM durable_state WHERE persistence_id LIKE 'UserState|started-process%') = {processes}"
    ));
}

#[rstest]
#[actix::test]
async fn processes_starting_together_on_a_fresh_database_all_start(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };

    start_together(&db, &db.location(), 4);

    if backend == Backend::Postgres {
        db.assert_sql("NOT EXISTS (SELECT 1 FROM pg_index WHERE NOT indisvalid)");
    }
}

/// A concurrent index build that failed (its session was the victim of a
/// deadlock, or was killed) leaves the index INVALID: unused by every query,
/// and skipped for good by `CREATE INDEX ... IF NOT EXISTS`.
#[actix::test]
async fn an_invalid_index_found_at_start_is_rebuilt() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    db.connect().await;
    db.execute(
        "UPDATE pg_index SET indisvalid = false \
         WHERE indexrelid IN ('state_changes_by_persistence_id'::regclass, 'durable_state_by_entity_type'::regclass)",
    );
    db.assert_sql("(SELECT count(*) FROM pg_index WHERE NOT indisvalid) = 2");

    db.connect().await;

    db.assert_sql("NOT EXISTS (SELECT 1 FROM pg_index WHERE NOT indisvalid)");
    db.assert_sql(
        "(SELECT count(*) FROM pg_indexes WHERE indexname IN \
          ('state_changes_by_persistence_id', 'durable_state_by_entity_type')) = 2",
    );
}
