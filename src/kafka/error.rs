//! Why an ingest could not start or run.

use rdkafka::error::KafkaError;

use crate::error::StoreError;

/// An ingest's failure to start, or to stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The settings cannot work.
    #[error("invalid ingest configuration: {0}")]
    InvalidConfig(String),
    /// The Kafka client refused to start or to subscribe.
    #[error("the Kafka client failed")]
    Kafka(#[source] KafkaError),
    /// The ingest's threads could not be started.
    #[error("the ingest could not start its threads")]
    Io(#[source] std::io::Error),
    /// The store could not be reached to read or save a position.
    #[error("the store failed")]
    Store(#[source] StoreError),
}
