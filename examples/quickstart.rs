//! The tour in one run, on embedded SQLite (no server needed):
//! a user logs in, views four products (three are kept), goes idle for 30
//! minutes of simulated time, is passivated, and is restored with its state.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use persist_durable::{Command, Config, ManualClock, ProductId, SqliteStore, UserKey, UserState, UserStates};

#[actix::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // Simulated time: the 30 idle minutes below pass in milliseconds.
    tokio::time::pause();
    let clock = ManualClock::new(chrono::Utc::now());

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("user-state.db");
    let store = SqliteStore::open(&path).await?;
    println!("1. Opened the SQLite store at {}", path.display());

    // Simulated time is per thread: keep the user actors on this one (arbiters 0).
    let config = Config::default().with_clock(clock.clone()).with_arbiters(0);
    let users = UserStates::start(Arc::new(store), config);
    let user = UserKey::new("mall001", "user001")?;

    let state = users.send(user.clone(), Command::UserLogin).await?;
    println!("2. {user} logged in at {}", show_time(&state.last_login));

    for product in ["shoes", "hat", "scarf", "gloves"] {
        let command = Command::ViewProduct {
            product_id: ProductId::new(product)?,
        };
        let state = users.send(user.clone(), command).await?;
        println!("3. viewed {product:<6} -> recent products {}", show_products(&state));
    }

    let state = users
        .send(user.clone(), Command::SetMarketingOptIn { opt_in: true })
        .await?;
    println!("4. opted in to marketing: {}", state.marketing_opt_in);

    println!("5. {user} goes idle for 30 minutes (plus one 5-minute check)...");
    clock.advance(chrono::Duration::minutes(35));
    tokio::time::advance(Duration::from_secs(35 * 60)).await;
    wait_until_no_user_is_resident(&users).await;
    let stats = users.stats().await?;
    println!(
        "6. passivated: {} resident users, {} passivation(s); the state lives only in the database now",
        stats.resident_entities, stats.passivations
    );

    let restored = users.send(user.clone(), Command::GetUserState).await?;
    println!("7. the next command restored {user}:");
    println!("     last login        {}", show_time(&restored.last_login));
    println!("     recent products   {}", show_products(&restored));
    println!("     marketing opt-in  {}", restored.marketing_opt_in);
    println!("     last event        {}", show_time(&restored.last_event_time));
    assert_eq!(restored, state, "restored exactly as committed");
    println!("8. done: the restored state equals the state before passivation");
    Ok(())
}

/// Lets the actors run until the idle user has been passivated.
async fn wait_until_no_user_is_resident(users: &UserStates) {
    for _ in 0..1_000 {
        if matches!(users.stats().await, Ok(stats) if stats.resident_entities == 0) {
            return;
        }
        tokio::task::yield_now().await;
    }
}

fn show_time(time: &Option<chrono::DateTime<chrono::Utc>>) -> String {
    time.map_or_else(|| "never".into(), |t| t.format("%H:%M:%S").to_string())
}

fn show_products(state: &UserState) -> String {
    let ids: Vec<&str> = state.recent_products.iter().map(ProductId::as_str).collect();
    format!("[{}]", ids.join(", "))
}
