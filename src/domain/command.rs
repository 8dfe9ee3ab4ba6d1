use serde::{Deserialize, Serialize};

use super::ProductId;
use crate::entity::{decode_json, EntityEvent, InvalidInput};

/// A user [`Command`] with the event's id and time, if known: what the
/// user-state actors and the manager take.
///
/// Both extras are optional. With an `event_id`, a redelivered event (same
/// id, same user) is acknowledged with the current state and not applied
/// again. With an `event_time`, a late event never moves the recorded times
/// backwards. In JSON they sit beside the command's fields:
/// `{"type": "user_login", "event_id": "logins-3-1042", "event_time": "2026-11-20T09:00:00Z"}`.
pub type Event = EntityEvent<Command>;

impl EntityEvent<Command> {
    /// Decodes an event from JSON, with a typed error for anything malformed.
    pub fn from_json(json: &str) -> Result<Self, InvalidInput> {
        decode_json(json)
    }
}

/// Something a user did, or a question about them.
///
/// Sent to a [`UserStateActor`](crate::UserStateActor) directly, or wrapped in a
/// [`UserCommand`](crate::UserCommand) to the [`UserStateManager`](crate::UserStateManager).
/// Every command is answered with the user's state after it; a state-changing
/// one only after that state is committed.
///
/// In JSON a command is tagged by `type` in snake case:
/// `{"type": "view_product", "product_id": "p1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// The user logged in.
    UserLogin,
    /// The user used the cart.
    UseCart,
    /// The user viewed a product.
    ViewProduct {
        /// The product viewed.
        product_id: ProductId,
    },
    /// The user gave or withdrew marketing consent.
    SetMarketingOptIn {
        /// Whether the user accepts marketing messages.
        opt_in: bool,
    },
    /// Asks for the user's current state; changes nothing.
    GetUserState,
    /// Erases the user (an erasure request): committed as a tombstone, the
    /// state back to its default. Redelivered or late events from before the
    /// deletion are not applied; later commands start from the default state.
    DeleteUser,
    /// The user used the cart and has not been seen since, for the
    /// [cart reminder](crate::StatePolicy::with_cart_reminder)'s delay: what
    /// its durable timer delivers. Sets
    /// [`cart_abandoned`](crate::UserState::cart_abandoned), for a
    /// notification to follow from the change feed.
    CartAbandoned,
}

impl Command {
    /// Decodes a command from JSON, with a typed error for anything malformed:
    /// an unknown `type`, a missing field, an invalid product id, oversized input.
    pub fn from_json(json: &str) -> Result<Self, InvalidInput> {
        decode_json(json)
    }

    /// Whether the command only reads state (and so is never written).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Command::GetUserState)
    }

    /// The command's name as in JSON, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::UserLogin => "user_login",
            Command::UseCart => "use_cart",
            Command::ViewProduct { .. } => "view_product",
            Command::SetMarketingOptIn { .. } => "set_marketing_opt_in",
            Command::GetUserState => "get_user_state",
            Command::DeleteUser => "delete_user",
            Command::CartAbandoned => "cart_abandoned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_command_from_snake_case_json() {
        let cases = [
            (r#"{"type":"user_login"}"#, Command::UserLogin),
            (r#"{"type":"use_cart"}"#, Command::UseCart),
            (
                r#"{"type":"view_product","product_id":"p1"}"#,
                Command::ViewProduct {
                    product_id: ProductId::new("p1").unwrap(),
                },
            ),
            (
                r#"{"type":"set_marketing_opt_in","opt_in":true}"#,
                Command::SetMarketingOptIn { opt_in: true },
            ),
            (r#"{"type":"get_user_state"}"#, Command::GetUserState),
            (r#"{"type":"delete_user"}"#, Command::DeleteUser),
            (r#"{"type":"cart_abandoned"}"#, Command::CartAbandoned),
        ];
        for (json, expected) in cases {
            let decoded = Command::from_json(json).unwrap();
            assert_eq!(decoded.name(), json.split('"').nth(3).unwrap());
            assert_eq!(decoded, expected);
            let reencoded = serde_json::to_string(&decoded).unwrap();
            assert_eq!(Command::from_json(&reencoded).unwrap(), decoded);
        }
    }

    #[test]
    fn an_unknown_command_is_a_typed_error() {
        let err = Command::from_json(r#"{"type":"delete_everything"}"#).unwrap_err();
        assert!(matches!(err, InvalidInput::MalformedCommand { .. }), "{err:?}");
        assert!(err.to_string().contains("delete_everything"), "{err}");
    }

    #[test]
    fn malformed_json_is_a_typed_error() {
        for json in [
            "",
            "{",
            "null",
            "[]",
            r#"{"type":"view_product"}"#,
            r#"{"type":"set_marketing_opt_in","opt_in":"yes"}"#,
        ] {
            assert!(
                matches!(Command::from_json(json), Err(InvalidInput::MalformedCommand { .. })),
                "{json}"
            );
        }
    }

    #[test]
    fn an_invalid_product_id_in_json_is_rejected() {
        let err = Command::from_json(r#"{"type":"view_product","product_id":""}"#).unwrap_err();
        assert!(err.to_string().contains("product id"), "{err}");
    }

    #[test]
    fn oversized_json_is_rejected_before_parsing() {
        let json = format!(r#"{{"type":"user_login","pad":"{}"}}"#, "x".repeat(16 * 1024));
        assert!(matches!(
            Command::from_json(&json),
            Err(InvalidInput::CommandTooLarge { .. })
        ));
    }

    #[test]
    fn only_get_user_state_is_read_only() {
        assert!(Command::GetUserState.is_read_only());
        assert!(!Command::UserLogin.is_read_only());
        assert!(!Command::SetMarketingOptIn { opt_in: false }.is_read_only());
    }
}
