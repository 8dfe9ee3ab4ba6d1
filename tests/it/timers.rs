//! Durable timers, as an application uses them: an entity's state says
//! which timers it wants, each is committed with the state that wants it,
//! and fires its command through the ordinary path, once in effect.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use persist_durable::testkit::{t0, TestEntities, TestStore};
use persist_durable::{
    Command, CommandError, Config, DurableEntity, Entities, Id, Missed, Schedule, StatePolicy, StateStoreExt,
    StoreError, Timer, TimerError, UserKey, UserState,
};
use rstest::rstest;
use serde::{Deserialize, Serialize};

use crate::common::{postgres_admin_url, Backend, TestDb};

/// An entity that wants the timers it was told to want, and records each
/// ring: what a timer delivers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Alarm {
    wanted: Vec<Wanted>,
    /// Each ring, with the time it was applied at.
    rang: Vec<(String, DateTime<Utc>)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Wanted {
    name: String,
    when: When,
    delivers: AlarmCommand,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum When {
    At(DateTime<Utc>),
    Every {
        first: DateTime<Utc>,
        period_ms: u64,
        missed: u8,
    },
    Cron(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum AlarmCommand {
    Want(Box<Wanted>),
    Forget(String),
    Ring(String),
    /// Changes nothing.
    Ignore,
    /// Refused by the domain.
    Refuse,
    /// Panics in `apply`.
    Explode,
    /// Does not encode as JSON (a map whose keys are not strings).
    Unencodable(BTreeMap<(u8, u8), u8>),
    /// Stands for `Unencodable` in a state (which must encode): a timer
    /// delivering it delivers `Unencodable`.
    UnencodableLater,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("refused")]
struct Refused;

impl DurableEntity for Alarm {
    const ENTITY_TYPE: &'static str = "Alarm";
    const MANIFEST: &'static str = "Alarm/v1";
    type Key = Id<Alarm>;
    type Command = AlarmCommand;
    type Settings = ();
    type Rejection = Refused;

    fn apply(&self, command: &AlarmCommand, at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Refused> {
        let mut next = self.clone();
        match command {
            AlarmCommand::Want(wanted) => {
                next.wanted.retain(|w| w.name != wanted.name);
                next.wanted.push((**wanted).clone());
            }
            AlarmCommand::Forget(name) => next.wanted.retain(|w| &w.name != name),
            AlarmCommand::Ring(name) => next.rang.push((name.clone(), at)),
            AlarmCommand::Ignore | AlarmCommand::Unencodable(_) | AlarmCommand::UnencodableLater => return Ok(None),
            AlarmCommand::Refuse => return Err(Refused),
            AlarmCommand::Explode => panic!("the alarm exploded"),
        }
        Ok(Some(next))
    }

    fn timers(&self, _: &()) -> Vec<Timer<AlarmCommand>> {
        let delivered = |command: &AlarmCommand| match command {
            AlarmCommand::UnencodableLater => AlarmCommand::Unencodable(BTreeMap::from([((1, 2), 3)])),
            other => other.clone(),
        };
        self.wanted
            .iter()
            .map(|w| match &w.when {
                When::At(due) => Timer::at(&w.name, *due, delivered(&w.delivers)),
                When::Every {
                    first,
                    period_ms,
                    missed,
                } => {
                    let missed = [Missed::Once, Missed::EveryOne, Missed::Skip][usize::from(*missed)];
                    Timer::every(&w.name, *first, Duration::from_millis(*period_ms), w.delivers.clone()).missed(missed)
                }
                When::Cron(expression) => Timer::cron(&w.name, expression, w.delivers.clone()),
            })
            .collect()
    }
}

fn alarm(id: &str) -> Id<Alarm> {
    Id::new(id).unwrap()
}

fn ring_at(name: &str, due: DateTime<Utc>) -> AlarmCommand {
    want(name, When::At(due), AlarmCommand::Ring(name.into()))
}

fn want(name: &str, when: When, delivers: AlarmCommand) -> AlarmCommand {
    AlarmCommand::Want(Box::new(Wanted {
        name: name.into(),
        when,
        delivers,
    }))
}

fn hours(n: i64) -> chrono::Duration {
    chrono::Duration::hours(n)
}

/// A throwaway store of `backend` for the testkit.
async fn store(backend: Backend) -> Option<TestStore> {
    match backend {
        Backend::Sqlite => Some(TestStore::sqlite().await.unwrap()),
        Backend::Postgres => Some(TestStore::postgres(&postgres_admin_url()?).await.unwrap()),
    }
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn a_timer_fires_its_command_once_at_its_due_time_not_before(#[case] backend: Backend) {
    let Some(store) = store(backend).await else { return };
    let alarms = TestEntities::<Alarm>::start(&store);
    let wake = alarm("wake");
    alarms
        .send(wake.clone(), ring_at("morning", t0() + hours(24)))
        .await
        .unwrap();

    let pending = alarms.timers(&wake).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].name.as_str(), pending[0].due),
        ("morning", t0() + hours(24))
    );
    assert_eq!(pending[0].command, AlarmCommand::Ring("morning".into()));

    alarms.advance(Duration::from_secs(23 * 3600 + 3599)).await;
    let early = alarms.send(wake.clone(), AlarmCommand::Ignore).await.unwrap();
    assert!(early.rang.is_empty(), "not a second early: {early:?}");

    alarms.advance(Duration::from_secs(1)).await;
    let rung = alarms.send(wake.clone(), AlarmCommand::Ignore).await.unwrap();
    // Applied at the time it was due.
    assert_eq!(rung.rang, [("morning".to_owned(), t0() + hours(24))]);
    assert!(
        alarms.timers(&wake).await.unwrap().is_empty(),
        "a one-shot timer is gone once fired"
    );
    assert_eq!(
        store.row(&wake).await.unwrap().unwrap().revision.0,
        2,
        "set, then fired: two revisions"
    );

    alarms.advance(Duration::from_secs(48 * 3600)).await;
    let later = alarms.send(wake.clone(), AlarmCommand::Ignore).await.unwrap();
    assert_eq!(
        later.rang.len(),
        1,
        "fired once: the state still wants it, alike, and it is not set again"
    );
}

/// A fire reaches a passivated entity through the ordinary path: restored first.
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn a_timer_fires_on_a_passivated_entity_which_is_restored_first(#[case] backend: Backend) {
    let Some(store) = store(backend).await else { return };
    let alarms = TestEntities::<Alarm>::start(&store);
    let nap = alarm("nap");
    alarms.send(nap.clone(), ring_at("up", t0() + hours(2))).await.unwrap();
    alarms.advance(Duration::from_secs(3600)).await;
    alarms.until_passivated(&nap).await;

    alarms.advance(Duration::from_secs(3600)).await;

    let state = store.row(&nap).await.unwrap().unwrap();
    assert_eq!(state.revision.0, 2);
    assert_eq!(state.payload["rang"][0][0], "up");
}

/// Set, moved and cancelled with the state: a transition that no longer
/// wants a timer cancels it, one that wants it at another time moves it,
/// and the handle cancels one directly.
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn timers_are_moved_and_cancelled_by_the_state_and_by_the_handle(#[case] backend: Backend) {
    let Some(store) = store(backend).await else { return };
    let alarms = TestEntities::<Alarm>::start(&store);
    let a = alarm("a");
    alarms.send(a.clone(), ring_at("moved", t0() + hours(1))).await.unwrap();
    alarms
        .send(a.clone(), ring_at("forgotten", t0() + hours(1)))
        .await
        .unwrap();
    alarms
        .send(a.clone(), ring_at("cancelled", t0() + hours(1)))
        .await
        .unwrap();

    alarms.send(a.clone(), ring_at("moved", t0() + hours(3))).await.unwrap();
    alarms
        .send(a.clone(), AlarmCommand::Forget("forgotten".into()))
        .await
        .unwrap();
    assert!(alarms.cancel_timer(&a, "cancelled").await.unwrap());
    assert!(!alarms.cancel_timer(&a, "cancelled").await.unwrap(), "no longer there");

    let names: Vec<(String, DateTime<Utc>)> = alarms
        .timers(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.due))
        .collect();
    assert_eq!(names, [("moved".to_owned(), t0() + hours(3))]);
    alarms.advance(Duration::from_secs(2 * 3600)).await;
    assert!(alarms
        .send(a.clone(), AlarmCommand::Ignore)
        .await
        .unwrap()
        .rang
        .is_empty());
    alarms.advance(Duration::from_secs(3600)).await;
    let rang = alarms.send(a.clone(), AlarmCommand::Ignore).await.unwrap().rang;
    assert_eq!(rang, [("moved".to_owned(), t0() + hours(3))]);
}

/// A recurring timer catches up on what it missed as its policy says:
/// once, every one, or none (each counted by the rings applied).
#[rstest]
#[case::once(Missed::Once, 1)]
#[case::every_one(Missed::EveryOne, 3)]
#[case::skip(Missed::Skip, 0)]
#[actix::test]
async fn a_recurring_timer_catches_up_on_missed_occurrences_as_its_policy_says(
    #[case] missed: Missed,
    #[case] rings: usize,
) {
    let store = TestStore::sqlite().await.unwrap();
    let alarms = TestEntities::<Alarm>::start(&store);
    let hourly = alarm("hourly");
    let code = match missed {
        Missed::Once => 0,
        Missed::EveryOne => 1,
        _ => 2,
    };
    let every_hour = When::Every {
        first: t0() + hours(1),
        period_ms: 3_600_000,
        missed: code,
    };
    alarms
        .send(
            hourly.clone(),
            want("tick", every_hour, AlarmCommand::Ring("tick".into())),
        )
        .await
        .unwrap();

    // Three occurrences (1h, 2h, 3h) pass in one step: all but the last missed.
    alarms.advance(Duration::from_secs(3 * 3600 + 1800)).await;

    let state = alarms.send(hourly.clone(), AlarmCommand::Ignore).await.unwrap();
    assert_eq!(state.rang.len(), rings, "{missed:?}: {:?}", state.rang);
    let next = alarms.timers(&hourly).await.unwrap();
    assert_eq!(next[0].due, t0() + hours(4), "goes on from the next occurrence to come");
    assert!(matches!(next[0].schedule, Schedule::Every { .. }));
}

/// On time, a recurring timer fires every occurrence, and a cron timer at
/// each time its expression names.
#[actix::test]
async fn recurring_and_cron_timers_fire_each_occurrence_on_time() {
    let store = TestStore::sqlite().await.unwrap();
    let alarms = TestEntities::<Alarm>::start(&store);
    let a = alarm("a");
    let every_ten_minutes = When::Every {
        first: t0() + chrono::Duration::minutes(10),
        period_ms: 600_000,
        missed: 0,
    };
    alarms
        .send(
            a.clone(),
            want("ten", every_ten_minutes, AlarmCommand::Ring("ten".into())),
        )
        .await
        .unwrap();
    // t0 is 00:00 on 2026-01-01: "at minute 30 of every hour".
    alarms
        .send(
            a.clone(),
            want(
                "half",
                When::Cron("30 * * * *".into()),
                AlarmCommand::Ring("half".into()),
            ),
        )
        .await
        .unwrap();

    for _ in 0..12 {
        alarms.advance(Duration::from_secs(600)).await;
    }

    let rang = alarms.send(a.clone(), AlarmCommand::Ignore).await.unwrap().rang;
    let count = |name: &str| rang.iter().filter(|(n, _)| n == name).count();
    assert_eq!((count("ten"), count("half")), (12, 2), "{rang:?}");
    let halves: Vec<DateTime<Utc>> = rang.iter().filter(|(n, _)| n == "half").map(|(_, at)| *at).collect();
    assert_eq!(
        halves,
        [
            t0() + chrono::Duration::minutes(30),
            t0() + chrono::Duration::minutes(90)
        ]
    );
}

/// Whatever the fire's command does (nothing, a refusal, a panic), its
/// timer is consumed in a revision of its own: it never fires again.
#[rstest]
#[case::a_no_op(AlarmCommand::Ignore)]
#[case::a_refusal(AlarmCommand::Refuse)]
#[case::a_panic(AlarmCommand::Explode)]
#[actix::test]
async fn a_fire_whose_command_changes_nothing_still_consumes_its_timer(#[case] delivers: AlarmCommand) {
    let store = TestStore::sqlite().await.unwrap();
    let alarms = TestEntities::<Alarm>::start(&store);
    let a = alarm("a");
    alarms
        .send(a.clone(), want("dud", When::At(t0() + hours(1)), delivers))
        .await
        .unwrap();

    alarms.advance(Duration::from_secs(3600)).await;
    alarms.advance(Duration::from_secs(3600)).await;

    assert!(alarms.timers(&a).await.unwrap().is_empty());
    assert_eq!(
        store.row(&a).await.unwrap().unwrap().revision.0,
        2,
        "one revision for the fire"
    );
    let state = alarms.send(a.clone(), AlarmCommand::Ignore).await.unwrap();
    assert_eq!(state.wanted.len(), 1, "the state is as it was");
}

/// Bad input gets a typed error and stores nothing: a cron expression that
/// does not parse, a due time out of range, a command that does not encode,
/// a name given twice.
#[rstest]
#[case::cron(When::Cron("every tuesday".into()), AlarmCommand::Ignore, "cron")]
#[case::out_of_range(When::At(DateTime::<Utc>::MAX_UTC), AlarmCommand::Ignore, "due")]
#[case::unencodable(When::At(t0()), AlarmCommand::UnencodableLater, "command")]
#[case::zero_period(When::Every { first: t0(), period_ms: 0, missed: 0 }, AlarmCommand::Ignore, "period")]
#[actix::test]
async fn a_state_wanting_a_timer_that_cannot_be_stored_fails_its_command_and_stores_nothing(
    #[case] when: When,
    #[case] delivers: AlarmCommand,
    #[case] what: &str,
) {
    let store = TestStore::sqlite().await.unwrap();
    let alarms = TestEntities::<Alarm>::start(&store);
    let a = alarm("a");
    alarms.send(a.clone(), ring_at("good", t0() + hours(1))).await.unwrap();

    let refused = alarms.send(a.clone(), want("bad", when, delivers)).await;

    let Err(CommandError::InvalidTimer { source, .. }) = &refused else {
        panic!("{what}: {refused:?}")
    };
    let matches_kind = match what {
        "cron" => matches!(source, TimerError::Cron { .. }),
        "due" => matches!(source, TimerError::DueOutOfRange { .. }),
        "command" => matches!(source, TimerError::Command { .. }),
        _ => matches!(source, TimerError::Period { .. }),
    };
    assert!(matches_kind, "{what}: {source:?}");
    assert!(!refused.as_ref().unwrap_err().is_retryable());
    assert_eq!(
        store.row(&a).await.unwrap().unwrap().revision.0,
        1,
        "nothing of it stored"
    );
    let names: Vec<String> = alarms.timers(&a).await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["good"]);
    // The entity goes on.
    alarms
        .send(a.clone(), AlarmCommand::Ring("by hand".into()))
        .await
        .unwrap();
}

/// Queued together, only the command whose state wants a bad timer fails:
/// the others commit, each with its timers.
#[actix::test]
async fn a_bad_timer_fails_only_the_command_that_wanted_it() {
    let store = TestStore::sqlite().await.unwrap();
    let alarms = TestEntities::<Alarm>::start(&store);
    let a = alarm("a");
    let sends = [
        alarms.send(a.clone(), ring_at("first", t0() + hours(1))),
        alarms.send(
            a.clone(),
            want("bad", When::Cron("nonsense".into()), AlarmCommand::Ignore),
        ),
        alarms.send(a.clone(), ring_at("third", t0() + hours(2))),
    ];

    let [first, bad, third] = futures_util::future::join_all(sends).await.try_into().unwrap();

    assert!(first.is_ok() && third.is_ok(), "{first:?} {third:?}");
    assert!(matches!(bad, Err(CommandError::InvalidTimer { .. })), "{bad:?}");
    let names: Vec<String> = alarms.timers(&a).await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["first", "third"]);
}

/// Erasing an entity erases its timers (their commands may hold its data).
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn deleting_a_user_deletes_their_timers(#[case] backend: Backend) {
    let Some(store) = store(backend).await else { return };
    let users = TestEntities::<UserState>::start_with(
        &store,
        Config::default(),
        StatePolicy::default().with_cart_reminder(Duration::from_secs(3600)),
    );
    let ada = UserKey::new("mall", "ada").unwrap();
    users.send(ada.clone(), Command::UseCart).await.unwrap();
    assert_eq!(users.timers(&ada).await.unwrap().len(), 1);

    users.send(ada.clone(), Command::DeleteUser).await.unwrap();

    assert!(users.timers(&ada).await.unwrap().is_empty());
    users.advance(Duration::from_secs(2 * 3600)).await;
    let state = users.send(ada.clone(), Command::GetUserState).await.unwrap();
    assert_eq!(state, UserState::default(), "nothing fired on the erased user");
}

/// The user state's cart reminder: a user who used the cart and was not
/// seen for the reminder's delay gets `CartAbandoned`; every event moves it.
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn a_user_who_leaves_a_cart_gets_the_cart_abandoned_reminder_once(#[case] backend: Backend) {
    let Some(store) = store(backend).await else { return };
    let policy = StatePolicy::default().with_cart_reminder(Duration::from_secs(24 * 3600));
    let users = TestEntities::<UserState>::start_with(&store, Config::default(), policy);
    let ada = UserKey::new("mall", "ada").unwrap();
    users.send(ada.clone(), Command::UseCart).await.unwrap();
    users.advance(Duration::from_secs(20 * 3600)).await;
    // Seen again: the reminder moves to 24 hours after this.
    users.send(ada.clone(), Command::UserLogin).await.unwrap();

    users.advance(Duration::from_secs(20 * 3600)).await;
    let state = users.send(ada.clone(), Command::GetUserState).await.unwrap();
    assert!(!state.cart_abandoned, "not yet: seen 20 hours ago");
    let pending = users.timers(&ada).await.unwrap();
    assert_eq!(pending[0].due, t0() + hours(44), "24 hours after the login");

    users.advance(Duration::from_secs(4 * 3600)).await;
    assert!(
        users
            .send(ada.clone(), Command::GetUserState)
            .await
            .unwrap()
            .cart_abandoned
    );
    assert!(users.timers(&ada).await.unwrap().is_empty(), "reminded once");
    let revision = store.row(&ada).await.unwrap().unwrap().revision;
    users.advance(Duration::from_secs(48 * 3600)).await;
    assert_eq!(store.row(&ada).await.unwrap().unwrap().revision, revision, "not again");

    // Using the cart again sets it again.
    users.send(ada.clone(), Command::UseCart).await.unwrap();
    assert!(
        !users
            .send(ada.clone(), Command::GetUserState)
            .await
            .unwrap()
            .cart_abandoned
    );
    assert_eq!(users.timers(&ada).await.unwrap().len(), 1);
}

/// Two nodes without cluster mode both fire every timer they read: each
/// fire applies once, the other's write commits nothing.
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn two_nodes_firing_the_same_timers_apply_each_once(#[case] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let (store_a, store_b) = (db.connect().await, db.connect().await);
    let config = Config::default().with_arbiters(1);
    let a = Entities::<Alarm>::start(store_a.clone(), config.clone());
    let due = Utc::now() + chrono::Duration::milliseconds(300);
    for i in 0..40 {
        a.send(alarm(&format!("a{i}")), ring_at("go", due)).await.unwrap();
    }
    // b reads the same due timers; a holds them since it set them.
    let b = Entities::<Alarm>::start(store_b.clone(), config);

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for i in 0..40 {
        let key = alarm(&format!("a{i}"));
        while store_a.load(&key).await.unwrap().unwrap().revision.0 < 2 {
            assert!(std::time::Instant::now() < deadline, "{key} did not fire within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for i in 0..40 {
        let key = alarm(&format!("a{i}"));
        let stored = store_b.load(&key).await.unwrap().unwrap();
        assert_eq!(stored.state.rang.len(), 1, "{key}: fired once");
        assert_eq!(stored.revision.0, 2, "{key}: one revision for the fire");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// At the store: a write that commits a fire commits nothing once its timer
/// is gone (fired elsewhere, moved or cancelled).
#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[actix::test]
async fn a_fire_whose_timer_is_gone_commits_nothing(#[case] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let alarms = Entities::<Alarm>::start(store.clone(), Config::default().with_timers(None));
    let a = alarm("a");
    alarms.send(a.clone(), ring_at("once", t0())).await.unwrap();
    assert!(alarms.cancel_timer(&a, "once").await.unwrap());
    let fired = persist_durable::WriteRow {
        key: persist_durable::EntityKey::persistence_id(&a),
        manifest: Alarm::MANIFEST,
        expected: persist_durable::Revision(1),
        generation: None,
        revision: persist_durable::Revision(2),
        schema_version: 1,
        payloads: vec![br#"{"wanted":[],"rang":[]}"#.to_vec()],
        erases: false,
        fence: None,
        timers: Vec::new(),
        fired: Some(persist_durable::TimerFired {
            name: "once".into(),
            due: t0(),
            next: None,
        }),
    };

    let written = store.write_row(fired).await;

    assert!(matches!(written, Err(StoreError::TimerGone { .. })), "{written:?}");
    assert_eq!(store.load(&a).await.unwrap().unwrap().revision.0, 1, "nothing written");
}

/// In cluster mode each timer is fired by its entity's owner alone: every
/// one fires once, and no write of a node that does not own the slice commits.
#[actix::test]
async fn in_cluster_mode_each_timer_is_fired_once_by_its_owner() {
    let Some(db) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let (store_a, store_b) = (db.connect().await, db.connect().await);
    let a = persist_durable::Cluster::join(store_a.clone(), crate::cluster::quick("a", "http://127.0.0.1:1"))
        .await
        .unwrap();
    let b = persist_durable::Cluster::join(store_b.clone(), crate::cluster::quick("b", "http://127.0.0.1:2"))
        .await
        .unwrap();
    crate::cluster::eventually("the slices to be shared", || {
        a.stats().slices_owned + b.stats().slices_owned == 1024 && b.stats().slices_owned > 0
    })
    .await;
    let config =
        |cluster: &persist_durable::Cluster| Config::default().with_cluster(cluster.clone()).without_forwarding();
    let on_a = Entities::<Alarm>::start(store_a.clone(), config(&a));
    let on_b = Entities::<Alarm>::start(store_b.clone(), config(&b));
    let due = Utc::now() + chrono::Duration::milliseconds(300);
    let keys: Vec<Id<Alarm>> = (0..40).map(|i| alarm(&format!("c{i}"))).collect();
    for key in &keys {
        let slice = persist_durable::EntityKey::persistence_id(key).slice();
        let owner = if a.owns(slice) { &on_a } else { &on_b };
        owner.send(key.clone(), ring_at("go", due)).await.unwrap();
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for key in &keys {
        while store_a.load(key).await.unwrap().unwrap().revision.0 < 2 {
            assert!(std::time::Instant::now() < deadline, "{key} did not fire within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    for key in &keys {
        let stored = store_a.load(key).await.unwrap().unwrap();
        assert_eq!(
            (stored.revision.0, stored.state.rang.len()),
            (2, 1),
            "{key}: fired once"
        );
    }
    assert_eq!(
        a.stats().writes_fenced + b.stats().writes_fenced,
        0,
        "no node wrote for a slice it does not own"
    );
    on_a.stop().await.unwrap();
    on_b.stop().await.unwrap();
    b.leave().await.unwrap();
    a.leave().await.unwrap();
}
