//! Hostile input: any id or JSON either is accepted and round-trips, or gets
//! a typed error; nothing panics; ids built to collide never share state.

use crate::common::{Backend, TestDb};
use actix::Actor;
use persist_durable::{
    Command, Config, EntityKey, Event, EventId, InvalidInput, ProductId, StateStoreExt, UserCommand, UserKey,
    UserStateManager, MAX_ID_BYTES,
};
use proptest::prelude::*;
use rstest::rstest;

fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

/// Ids near the edges: empty, long, with controls, dashes, percents and non-ASCII.
fn hostile_id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z%-]{0,6}",
        "\\PC{120,140}",
        Just(String::new()),
        "[a-z]{1,5}[\\x00-\\x1f\\x7f][a-z]{0,5}",
    ]
}

/// JSON shaped like commands, with wrong types, unknown names and hostile values.
fn command_like_json() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("user_login".to_owned()),
        Just("use_cart".to_owned()),
        Just("view_product".to_owned()),
        Just("set_marketing_opt_in".to_owned()),
        Just("get_user_state".to_owned()),
        "[a-z_]{0,12}",
    ];
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        hostile_id().prop_map(serde_json::Value::from),
    ];
    (kind, value.clone(), value.clone(), value).prop_map(|(kind, product, opt_in, event_time)| {
        serde_json::json!({
            "type": kind,
            "product_id": product,
            "opt_in": opt_in,
            "event_time": event_time,
        })
        .to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_key_is_accepted_and_round_trips_or_gets_a_typed_error(mall in hostile_id(), user in hostile_id()) {
        match UserKey::new(mall.clone(), user.clone()) {
            Ok(key) => {
                prop_assert!(acceptable(&mall) && acceptable(&user));
                prop_assert_eq!((key.mall_id(), key.user_id()), (mall.as_str(), user.as_str()));
                let json = serde_json::to_string(&key).unwrap();
                prop_assert_eq!(serde_json::from_str::<UserKey>(&json).unwrap(), key);
            }
            Err(error) => {
                prop_assert!(!acceptable(&mall) || !acceptable(&user));
                let typed = matches!(
                    error,
                    InvalidInput::EmptyId { .. } | InvalidInput::IdTooLong { .. } | InvalidInput::ControlCharacter { .. }
                );
                prop_assert!(typed, "{:?}", error);
            }
        }
    }

    #[test]
    fn any_product_or_event_id_is_accepted_or_gets_a_typed_error(id in hostile_id()) {
        prop_assert_eq!(ProductId::new(id.clone()).is_ok(), acceptable(&id));
        prop_assert_eq!(EventId::new(id.clone()).is_ok(), acceptable(&id));
    }

    #[test]
    fn any_text_decodes_to_an_event_that_round_trips_or_gets_a_typed_error(json in any::<String>()) {
        if let Ok(event) = Event::from_json(&json) {
            let again = Event::from_json(&serde_json::to_string(&event).unwrap()).unwrap();
            prop_assert_eq!(again, event);
        }
    }

    #[test]
    fn command_shaped_json_decodes_and_round_trips_or_gets_a_typed_error(json in command_like_json()) {
        match Event::from_json(&json) {
            Ok(event) => {
                let again = Event::from_json(&serde_json::to_string(&event).unwrap()).unwrap();
                prop_assert_eq!(again, event);
            }
            Err(error) => prop_assert!(matches!(error, InvalidInput::MalformedCommand { .. }), "{error:?}"),
        }
        // The plain command decoder agrees on what is a command.
        if let Ok(command) = Command::from_json(&json) {
            prop_assert_eq!(Command::from_json(&serde_json::to_string(&command).unwrap()).unwrap(), command);
        }
    }

    #[test]
    fn different_keys_never_share_a_persistence_id(
        a in "[a-zA-Z%-]{1,4}", b in "[a-zA-Z%-]{1,4}", c in "[a-zA-Z%-]{1,4}", d in "[a-zA-Z%-]{1,4}"
    ) {
        let left = UserKey::new(a, b).unwrap();
        let right = UserKey::new(c, d).unwrap();
        prop_assert_eq!(left == right, left.persistence_id() == right.persistence_id());
    }
}

#[rstest]
#[actix::test]
async fn ids_built_to_collide_never_share_state(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(db) = TestDb::open(backend).await else { return };
    let store = db.connect().await;
    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    let lookalikes = [
        ("a-b", "c"),
        ("a", "b-c"),
        ("a%2Db", "c"),
        ("Mall", "user"),
        ("mall", "user"),
        ("mall", "User"),
        ("caf\u{e9}", "u"),   // é, composed
        ("cafe\u{301}", "u"), // e + combining acute: looks the same
        ("mall", "user "),
    ];
    let keys: Vec<UserKey> = lookalikes.iter().map(|(m, u)| UserKey::new(*m, *u).unwrap()).collect();

    for (i, key) in keys.iter().enumerate() {
        let product = ProductId::new(format!("only-{i}")).unwrap();
        manager
            .send(UserCommand::new(
                key.clone(),
                Command::ViewProduct { product_id: product },
            ))
            .await
            .unwrap()
            .unwrap();
    }

    for (i, key) in keys.iter().enumerate() {
        let stored = store.load(key).await.unwrap().unwrap();
        let products: Vec<&str> = stored.state.recent_products.iter().map(ProductId::as_str).collect();
        assert_eq!(products, [format!("only-{i}")], "{key:?} shares state with another key");
        assert_eq!(stored.revision.0, 1);
    }
}
