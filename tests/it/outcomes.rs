//! An error answer means "not committed", except `OutcomeUnknown`: the write
//! was sent and no answer came back. Timeouts are consistent by
//! construction: the wait for a connection is bounded apart from the
//! statement, and SQLite's busy wait sits inside the operation timeout.

use std::time::Duration;

use crate::common::{key, test_store_config, Backend, TestDb};
use diesel::sql_types::Integer;
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use persist_durable::{
    Command, CommandError, Config, Revision, StateStoreExt, StoreConfig, StoreError, UserKey, UserStates,
};

/// Every row write on `durable_state` takes `seconds` in a trigger.
fn slow_writes_sql(seconds: f64) -> String {
    format!(
        "CREATE FUNCTION slow_write() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$ \
         LANGUAGE plpgsql; \
         CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON durable_state FOR EACH ROW EXECUTE FUNCTION slow_write();"
    )
}

#[actix::test]
async fn a_write_waiting_for_a_pooled_connection_is_answered_only_once_decided() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    // One connection, one row per statement: the third user's statement
    // waits 1.6 s for the connection, then runs 0.8 s, past twice the
    // operation timeout in all. Only the statement's own time counts.
    let config = test_store_config()
        .with_pool_size(1)
        .with_connect_timeout(Duration::from_secs(5))
        .with_operation_timeout(Duration::from_secs(1))
        .with_max_batch_size(1);
    let store = db.connect_with(config).await;
    db.execute(&slow_writes_sql(0.8));
    let users = UserStates::start(store.clone(), Config::default());
    let keys: Vec<UserKey> = (0..3).map(|i| key("mall", &format!("user{i}"))).collect();

    let answers = futures_util::future::join_all(keys.iter().map(|k| users.send(k.clone(), Command::UserLogin))).await;

    // With one connection, these loads run after every write statement.
    for (k, answer) in keys.iter().zip(&answers) {
        let stored = store.load(k).await.unwrap();
        match answer {
            Ok(_) => assert_eq!(stored.map(|s| s.revision), Some(Revision(1)), "{k} answered Ok"),
            Err(error) => assert!(stored.is_none(), "{k} answered {error:?}, yet committed"),
        }
    }
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// The server process running a group-commit write, once one runs.
async fn writing_backend(url: &str) -> i32 {
    use diesel_async::RunQueryDsl;
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    for _ in 0..200 {
        let pids: Vec<Pid> = diesel::sql_query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
             AND query LIKE '%unnest%' AND pid <> pg_backend_pid()",
        )
        .load(&mut conn)
        .await
        .unwrap();
        if let Some(Pid { pid }) = pids.into_iter().next() {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no write statement started");
}

fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[actix::test]
async fn a_write_sent_without_an_answer_is_outcome_unknown_and_the_actor_reloads() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let url = db.postgres_url().unwrap().to_owned();
    let config = test_store_config().with_operation_timeout(Duration::from_millis(500));
    let store = db.connect_with(config).await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall", "user");
    users.send(user.clone(), Command::UserLogin).await.unwrap();
    db.execute(&slow_writes_sql(0.3));

    // The server process freezes mid-statement: the write was sent, no answer comes.
    let pending = actix::spawn({
        let (users, user) = (users.clone(), user.clone());
        async move { users.send(user, Command::UseCart).await }
    });
    let pid = writing_backend(&url).await;
    signal(pid, "-STOP");
    let answer = pending.await.unwrap();
    signal(pid, "-CONT");

    assert!(
        matches!(
            &answer,
            Err(CommandError::OutcomeUnknown {
                source: StoreError::OutcomeUnknown(_),
                ..
            })
        ),
        "{answer:?}"
    );
    assert!(answer.unwrap_err().is_retryable());
    // Whatever the server decided, the actor reloads before its next command
    // and never reports a state the store does not hold.
    let next = users
        .send(user.clone(), Command::SetMarketingOptIn { opt_in: true })
        .await;
    let next = next.expect("the next command is applied on top of the stored state");
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(stored.state, next);
    // Revision 2 if the frozen write was rolled back (its statement timeout
    // fires once the process resumes), 3 if it committed.
    assert!(stored.revision >= Revision(2), "{:?}", stored.revision);
}

#[actix::test]
async fn a_sqlite_busy_timeout_beyond_the_operation_timeout_is_refused() {
    let Some(db) = TestDb::open(Backend::Sqlite).await else {
        return;
    };
    let config = StoreConfig::default()
        .with_operation_timeout(Duration::from_millis(500))
        .with_sqlite_busy_timeout(Duration::from_secs(4));

    let opened = db.try_connect_with(config).await;

    assert!(matches!(opened, Err(StoreError::InvalidConfig(_))), "{opened:?}");
}

#[actix::test]
async fn a_zero_operation_timeout_is_refused_on_both_backends() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(db) = TestDb::open(backend).await else {
            continue;
        };
        let config = test_store_config().with_operation_timeout(Duration::ZERO);
        let opened = db.try_connect_with(config).await;
        assert!(
            matches!(opened, Err(StoreError::InvalidConfig(_))),
            "{backend:?}: {opened:?}"
        );
    }
}

#[actix::test]
async fn a_sqlite_write_that_found_the_database_locked_is_not_committed_after_its_error() {
    let Some(db) = TestDb::open(Backend::Sqlite).await else {
        return;
    };
    let config = test_store_config()
        .with_operation_timeout(Duration::from_millis(500))
        .with_sqlite_busy_timeout(Duration::from_millis(400));
    let store = db.connect_with(config).await;
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall", "user");
    users.send(user.clone(), Command::GetUserState).await.unwrap();

    db.make_unavailable(); // another connection holds the write lock
    let answer = users.send(user.clone(), Command::UserLogin).await;
    db.make_available();

    assert!(
        matches!(&answer, Err(CommandError::StoreUnavailable { .. })),
        "{answer:?}"
    );
    assert!(
        store.load(&user).await.unwrap().is_none(),
        "answered failed, yet committed"
    );
    let retried = users.send(user.clone(), Command::UserLogin).await.unwrap();
    assert!(retried.last_login.is_some());
    assert_eq!(store.load(&user).await.unwrap().unwrap().revision, Revision(1));
}

/// Every statement on `table` of `events` takes `seconds` in a trigger.
fn slow_statements_sql(table: &str, events: &str, seconds: f64) -> String {
    format!(
        "CREATE FUNCTION slow_{table}() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep({seconds}); \
           RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER slow_{table} BEFORE {events} ON {table} FOR EACH ROW EXECUTE FUNCTION slow_{table}();"
    )
}

/// One connection and 0.8 s statements, as for the writes above: the second
/// of two purges (of two entity types) waits 0.8 s for the connection, then
/// runs 0.8 s. Before, the client's timeout of 1 s counted the wait too: it
/// answered `Timeout` ("failed") and the delete committed right after.
#[actix::test]
async fn a_purge_waiting_for_a_pooled_connection_is_answered_only_once_decided() {
    use persist_durable::cart::{Cart, CartId};
    use persist_durable::{MaintenanceExt, UserState};
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let config = test_store_config()
        .with_pool_size(1)
        .with_connect_timeout(Duration::from_secs(5))
        .with_operation_timeout(Duration::from_secs(1));
    let store = db.connect_with(config).await;
    let (user, cart) = (key("mall", "idle"), CartId::new("idle").unwrap());
    store
        .write(&user, Revision::NONE, Revision(1), &UserState::default())
        .await
        .unwrap();
    store
        .write(&cart, Revision::NONE, Revision(1), &Cart::default())
        .await
        .unwrap();
    crate::common::age(&db, std::slice::from_ref(&user));
    crate::common::age(&db, std::slice::from_ref(&cart));
    db.execute(&slow_statements_sql("durable_state", "DELETE", 0.8));

    let (users, carts) = tokio::join!(
        store.purge_idle::<UserState>(Duration::from_secs(60), 1),
        store.purge_idle::<Cart>(Duration::from_secs(60), 1),
    );

    for (answer, left) in [
        (users, store.count::<UserState>().await.unwrap()),
        (carts, store.count::<Cart>().await.unwrap()),
    ] {
        match answer {
            Ok(purged) => assert_eq!((purged, left), (1, 0)),
            Err(error) => panic!("answered {error:?}, and {} left", left),
        }
    }
}

/// The same for a Kafka ingest's or a feed consumer's position save.
#[actix::test]
async fn a_position_save_waiting_for_a_pooled_connection_is_answered_only_once_decided() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let config = test_store_config()
        .with_pool_size(1)
        .with_connect_timeout(Duration::from_secs(5))
        .with_operation_timeout(Duration::from_secs(1));
    let store = db.connect_with(config).await;
    db.execute(&slow_statements_sql("feed_offsets", "INSERT OR UPDATE", 0.8));

    let (first, second) = tokio::join!(store.save_offset("first", 7), store.save_offset("second", 9));

    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
    assert_eq!(store.load_offset("first").await.unwrap(), Some(7));
    assert_eq!(store.load_offset("second").await.unwrap(), Some(9));
}
