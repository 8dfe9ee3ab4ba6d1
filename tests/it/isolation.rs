//! One entity's bad row never fails another entity's command: when the
//! database refuses a group-commit statement because of one row, the batch
//! is split until that row is alone, and every other row commits.

use std::time::Duration;

use crate::common::{key, test_store_config, view, Backend, TestDb};
use persist_durable::{Command, CommandError, Config, EntityKey, Revision, StateStoreExt, UserKey, UserStates};
use rstest::rstest;

/// Where the database refuses the culprit's row.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// The state row (`durable_state`).
    State,
    /// Its change feed row (`state_changes`), with the feed on.
    Feed,
}

/// How the database refuses it.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// A constraint violation (PostgreSQL: `check_violation`; SQLite: a
    /// CHECK the trigger trips).
    Constraint,
    /// A trigger's own error: PostgreSQL's `RAISE EXCEPTION` (SQLSTATE P0001,
    /// which the driver classifies as nothing), SQLite's `RAISE(ABORT)`.
    Raise,
}

/// A trigger on `table` refusing the rows for which `condition` (on `NEW`) holds.
fn refuse_where_sql(backend: Backend, refusal: Refusal, table: &str, condition: &str) -> String {
    match (backend, refusal) {
        (Backend::Postgres, _) => {
            let errcode = match refusal {
                Refusal::Constraint => " USING ERRCODE = 'check_violation'",
                Refusal::Raise => "",
            };
            format!(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
                   IF {condition} THEN RAISE EXCEPTION 'refused by policy'{errcode}; END IF; \
                   RETURN NEW; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION refuse();"
            )
        }
        (Backend::Sqlite, Refusal::Constraint) => format!(
            "CREATE TABLE refusals (allowed INTEGER CHECK (allowed > 0)); \
             CREATE TRIGGER refuse_insert BEFORE INSERT ON {table} WHEN {condition} \
               BEGIN INSERT INTO refusals VALUES (0); END; \
             CREATE TRIGGER refuse_update BEFORE UPDATE ON {table} WHEN {condition} \
               BEGIN INSERT INTO refusals VALUES (0); END;"
        ),
        (Backend::Sqlite, Refusal::Raise) => format!(
            "CREATE TRIGGER refuse_insert BEFORE INSERT ON {table} WHEN {condition} \
               BEGIN SELECT RAISE(ABORT, 'refused by policy'); END; \
             CREATE TRIGGER refuse_update BEFORE UPDATE ON {table} WHEN {condition} \
               BEGIN SELECT RAISE(ABORT, 'refused by policy'); END;"
        ),
    }
}

/// A trigger refusing the culprit's row.
fn refuse_sql(backend: Backend, refusal: Refusal, refused: Refused, persistence_id: &str) -> String {
    let table = match refused {
        Refused::State => "durable_state",
        Refused::Feed => "state_changes",
    };
    refuse_where_sql(
        backend,
        refusal,
        table,
        &format!("NEW.persistence_id = '{persistence_id}'"),
    )
}

/// Users whose logins meet in one write batch, the culprit last.
async fn everyone_restored(users: &UserStates, healthy: &[UserKey], culprit: &UserKey) {
    let everyone = healthy.iter().chain([culprit]);
    for restored in futures_util::future::join_all(everyone.map(|u| users.send(u.clone(), Command::GetUserState))).await
    {
        restored.unwrap();
    }
}

#[rstest]
#[actix::test]
async fn a_row_the_database_refuses_fails_only_its_own_command(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(Refused::State, Refused::Feed)] refused: Refused,
    #[values(Refusal::Constraint, Refusal::Raise)] refusal: Refusal,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // A long batch wait: every write below lands in one statement.
    let config = test_store_config()
        .with_change_feed(matches!(refused, Refused::Feed))
        .with_max_batch_wait(Duration::from_millis(200));
    let store = db.connect_with(config).await;
    let culprit = key("mall", "culprit");
    db.execute(&refuse_sql(
        backend,
        refusal,
        refused,
        culprit.persistence_id().as_str(),
    ));
    let users = UserStates::start(store.clone(), Config::default());
    let healthy: Vec<UserKey> = (0..40).map(|i| key("mall", &format!("user{i:02}"))).collect();
    // Restored first, so that the logins below meet in one write batch.
    everyone_restored(&users, &healthy, &culprit).await;
    let statements_before = store.stats().write_statements;

    let everyone = healthy.iter().chain([&culprit]);
    let answers = futures_util::future::join_all(everyone.map(|u| users.send(u.clone(), Command::UserLogin))).await;

    let (culprits_answer, healthy_answers) = answers.split_last().unwrap();
    // Loaded together: one at a time, each would wait out the batch window.
    let stored = futures_util::future::join_all(healthy.iter().map(|user| store.load(user))).await;
    for ((user, answer), stored) in healthy.iter().zip(healthy_answers).zip(stored) {
        assert!(answer.is_ok(), "{user}: {answer:?}");
        assert_eq!(stored.unwrap().unwrap().revision, Revision(1), "{user}");
    }
    assert!(
        matches!(culprits_answer, Err(error @ CommandError::Unstorable { key, .. }) if key == &culprit && !error.is_retryable()),
        "{culprits_answer:?}"
    );
    assert!(
        store.load(&culprit).await.unwrap().is_none(),
        "the refused row was not written"
    );
    assert!(
        store.stats().write_statements - statements_before > 1,
        "the batch was written in parts"
    );
    if matches!(refused, Refused::Feed) {
        let changes = persist_durable::ChangeFeed::from_position(store.clone(), 0)
            .with_batch_size(1_000)
            .next_batch()
            .await
            .unwrap();
        assert_eq!(
            changes.len(),
            healthy.len(),
            "one change per healthy user, none for the culprit"
        );
    }
}

/// A failure of the database (a deadlock, a lock or statement timeout, no
/// memory) is not any row's: splitting the batch would only repeat it. Each
/// SQLSTATE here is raised by a trigger on one row, in a fraction of a second.
#[rstest]
#[actix::test]
async fn a_failure_of_the_database_fails_the_batch_unsplit_and_retryable(
    #[values(
        "deadlock_detected",
        "lock_not_available",
        "query_canceled",
        "insufficient_resources"
    )]
    sqlstate: &str,
) {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let config = test_store_config().with_max_batch_wait(Duration::from_millis(200));
    let store = db.connect_with(config).await;
    let culprit = key("mall", "culprit");
    db.execute(&format!(
        "CREATE FUNCTION fail() RETURNS trigger AS $$ BEGIN \
           IF NEW.persistence_id = '{}' THEN RAISE EXCEPTION 'Zeitüberschreitung' USING ERRCODE = '{sqlstate}'; \
           END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER fail BEFORE INSERT OR UPDATE ON durable_state FOR EACH ROW EXECUTE FUNCTION fail();",
        culprit.persistence_id()
    ));
    let users = UserStates::start(store.clone(), Config::default());
    let healthy: Vec<UserKey> = (0..40).map(|i| key("mall", &format!("user{i:02}"))).collect();
    everyone_restored(&users, &healthy, &culprit).await;
    let statements_before = store.stats().write_statements;

    let everyone: Vec<&UserKey> = healthy.iter().chain([&culprit]).collect();
    let answers =
        futures_util::future::join_all(everyone.iter().map(|u| users.send((*u).clone(), Command::UserLogin))).await;

    assert_eq!(
        store.stats().write_statements - statements_before,
        1,
        "one statement, not split"
    );
    for (user, answer) in everyone.iter().zip(&answers) {
        assert!(
            matches!(answer, Err(error @ CommandError::StoreUnavailable { .. }) if error.is_retryable()),
            "{user}: the database's failure fails the batch, retryable: {answer:?}"
        );
        assert!(store.load(*user).await.unwrap().is_none(), "{user}: nothing committed");
    }
}

/// Splitting is bounded in time (the operation timeout): the rows still
/// sharing a statement with the culprit when it runs out were not found
/// guilty, and are answered with an error worth retrying, not `Unstorable`.
#[actix::test]
async fn rows_not_isolated_within_the_bound_get_a_retryable_answer() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    // Each statement holding the culprit takes 0.4 s: the bound of 1 s runs
    // out about three levels down, before the culprit is alone.
    let config = test_store_config()
        .with_operation_timeout(Duration::from_secs(1))
        .with_max_batch_wait(Duration::from_millis(200));
    let store = db.connect_with(config).await;
    let culprit = key("mall", "culprit");
    db.execute(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
           IF NEW.persistence_id = '{}' THEN PERFORM pg_sleep(0.4); RAISE EXCEPTION 'refused'; END IF; \
           RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON durable_state FOR EACH ROW EXECUTE FUNCTION refuse();",
        culprit.persistence_id()
    ));
    let users = UserStates::start(store.clone(), Config::default());
    let healthy: Vec<UserKey> = (0..40).map(|i| key("mall", &format!("user{i:02}"))).collect();
    everyone_restored(&users, &healthy, &culprit).await;

    let everyone: Vec<&UserKey> = healthy.iter().chain([&culprit]).collect();
    let answers =
        futures_util::future::join_all(everyone.iter().map(|u| users.send((*u).clone(), Command::UserLogin))).await;

    let culprits_answer = answers.last().unwrap();
    assert!(
        matches!(culprits_answer, Err(error @ CommandError::StoreUnavailable { .. }) if error.is_retryable()),
        "not found guilty in time: {culprits_answer:?}"
    );
    let mut unisolated = 0;
    for (user, answer) in everyone.iter().zip(&answers) {
        let stored = store.load(*user).await.unwrap();
        match answer {
            Ok(_) => assert_eq!(stored.map(|s| s.revision), Some(Revision(1)), "{user}"),
            Err(error) => {
                assert!(error.is_retryable(), "{user}: {error:?}");
                assert!(stored.is_none(), "{user}: answered {error:?}, yet committed");
                unisolated += 1;
            }
        }
    }
    assert!(unisolated > 1, "the culprit's last statement-mates share its answer");
    assert!(unisolated < everyone.len(), "the halves without the culprit committed");
}

/// Several commands of one entity share a write; the database refuses the
/// state after one of them. Before, every command of the write failed with
/// `Unstorable`; now each is written alone, and only the one whose state was
/// refused fails: those before it commit, and those after it apply to the
/// state before it.
#[rstest]
#[actix::test]
async fn only_the_command_whose_state_the_database_refuses_fails(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(Refusal::Constraint, Refusal::Raise)] refusal: Refusal,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config()).await;
    let holds_poison = match backend {
        Backend::Postgres => "convert_from(NEW.state_payload, 'UTF8') LIKE '%poison%'",
        Backend::Sqlite => "CAST(NEW.state_payload AS TEXT) LIKE '%poison%'",
    };
    db.execute(&refuse_where_sql(backend, refusal, "durable_state", holds_poison));
    let users = UserStates::start(store.clone(), Config::default());
    let user = key("mall", "user");

    // All four queued before the restore ends: one round, one write.
    let answers = futures_util::future::join_all(
        ["a", "b", "poison", "c"].map(|product| users.send(user.clone(), view(product))),
    )
    .await;

    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(answers[1].is_ok(), "{:?}", answers[1]);
    assert!(
        matches!(&answers[2], Err(error @ CommandError::Unstorable { .. }) if !error.is_retryable()),
        "{:?}",
        answers[2]
    );
    let products = |state: &persist_durable::UserState| {
        state
            .recent_products
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        products(answers[3].as_ref().unwrap()),
        ["c", "b", "a"],
        "applied to the state before poison"
    );
    let stored = store.load(&user).await.unwrap().unwrap();
    assert_eq!(stored.revision, Revision(3));
    assert_eq!(products(&stored.state), ["c", "b", "a"]);
}
