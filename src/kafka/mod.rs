//! Kafka in, exactly once in effect (feature `kafka`): a [`KafkaIngest`]
//! reads topics keyed by entity in a consumer group, applies each record to
//! its entity through the entity's manager, and stores each partition's
//! position with the state it led to.
//!
//! Ownership follows the consumer group: the member a partition is assigned
//! to applies its records, and a revocation waits for the records in flight
//! to commit and passivates the entities served, so the next owner restores
//! their committed state. Concurrent writers during a hand-over are still
//! caught by the revision check.
//!
//! ```no_run
//! use std::sync::Arc;
//! use persist_durable::kafka::{IngestConfig, JsonRecords, KafkaIngest};
//! use persist_durable::{Config, SqliteStore, UserStates};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let store = SqliteStore::open("state.db").await?;
//!     let users = UserStates::start(Arc::new(store), Config::default());
//!     let config = IngestConfig::new("127.0.0.1:9092", "user-state", ["user-events"])
//!         .with_dead_letter_topic("user-events.dead-letters");
//!     let ingest = KafkaIngest::start(config, &users, JsonRecords)?;
//!     tokio::signal::ctrl_c().await?;
//!     ingest.stop().await;
//!     Ok(())
//! }
//! ```

mod config;
mod consume;
mod dead_letter;
mod decode;
mod deliver;
mod error;
mod handle;
mod ingest;
mod intents;
mod positions;
mod progress;
mod rebalance;
mod state;

pub use config::{IngestConfig, StartAt};
pub use decode::{IngestRecord, JsonRecords, RecordDecoder};
pub use error::IngestError;
pub use handle::{IngestStats, KafkaIngest};
