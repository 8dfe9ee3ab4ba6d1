//! Follows the change feed and prints each committed change, as a projection
//! into a search index, a cache or a Kafka topic would consume it.
//!
//! ```text
//! cargo run --example follow_changes                  # a demo on a temporary SQLite file
//! DATABASE_URL=postgres://... cargo run --example follow_changes -- --follow   # follow a live store
//! ```
//!
//! The demo writes a few commands, reads half the feed as consumer
//! "printer", commits its offset, then "restarts" and resumes exactly after
//! it. With `--follow` it keeps printing changes as they are committed (run
//! `http_service` with `CHANGE_FEED=true` against the same database).

use std::error::Error;
use std::sync::Arc;

use actix::Actor;
use persist_durable::{
    ChangeFeed, Command, Config, PostgresStore, ProductId, SharedStore, SqliteStore, StoreConfig, UserCommand, UserKey,
    UserStateChange, UserStateManager,
};

fn print(change: &UserStateChange) {
    let products: Vec<&str> = change.state.recent_products.iter().map(ProductId::as_str).collect();
    println!(
        "#{:<4} {} revision {:<3} recent {:?} opt-in {} (committed {})",
        change.position,
        change.key,
        change.revision,
        products,
        change.state.marketing_opt_in,
        change.committed_at.format("%H:%M:%S%.3f"),
    );
}

#[actix::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let follow = std::env::args().any(|a| a == "--follow");
    let dir = tempfile::tempdir()?;
    let config = StoreConfig::default().with_change_feed(true);
    let store: SharedStore = match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => Arc::new(PostgresStore::connect_with(&url, config).await?),
        Ok(path) => Arc::new(SqliteStore::open_with(path, config).await?),
        Err(_) => Arc::new(SqliteStore::open_with(dir.path().join("feed-demo.db"), config).await?),
    };

    if follow {
        let mut feed = ChangeFeed::resume(store, "printer").await?;
        println!("following from position {}", feed.position());
        loop {
            for change in feed.next().await? {
                print(&change);
            }
            feed.commit().await?;
        }
    }

    let manager = UserStateManager::new(store.clone(), Config::default()).start();
    for (user, command) in [
        ("alice", Command::UserLogin),
        ("bob", Command::UserLogin),
        (
            "alice",
            Command::ViewProduct {
                product_id: ProductId::new("shoes")?,
            },
        ),
        (
            "alice",
            Command::ViewProduct {
                product_id: ProductId::new("hat")?,
            },
        ),
        ("bob", Command::SetMarketingOptIn { opt_in: true }),
        ("alice", Command::UseCart),
    ] {
        manager
            .send(UserCommand::new(UserKey::new("mall001", user)?, command))
            .await??;
    }

    let mut feed = ChangeFeed::resume(store.clone(), "printer").await?.with_batch_size(3);
    println!("consumer 'printer' reads 3 changes and commits its offset:");
    for change in feed.next_batch().await? {
        print(&change);
    }
    feed.commit().await?;
    drop(feed);

    let mut feed = ChangeFeed::resume(store, "printer").await?;
    println!("restarted, it resumes after position {}:", feed.position());
    for change in feed.next_batch().await? {
        print(&change);
    }
    feed.commit().await?;
    Ok(())
}
