//! Two nodes writing the same users at once, in opposite orders, in large
//! batches, must not deadlock. PostgreSQL only: SQLite has a single writer.
//!
//! The two stores run with plans that take the write statement's row locks
//! in different orders: node A's `UPDATE ... FROM unnest(...)` probes a hash
//! of the batch with a scan of the table (physical order), node B's loops
//! over the batch (persistence id order).
//!
//! The write statement first locks its rows in persistence id order (a
//! `FOR UPDATE` below an `ORDER BY`), whatever the plan. With the earlier
//! statement, whose lock order was its plan's, this test failed with
//! deadlock_detected within seconds, under the planner's default settings
//! too (mixed batch sizes pick different join plans).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use crate::common::{key, test_store_config, Backend, TestDb};
use futures_util::future::join_all;
use persist_durable::{Revision, SharedStore, StateStoreExt, StoreConfig, StoreError, UserKey, UserState};

const USERS: usize = 2_000;
const ROUNDS: usize = 40;
/// One in this many user-rounds also creates a user, both nodes racing.
const FRESH_EVERY: usize = 80;
const POOL: usize = 4;

/// Node A: hash joins, probed by a scan of `durable_state`. A generic plan
/// expects a small batch, so the batch is the hashed side at every size.
const HASH_JOIN: &[(&str, &str)] = &[
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_nestloop", "off"),
    ("enable_mergejoin", "off"),
];
/// Node B: a nested loop over the batch.
const NESTED_LOOP: &[(&str, &str)] = &[
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];

fn config() -> StoreConfig {
    test_store_config()
        .with_pool_size(POOL)
        .with_max_batch_size(512)
        .with_max_write_batches_in_flight(POOL)
        // Well above PostgreSQL's deadlock_timeout (1 s): a deadlock is
        // reported as one, not as a lock or pool timeout.
        .with_operation_timeout(Duration::from_secs(20))
        .with_connect_timeout(Duration::from_secs(20))
}

/// A store all of whose connections run with `settings`: they are the
/// database's defaults while the store opens every connection of its pool.
async fn connect_with_settings(db: &TestDb, settings: &[(&str, &str)], node: &str) -> SharedStore {
    let set: String = settings
        .iter()
        .map(|(name, value)| format!("EXECUTE format('ALTER DATABASE %I SET {name} = {value}', current_database());"))
        .collect();
    db.execute(&format!("DO $$ BEGIN {set} END $$"));
    let store = db.connect_with(config()).await;
    // One write per batch, each waiting behind a table lock while holding
    // its connection, until the pool has opened all of them.
    let lock = db.lock_table();
    let warm_up = join_all((0..POOL).map(|i| {
        let store = &store;
        async move {
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            let user = key("warmup", &format!("{node}{i}"));
            store
                .write(&user, Revision::NONE, Revision(1), &UserState::default())
                .await
        }
    }));
    let release = async {
        tokio::time::sleep(Duration::from_millis(50 * POOL as u64 + 500)).await;
        drop(lock);
    };
    let (written, ()) = tokio::join!(warm_up, release);
    for result in written {
        result.expect("a warm-up write");
    }
    db.execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET ALL', current_database()); END $$");
    store
}

fn is_deadlock(error: &StoreError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.to_string().contains("deadlock detected") {
            return true;
        }
        cause = error.source();
    }
    false
}

#[derive(Default)]
struct Tally {
    /// Successful writes per user.
    written: HashMap<UserKey, u64>,
    conflicts: u64,
    /// Writes failed by a deadlock (a deadlocked statement fails all of its writes).
    deadlocks: u64,
    errors: Vec<StoreError>,
}

impl Tally {
    /// Counts `result`; the revision to write from next.
    fn count(&mut self, user: &UserKey, result: Result<Revision, StoreError>) -> Option<Revision> {
        match result {
            Ok(revision) => {
                *self.written.entry(user.clone()).or_default() += 1;
                return Some(revision);
            }
            Err(StoreError::Conflict { .. }) => self.conflicts += 1,
            Err(error) if is_deadlock(&error) => self.deadlocks += 1,
            Err(error) => self.errors.push(error),
        }
        None
    }
}

/// Users created while the others are written: inserts share batches with updates.
fn fresh(user: usize, round: usize) -> Option<UserKey> {
    ((user + round) % FRESH_EVERY == 0).then(|| key("mall001", &format!("fresh{user:04}-{round:03}")))
}

/// Writes every user `ROUNDS` times, all users at once (so group commit
/// fills large batches), each write from the revision this node last saw; a
/// write that lost to the other node reloads the user. Users are first
/// written in `order`; after that each moves on as soon as its write is done.
async fn drive(store: SharedStore, users: &[UserKey], order: impl Iterator<Item = usize>) -> Tally {
    let tally = RefCell::new(Tally::default());
    join_all(order.map(|i| {
        let (store, user, tally) = (&store, &users[i], &tally);
        async move {
            let mut known = Revision(1);
            for round in 0..ROUNDS {
                if let Some(fresh) = fresh(i, round) {
                    let created = store
                        .write(&fresh, Revision::NONE, Revision(1), &UserState::default())
                        .await;
                    tally.borrow_mut().count(&fresh, created);
                }
                let state = UserState {
                    marketing_opt_in: round % 2 == 0,
                    ..UserState::default()
                };
                let written = store.write(user, known, known.next(), &state).await;
                let next = tally.borrow_mut().count(user, written);
                known = match next {
                    Some(revision) => revision,
                    None => match store.load(user).await {
                        Ok(stored) => stored.expect("a stored user").revision,
                        Err(error) => {
                            tally.borrow_mut().errors.push(error);
                            known
                        }
                    },
                };
            }
        }
    }))
    .await;
    tally.into_inner()
}

#[actix::test]
async fn two_nodes_writing_the_same_users_in_opposite_orders_never_deadlock() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let node_a = connect_with_settings(&db, HASH_JOIN, "a").await;
    let node_b = connect_with_settings(&db, NESTED_LOOP, "b").await;
    let users: Vec<UserKey> = (0..USERS).map(|i| key("mall001", &format!("user{i:04}"))).collect();
    // Created in descending order, 100 at a time, so that the table's
    // physical order is not the persistence id order.
    let state = UserState::default();
    for chunk in users.rchunks(100) {
        let created = join_all(
            chunk
                .iter()
                .map(|user| node_a.write(user, Revision::NONE, Revision(1), &state)),
        )
        .await;
        for result in created {
            result.expect("a user is created");
        }
    }
    db.execute("VACUUM ANALYZE durable_state");
    let before = (node_a.stats(), node_b.stats());

    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(
        drive(node_a.clone(), &users, 0..USERS),
        drive(node_b.clone(), &users, (0..USERS).rev())
    );
    let elapsed = started.elapsed();

    let statements = node_a.stats().write_statements + node_b.stats().write_statements
        - before.0.write_statements
        - before.1.write_statements;
    let rows_written: u64 = a.written.values().chain(b.written.values()).sum();
    eprintln!(
        "{statements} write statements in {elapsed:.1?}: {rows_written} rows written, {} conflicts, \
         {} writes failed by deadlocks, {} by other errors",
        a.conflicts + b.conflicts,
        a.deadlocks + b.deadlocks,
        a.errors.len() + b.errors.len()
    );
    assert_eq!(
        a.deadlocks + b.deadlocks,
        0,
        "writes failed with deadlock_detected (40P01)"
    );
    let errors: Vec<_> = a.errors.iter().chain(&b.errors).collect();
    assert!(
        errors.is_empty(),
        "{} writes failed: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        a.conflicts > 0 && b.conflicts > 0,
        "the two nodes wrote the same users at once"
    );

    // Each successful write moved its user on by exactly one revision.
    let mut everyone = users.clone();
    everyone.extend((0..USERS).flat_map(|i| (0..ROUNDS).filter_map(move |round| fresh(i, round))));
    let seeded = users.len();
    let stored = join_all(everyone.iter().map(|user| node_b.load(user))).await;
    for (i, (user, stored)) in everyone.iter().zip(stored).enumerate() {
        let writes = a.written.get(user).unwrap_or(&0) + b.written.get(user).unwrap_or(&0) + u64::from(i < seeded);
        let revision = stored.unwrap().map_or(0, |stored| stored.revision.0);
        assert_eq!(revision, writes, "{user:?}: one revision per successful write");
    }
}
