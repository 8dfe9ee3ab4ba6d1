//! A shopping cart: the crate's second entity type, and the example of
//! defining one. It runs beside the users, in the same store, with its own
//! manager; the two types never see each other's rows.
//!
//! ```
//! use persist_durable::cart::{Cart, CartCommand, CartError, CartId};
//! use persist_durable::{CommandError, Config, Entities, MemoryStore};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let carts = Entities::<Cart>::start(std::sync::Arc::new(MemoryStore::new()), Config::default());
//!     let cart = CartId::new("cart-1")?;
//!     let refused = carts.send(cart.clone(), CartCommand::Checkout).await;
//!     assert!(matches!(refused, Err(CommandError::Rejected { reason: CartError::EmptyCart, .. })));
//!     carts.send(cart.clone(), CartCommand::AddItem { sku: "p1".into(), quantity: 2 }).await?;
//!     assert_eq!(carts.send(cart, CartCommand::Checkout).await?.checkouts, 1);
//!     Ok(())
//! }
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::entity::{decode_json, validate_id, DurableEntity, Id, InvalidInput};

/// Identifies one cart: the ready string key, validated when made.
pub type CartId = Id<Cart>;

/// What can be done with a cart. In JSON, tagged by `type` in snake case:
/// `{"type": "add_item", "sku": "p1", "quantity": 2}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields, try_from = "Unchecked")]
pub enum CartCommand {
    /// Puts `quantity` more of `sku` in the cart.
    AddItem {
        /// The product.
        sku: String,
        /// How many more; at least 1.
        quantity: u32,
    },
    /// Takes every unit of `sku` out of the cart.
    RemoveItem {
        /// The product.
        sku: String,
    },
    /// Empties the cart.
    Clear,
    /// Orders what is in the cart and empties it; refused for an empty cart.
    Checkout,
    /// Asks for the cart; changes nothing.
    GetCart,
}

/// A command as JSON has it, before its sku and quantity are checked: every
/// decoding path (a command alone, or inside an event) goes through
/// [`TryFrom`], so none can skip the checks.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Unchecked {
    AddItem { sku: String, quantity: u32 },
    RemoveItem { sku: String },
    Clear,
    Checkout,
    GetCart,
}

impl TryFrom<Unchecked> for CartCommand {
    type Error = InvalidInput;

    fn try_from(command: Unchecked) -> Result<Self, InvalidInput> {
        Ok(match command {
            Unchecked::AddItem { sku, quantity } => {
                validate_id("sku", &sku)?;
                if quantity == 0 {
                    return Err(InvalidInput::MalformedCommand {
                        reason: "add_item needs a quantity of at least 1".into(),
                    });
                }
                CartCommand::AddItem { sku, quantity }
            }
            Unchecked::RemoveItem { sku } => {
                validate_id("sku", &sku)?;
                CartCommand::RemoveItem { sku }
            }
            Unchecked::Clear => CartCommand::Clear,
            Unchecked::Checkout => CartCommand::Checkout,
            Unchecked::GetCart => CartCommand::GetCart,
        })
    }
}

impl CartCommand {
    /// Decodes a command from JSON with a typed error for anything malformed:
    /// an unknown `type`, a missing field, a zero quantity, an invalid sku.
    pub fn from_json(json: &str) -> Result<Self, InvalidInput> {
        Self::try_from(decode_json::<Unchecked>(json)?)
    }
}

/// Why the cart refused a command. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CartError {
    /// Checkout of a cart with nothing in it.
    #[error("the cart is empty: nothing to check out")]
    EmptyCart,
    /// An item with a quantity of zero.
    #[error("add at least one unit of {sku}")]
    ZeroQuantity {
        /// The product.
        sku: String,
    },
}

/// A cart's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cart {
    /// Quantity per product, in sku order.
    pub items: BTreeMap<String, u32>,
    /// Checkouts so far.
    pub checkouts: u32,
    /// When the last checkout happened.
    pub last_checkout: Option<DateTime<Utc>>,
}

impl DurableEntity for Cart {
    const ENTITY_TYPE: &'static str = "Cart";
    const MANIFEST: &'static str = "Cart/v1";
    type Key = CartId;
    type Command = CartCommand;
    type Settings = ();
    type Rejection = CartError;

    fn apply(&self, command: &CartCommand, at: DateTime<Utc>, _: &()) -> Result<Option<Self>, CartError> {
        let mut next = self.clone();
        match command {
            CartCommand::AddItem { quantity: 0, sku } => return Err(CartError::ZeroQuantity { sku: sku.clone() }),
            CartCommand::AddItem { sku, quantity } => {
                let held = next.items.entry(sku.clone()).or_default();
                *held = held.saturating_add(*quantity);
            }
            CartCommand::RemoveItem { sku } => {
                if next.items.remove(sku).is_none() {
                    return Ok(None);
                }
            }
            CartCommand::Clear if self.items.is_empty() => return Ok(None),
            CartCommand::Clear => next.items.clear(),
            CartCommand::Checkout if self.items.is_empty() => return Err(CartError::EmptyCart),
            CartCommand::Checkout => {
                next.items.clear();
                next.checkouts += 1;
                next.last_checkout = Some(at);
            }
            CartCommand::GetCart => return Ok(None),
        }
        Ok(Some(next))
    }

    fn command_name(command: &CartCommand) -> &'static str {
        match command {
            CartCommand::AddItem { .. } => "add_item",
            CartCommand::RemoveItem { .. } => "remove_item",
            CartCommand::Clear => "clear",
            CartCommand::Checkout => "checkout",
            CartCommand::GetCart => "get_cart",
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    fn run(commands: &[CartCommand]) -> Result<Cart, CartError> {
        commands.iter().try_fold(Cart::default(), |cart, command| {
            Ok(cart.apply(command, now(), &())?.unwrap_or(cart))
        })
    }

    fn add(sku: &str, quantity: u32) -> CartCommand {
        CartCommand::AddItem {
            sku: sku.into(),
            quantity,
        }
    }

    #[test]
    fn adding_an_item_twice_adds_the_quantities() {
        let cart = run(&[add("p1", 2), add("p2", 1), add("p1", 3)]).unwrap();
        assert_eq!(cart.items, BTreeMap::from([("p1".into(), 5), ("p2".into(), 1)]));
    }

    #[test]
    fn removing_and_clearing_empty_the_cart() {
        let cart = run(&[add("p1", 2), add("p2", 1), CartCommand::RemoveItem { sku: "p1".into() }]).unwrap();
        assert_eq!(cart.items, BTreeMap::from([("p2".into(), 1)]));
        assert!(run(&[add("p1", 2), CartCommand::Clear]).unwrap().items.is_empty());
    }

    #[test]
    fn checkout_empties_the_cart_and_counts_the_order() {
        let cart = run(&[add("p1", 2), CartCommand::Checkout]).unwrap();
        assert!(cart.items.is_empty());
        assert_eq!((cart.checkouts, cart.last_checkout), (1, Some(now())));
    }

    #[test]
    fn checkout_of_an_empty_cart_is_refused() {
        assert_eq!(run(&[CartCommand::Checkout]), Err(CartError::EmptyCart));
        assert_eq!(
            run(&[add("p1", 1), CartCommand::Clear, CartCommand::Checkout]),
            Err(CartError::EmptyCart)
        );
    }

    #[test]
    fn reads_and_no_op_commands_change_nothing() {
        let cart = Cart::default();
        for command in [
            CartCommand::GetCart,
            CartCommand::Clear,
            CartCommand::RemoveItem { sku: "p".into() },
        ] {
            assert_eq!(cart.apply(&command, now(), &()), Ok(None), "{command:?}");
        }
    }

    #[test]
    fn json_commands_are_decoded_and_bad_ones_rejected_with_typed_errors() {
        assert_eq!(
            CartCommand::from_json(r#"{"type":"add_item","sku":"p1","quantity":2}"#).unwrap(),
            add("p1", 2)
        );
        assert_eq!(
            CartCommand::from_json(r#"{"type":"checkout"}"#).unwrap(),
            CartCommand::Checkout
        );
        for bad in [
            r#"{"type":"add_item","sku":"p1","quantity":0}"#,
            r#"{"type":"add_item","sku":"p1","quantity":-1}"#,
            r#"{"type":"add_item","sku":"p1"}"#,
            r#"{"type":"pay_later"}"#,
            "not json",
        ] {
            assert!(
                matches!(CartCommand::from_json(bad), Err(InvalidInput::MalformedCommand { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            CartCommand::from_json(r#"{"type":"remove_item","sku":""}"#),
            Err(InvalidInput::EmptyId { .. })
        ));
        assert!(CartId::new("cart\n1").is_err());
    }

    #[test]
    fn an_event_decoded_from_json_checks_its_cart_command_too() {
        use crate::entity::EntityEvent;
        for bad in [
            r#"{"type":"add_item","sku":"","quantity":1,"event_id":"e1"}"#,
            r#"{"type":"add_item","sku":"p1","quantity":0,"event_id":"e1"}"#,
            r#"{"type":"remove_item","sku":"p\u0001"}"#,
        ] {
            let decoded = EntityEvent::<CartCommand>::decode_json(bad);
            assert!(
                matches!(decoded, Err(InvalidInput::MalformedCommand { .. })),
                "{bad}: {decoded:?}"
            );
        }
        let good = EntityEvent::<CartCommand>::decode_json(r#"{"type":"checkout","event_id":"e1"}"#).unwrap();
        assert_eq!(good.command, CartCommand::Checkout);
    }
}
