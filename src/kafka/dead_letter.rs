//! Dead letters: a copy of a record that cannot be applied, with why and
//! where it came from in headers, on the dead-letter topic.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::{error, warn};

use super::ingest::Ingest;
use super::state::{Mark, RawRecord};
use crate::entity::DurableEntity;

impl<E: DurableEntity> Ingest<E> {
    /// Sends a copy of the record to the dead-letter topic, with why and
    /// where it came from in headers; retried until the broker has it, or
    /// until its partition is no longer this member's (then false).
    pub(super) async fn dead_letter(&self, mark: &Mark, raw: &RawRecord, reason: &str) -> bool {
        let (partition, offset) = (&mark.partition, mark.offset);
        let (Some(producer), Some(topic)) = (&self.dead_letters, &self.config.dead_letter_topic) else {
            error!(topic = %partition.0, partition = partition.1, offset, reason, "record skipped: no dead-letter topic is set");
            return true;
        };
        let partition_text = partition.1.to_string();
        let offset_text = offset.to_string();
        let mut backoff = self.config.retry_backoff.0;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "persist-durable.error",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "persist-durable.origin.topic",
                    value: Some(&*partition.0),
                })
                .insert(Header {
                    key: "persist-durable.origin.partition",
                    value: Some(&partition_text),
                })
                .insert(Header {
                    key: "persist-durable.origin.offset",
                    value: Some(&offset_text),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(key) = &raw.key {
                record = record.key(key);
            }
            if let Some(payload) = &raw.payload {
                record = record.payload(payload);
            }
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return true,
                Err((error, _)) => {
                    warn!(%error, topic, retry_in = ?backoff, "could not write a dead letter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_backoff.1);
                }
            }
            if !self.owns(mark) {
                warn!(topic = %partition.0, partition = partition.1, offset,
                    "its partition moved to another member: giving up the dead letter, the new owner reads the record");
                return false;
            }
        }
    }
}
