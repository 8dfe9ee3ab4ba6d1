//! Why an ingest could not start or run.

use rdkafka::error::KafkaError;

/// Why an ingest could not start.
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
}
