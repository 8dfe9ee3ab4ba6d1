//! A state the entity's own serializer refuses: the command that made it
//! fails with the encoding error, nothing of it is committed (nor of the
//! commands that shared its write), and the entity goes on from its stored
//! state, on each database.

use std::collections::BTreeMap;
use std::convert::Infallible;

use crate::common::{test_store_config, Backend, TestDb};
use chrono::{DateTime, Utc};
use persist_durable::{
    CommandError, Config, DurableEntity, Entities, EntityFeed, Id, Revision, StateStoreExt, StoreError,
};
use rstest::rstest;
use serde::{Deserialize, Serialize};

/// The ready validated key: `LedgerId::new("...")`.
type LedgerId = Id<Ledger>;

/// Entries keyed by a pair: JSON objects take string keys only, so a ledger
/// with an entry cannot be encoded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Ledger {
    count: u32,
    #[serde(default)]
    entries: BTreeMap<(u8, u8), u32>,
}

#[derive(Debug, Clone)]
enum LedgerCommand {
    Count,
    AddEntry,
}

impl DurableEntity for Ledger {
    const ENTITY_TYPE: &'static str = "Ledger";
    const MANIFEST: &'static str = "Ledger";
    type Key = LedgerId;
    type Command = LedgerCommand;
    type Settings = ();
    type Rejection = Infallible;

    fn apply(&self, command: &LedgerCommand, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
        let mut next = self.clone();
        match command {
            LedgerCommand::Count => next.count += 1,
            LedgerCommand::AddEntry => {
                next.entries.insert((1, 2), 3);
            }
        }
        Ok(Some(next))
    }
}

/// The answer of a command whose state could not be encoded: unstorable,
/// which no retry cures.
fn is_encoding_failure(answer: &Result<Ledger, CommandError<Ledger>>) -> bool {
    matches!(
        answer,
        Err(error @ CommandError::Unstorable {
            source: StoreError::Encode { .. },
            ..
        }) if !error.is_retryable()
    )
}

#[rstest]
#[case::without_change_feed(false)]
#[case::with_change_feed(true)]
#[actix::test]
async fn a_state_that_cannot_be_encoded_fails_its_command_and_commits_nothing(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[case] change_feed: bool,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(change_feed)).await;
    let ledgers = Entities::<Ledger>::start(store.clone(), Config::default());
    let ledger = LedgerId::new("l1").unwrap();
    ledgers.send(ledger.clone(), LedgerCommand::Count).await.unwrap();

    let refused = ledgers.send(ledger.clone(), LedgerCommand::AddEntry).await;

    assert!(
        is_encoding_failure(&refused),
        "expected the encoding error, got {refused:?}"
    );
    let stored = store.load(&ledger).await.unwrap().expect("the first count is stored");
    assert_eq!(
        stored.revision,
        Revision(1),
        "nothing of the refused state is committed"
    );
    assert_eq!(stored.state.count, 1);
    let after = ledgers.send(ledger.clone(), LedgerCommand::Count).await.unwrap();
    assert_eq!(after.count, 2, "the entity goes on from its stored state");
    assert!(after.entries.is_empty());
    assert_eq!(store.load(&ledger).await.unwrap().unwrap().revision, Revision(2));
}

#[rstest]
#[case::without_change_feed(false)]
#[case::with_change_feed(true)]
#[actix::test]
async fn only_the_command_whose_state_cannot_be_encoded_fails_and_those_sharing_its_write_commit(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[case] change_feed: bool,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect_with(test_store_config().with_change_feed(change_feed)).await;
    let ledgers = Entities::<Ledger>::start(store.clone(), Config::default());
    let ledger = LedgerId::new("l2").unwrap();

    // Queued together while the new entity restores, so applied in one round.
    let (first, entry, last) = tokio::join!(
        ledgers.send(ledger.clone(), LedgerCommand::Count),
        ledgers.send(ledger.clone(), LedgerCommand::AddEntry),
        ledgers.send(ledger.clone(), LedgerCommand::Count),
    );

    assert_eq!(first.unwrap().count, 1);
    assert!(
        is_encoding_failure(&entry),
        "the entry's state cannot be stored: {entry:?}"
    );
    let last = last.unwrap();
    assert_eq!(last.count, 2, "applied to the state before the refused entry");
    assert!(last.entries.is_empty());
    let stored = store.load(&ledger).await.unwrap().expect("the counts are committed");
    assert_eq!((stored.revision, stored.state.count), (Revision(2), 2));
    if change_feed {
        let changes = EntityFeed::<Ledger>::from_position(store.clone(), 0)
            .next_batch()
            .await
            .unwrap();
        let counts: Vec<(u64, u32)> = changes.iter().map(|c| (c.revision.0, c.state.count)).collect();
        assert_eq!(counts, [(1, 1), (2, 2)], "the feed has the two counts, not the entry");
    }
}
