//! What the library reports: metrics through the `metrics` facade, and a
//! span per command with the user and the revision it wrote.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use actix::Actor;
use common::metrics_snapshotter as snapshotter;
use common::{key, view, Backend, TestDb};
use metrics_util::debugging::DebugValue;
use persist_durable::{
    Command, Config, MemoryStore, Revision, StateStoreExt, UserCommand, UserState, UserStateManager,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// The counts since the previous snapshot: taking one drains the counters.
fn snapshot() -> Snapshot {
    snapshotter().snapshot().into_vec()
}

/// Held by each test that takes snapshots, or sends commands that one
/// counts: a snapshot drains the counts of every test running at the time.
static SNAPSHOTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn counter(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(key, ..)| {
            key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

#[actix::test]
async fn commands_are_counted_by_type_and_outcome() {
    recorded_spans(); // before any span is created in this binary: see recorded_spans
    let _alone = SNAPSHOTS.lock().await;
    snapshot();
    let store = Arc::new(MemoryStore::new());
    let manager = UserStateManager::new(store.clone(), Config::default().with_arbiters(0)).start();
    let user = key("mall001", "metrics");

    for id in ["p1", "p2", "p3"] {
        manager
            .send(UserCommand::new(user.clone(), view(id)))
            .await
            .unwrap()
            .unwrap();
    }
    manager
        .send(UserCommand::new(user.clone(), Command::GetUserState))
        .await
        .unwrap()
        .unwrap();
    store.set_unavailable(true);
    manager
        .send(UserCommand::new(user, Command::UseCart))
        .await
        .unwrap()
        .unwrap_err();

    let counts = snapshot();
    let commands = |command, outcome| {
        counter(
            &counts,
            "persist_durable_commands_total",
            &[("command", command), ("outcome", outcome)],
        )
    };
    assert_eq!(commands("view_product", "ok"), 3);
    assert_eq!(commands("get_user_state", "ok"), 1);
    assert_eq!(commands("use_cart", "store_unavailable"), 1);
    assert!(counter(&counts, "persist_durable_activations_total", &[]) >= 1);
}

#[actix::test]
async fn the_stores_restores_and_conflicts_are_counted_by_entity_type() {
    recorded_spans();
    let Some(db) = TestDb::open(Backend::Sqlite).await else {
        return;
    };
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), Config::default().with_arbiters(0)).start();
    let user = key("mall001", "store-metrics");
    let _alone = SNAPSHOTS.lock().await;
    snapshot();

    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    // Another writer moves the row on: the next write conflicts once, and
    // the actor restores the row again before it applies the command.
    let stored = store.load(&user).await.unwrap().unwrap();
    store
        .write(
            &user,
            stored.revision,
            Revision(stored.revision.0 + 1),
            &UserState::default(),
        )
        .await
        .unwrap();
    manager.send(UserCommand::new(user, view("p1"))).await.unwrap().unwrap();

    let counts = snapshot();
    let by_entity = [("entity", "UserState")];
    assert_eq!(counter(&counts, "persist_durable_conflicts_total", &by_entity), 1);
    // The actor's first restore, this test's own load, the actor's reload.
    assert_eq!(counter(&counts, "persist_durable_restores_total", &by_entity), 3);
}

/// What one `command` span recorded: its `key` (the user) and `revision`
/// fields, and the `outcome` of each event logged within it.
#[derive(Debug, Clone, Default)]
struct SpanFields {
    key: String,
    revision: Option<u64>,
    outcomes: Vec<String>,
}

/// Collects the fields of `command` spans.
#[derive(Clone, Default)]
struct CommandSpans(Arc<Mutex<Vec<SpanFields>>>);

struct Fields<'a>(&'a mut SpanFields);

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "revision" {
            self.0.revision = Some(value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            self.0.outcomes.push(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // The entity's key: for users, `mall-user`.
        if field.name() == "key" {
            self.0.key = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>> Layer<S> for CommandSpans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() == "command" {
            let mut fields = SpanFields::default();
            attrs.record(&mut Fields(&mut fields));
            // One lock for index and push: other tests create spans concurrently.
            let mut all = self.0.lock().unwrap();
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(all.len());
            }
            all.push(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(index) = ctx.span(id).and_then(|span| span.extensions().get::<usize>().copied()) else {
            return;
        };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[index]));
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let Some(index) = ctx
            .event_span(event)
            .and_then(|span| span.extensions().get::<usize>().copied())
        else {
            return;
        };
        event.record(&mut Fields(&mut self.0.lock().unwrap()[index]));
    }
}

/// The spans of every test in this binary. One global subscriber: tracing
/// caches per call site whether anyone listens, so a thread-local one set
/// while other tests run can miss spans.
fn recorded_spans() -> &'static CommandSpans {
    static SPANS: OnceLock<CommandSpans> = OnceLock::new();
    SPANS.get_or_init(|| {
        let spans = CommandSpans::default();
        let subscriber = tracing_subscriber::registry()
            .with(spans.clone())
            .with(tracing_subscriber::filter::LevelFilter::DEBUG);
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
        spans
    })
}

#[actix::test]
async fn each_command_has_a_span_with_the_user_and_the_revision_written() {
    let spans = recorded_spans();
    let manager = UserStateManager::new(Arc::new(MemoryStore::new()), Config::default().with_arbiters(0)).start();
    let user = key("mall001", "traced");

    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    manager
        .send(UserCommand::new(user, Command::UseCart))
        .await
        .unwrap()
        .unwrap();

    let traced = spans_of(spans, "mall001-traced");
    assert_eq!(
        traced.iter().map(|span| span.revision).collect::<Vec<_>>(),
        [Some(1), Some(2)],
        "{traced:?}"
    );
}

#[actix::test]
async fn each_answer_is_logged_within_its_commands_span_with_the_outcome() {
    let spans = recorded_spans();
    let store = Arc::new(MemoryStore::new());
    let manager = UserStateManager::new(store.clone(), Config::default().with_arbiters(0)).start();
    let user = key("mall001", "logged");
    // Its failed UseCart would count in commands_are_counted_by_type_and_outcome.
    let _alone = SNAPSHOTS.lock().await;

    manager
        .send(UserCommand::new(user.clone(), Command::UserLogin))
        .await
        .unwrap()
        .unwrap();
    store.set_unavailable(true);
    manager
        .send(UserCommand::new(user, Command::UseCart))
        .await
        .unwrap()
        .unwrap_err();

    let logged = spans_of(spans, "mall001-logged");
    assert_eq!(
        logged.iter().map(|span| span.outcomes.clone()).collect::<Vec<_>>(),
        [vec!["ok"], vec!["store_unavailable"]],
        "{logged:?}"
    );
}

/// The `command` spans recorded for the key shown as `key`.
fn spans_of(spans: &CommandSpans, key: &str) -> Vec<SpanFields> {
    let all = spans.0.lock().unwrap();
    all.iter().filter(|span| span.key.contains(key)).cloned().collect()
}
