//! A key reaches the store only if its entity id reads back as it: a key
//! type whose constructor skips validation (an empty id) is refused with a
//! typed error before anything is written, so `entity_keys` and every feed
//! reader of its type never meet a row they cannot decode.

use std::convert::Infallible;

use crate::common::{Backend, TestDb};
use chrono::{DateTime, Utc};
use persist_durable::{
    CommandError, Config, DurableEntity, Entities, EntityKey, InvalidInput, MaintenanceExt, Revision, StateStoreExt,
    StoreError,
};
use rstest::rstest;
use serde::{Deserialize, Serialize};

/// A key whose constructor validates nothing, as the README's counter key did.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LooseId(String);

impl std::fmt::Display for LooseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EntityKey for LooseId {
    type Entity = Tally;
    fn entity_id(&self) -> String {
        self.0.clone()
    }
    fn from_entity_id(id: &str) -> Result<Self, InvalidInput> {
        persist_durable::validate_id("tally id", id).map(|()| LooseId(id.to_owned()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    value: i64,
}

impl DurableEntity for Tally {
    const ENTITY_TYPE: &'static str = "Tally";
    const MANIFEST: &'static str = "Tally/v1";
    type Key = LooseId;
    type Command = i64;
    type Settings = ();
    type Rejection = Infallible;

    fn apply(&self, add: &i64, _at: DateTime<Utc>, _: &()) -> Result<Option<Self>, Infallible> {
        Ok(Some(Tally {
            value: self.value + add,
        }))
    }
}

#[rstest]
#[actix::test]
async fn a_key_that_does_not_read_back_is_refused_before_the_store(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let tallies = Entities::<Tally>::start(store.clone(), Config::default());

    let refused = tallies.send(LooseId(String::new()), 1).await;
    let control = tallies.send(LooseId("a\nb".into()), 1).await;

    for answer in [&refused, &control] {
        assert!(
            matches!(answer, Err(error @ CommandError::InvalidKey { source: InvalidInput::EmptyId { .. } | InvalidInput::ControlCharacter { .. }, .. }) if !error.is_retryable()),
            "{answer:?}"
        );
    }
    let written = store
        .write(&LooseId(String::new()), Revision::NONE, Revision(1), &Tally::default())
        .await;
    assert!(matches!(written, Err(StoreError::InvalidKey { .. })), "{written:?}");
    tallies.send(LooseId("fine".into()), 2).await.unwrap();
    assert_eq!(store.count::<Tally>().await.unwrap(), 1, "only the valid key has a row");
    assert_eq!(
        store.entity_keys::<LooseId>(None, 10).await.unwrap(),
        [LooseId("fine".into())]
    );
}
