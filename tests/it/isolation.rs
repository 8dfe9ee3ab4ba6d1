//! One entity's bad row never fails another entity's command: when the
//! database refuses a group-commit statement because of one row, the batch
//! is split until that row is alone, and every other row commits.

use std::time::Duration;

use crate::common::{key, test_store_config, Backend, TestDb};
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

/// A trigger refusing the culprit's row with a constraint violation, as the
/// store tells one row's refusal from the database's own failures: by what
/// the driver classifies, never by the message's words.
fn refuse_sql(backend: Backend, refused: Refused, persistence_id: &str) -> String {
    let table = match refused {
        Refused::State => "durable_state",
        Refused::Feed => "state_changes",
    };
    match backend {
        Backend::Postgres => format!(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
               IF NEW.persistence_id = '{persistence_id}' THEN \
                 RAISE EXCEPTION 'refused by policy' USING ERRCODE = 'check_violation'; END IF; \
               RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION refuse();"
        ),
        // SQLite's RAISE reports no constraint kind: the trigger trips a CHECK.
        Backend::Sqlite => format!(
            "CREATE TABLE refusals (allowed INTEGER CHECK (allowed > 0)); \
             CREATE TRIGGER refuse_insert BEFORE INSERT ON {table} WHEN NEW.persistence_id = '{persistence_id}' \
               BEGIN INSERT INTO refusals VALUES (0); END; \
             CREATE TRIGGER refuse_update BEFORE UPDATE ON {table} WHEN NEW.persistence_id = '{persistence_id}' \
               BEGIN INSERT INTO refusals VALUES (0); END;"
        ),
    }
}

/// A trigger failing the culprit's row with an error the driver does not
/// classify (`RAISE EXCEPTION`'s P0001), in words that are not English.
fn fail_unclassified_sql(persistence_id: &str) -> String {
    format!(
        "CREATE FUNCTION fail() RETURNS trigger AS $$ BEGIN \
           IF NEW.persistence_id = '{persistence_id}' THEN RAISE EXCEPTION 'Zeitüberschreitung der Anweisung'; END IF; \
           RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER fail BEFORE INSERT OR UPDATE ON durable_state FOR EACH ROW EXECUTE FUNCTION fail();"
    )
}

#[rstest]
#[actix::test]
async fn a_row_the_database_refuses_fails_only_its_own_command(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[values(Refused::State, Refused::Feed)] refused: Refused,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    // A long batch wait: every write below lands in one statement.
    let config = test_store_config()
        .with_change_feed(matches!(refused, Refused::Feed))
        .with_max_batch_wait(Duration::from_millis(200));
    let store = db.connect_with(config).await;
    let culprit = key("mall", "culprit");
    db.execute(&refuse_sql(backend, refused, culprit.persistence_id().as_str()));
    let users = UserStates::start(store.clone(), Config::default());
    let healthy: Vec<UserKey> = (0..40).map(|i| key("mall", &format!("user{i:02}"))).collect();
    // Restored first, so that the logins below meet in one write batch.
    let everyone = healthy.iter().chain([&culprit]);
    for restored in futures_util::future::join_all(everyone.map(|u| users.send(u.clone(), Command::GetUserState))).await
    {
        restored.unwrap();
    }
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

/// Before, any error whose message held none of twelve English phrases was
/// taken for a row's refusal: on a server with another `lc_messages` a timed
/// out batch of 512 rows was split into 1,023 statements. Now an error the
/// driver does not classify as a constraint is never split.
#[actix::test]
async fn an_error_the_driver_does_not_classify_fails_the_batch_without_splitting_it() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let config = test_store_config().with_max_batch_wait(Duration::from_millis(200));
    let store = db.connect_with(config).await;
    let culprit = key("mall", "culprit");
    db.execute(&fail_unclassified_sql(culprit.persistence_id().as_str()));
    let users = UserStates::start(store.clone(), Config::default());
    let everyone: Vec<UserKey> = (0..40)
        .map(|i| key("mall", &format!("user{i:02}")))
        .chain([culprit])
        .collect();
    for restored in
        futures_util::future::join_all(everyone.iter().map(|u| users.send(u.clone(), Command::GetUserState))).await
    {
        restored.unwrap();
    }
    let statements_before = store.stats().write_statements;

    let answers =
        futures_util::future::join_all(everyone.iter().map(|u| users.send(u.clone(), Command::UserLogin))).await;

    assert_eq!(
        store.stats().write_statements - statements_before,
        1,
        "one statement, not split"
    );
    for (user, answer) in everyone.iter().zip(&answers) {
        assert!(
            matches!(answer, Err(CommandError::StoreUnavailable { .. })),
            "{user}: the database's failure fails the batch: {answer:?}"
        );
        assert!(store.load(user).await.unwrap().is_none(), "{user}: nothing committed");
    }
}
