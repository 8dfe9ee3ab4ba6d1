//! Two entity types in one process and one database: the built-in user
//! state and the shopping cart (`persist_durable::cart`), each with its own
//! manager, never seeing each other's rows. On embedded SQLite.
//!
//! ```text
//! cargo run --example cart
//! ```

use std::error::Error;
use std::sync::Arc;

use persist_durable::cart::{Cart, CartCommand, CartId};
use persist_durable::{
    ChangeFeed, Command, CommandError, Config, Entities, EntityFeed, SharedStore, SqliteStore, StoreConfig, UserKey,
    UserStates,
};

#[actix::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let config = StoreConfig::default().with_change_feed(true);
    let store: SharedStore = Arc::new(SqliteStore::open_with(dir.path().join("shop.db"), config).await?);
    let users = UserStates::start(store.clone(), Config::default());
    let carts = Entities::<Cart>::start(store.clone(), Config::default());

    let user = UserKey::new("mall001", "user001")?;
    let cart = CartId::new("user001")?; // the same id, another entity type: another row
    users.send(user.clone(), Command::UseCart).await?;
    for (sku, quantity) in [("shoes", 1), ("socks", 3), ("shoes", 1)] {
        let state = carts
            .send(
                cart.clone(),
                CartCommand::AddItem {
                    sku: sku.into(),
                    quantity,
                },
            )
            .await?;
        println!("added {quantity} x {sku:<5} -> {:?}", state.items);
    }
    let ordered = carts.send(cart.clone(), CartCommand::Checkout).await?;
    println!(
        "checked out: {} order(s), cart now {:?}",
        ordered.checkouts, ordered.items
    );
    match carts.send(cart.clone(), CartCommand::Checkout).await {
        Err(CommandError::Rejected { reason, .. }) => println!("second checkout refused: {reason}"),
        other => return Err(format!("an empty cart's checkout must be refused, got {other:?}").into()),
    }

    let user_changes = ChangeFeed::from_position(store.clone(), 0).next_batch().await?;
    let cart_changes = EntityFeed::<Cart>::from_position(store, 0).next_batch().await?;
    println!(
        "feed: {} user change(s) of {}, {} cart change(s) of {}",
        user_changes.len(),
        user_changes[0].key,
        cart_changes.len(),
        cart_changes[0].key
    );
    Ok(())
}
