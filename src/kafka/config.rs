//! How an ingest reads its topics.

use std::time::Duration;

/// Where an ingest starts reading a partition that has no stored position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartAt {
    /// At the oldest record the broker still has: nothing already in the
    /// topic is missed (the default).
    #[default]
    Earliest,
    /// At the next record produced.
    Latest,
}

/// The settings of a [`KafkaIngest`](super::KafkaIngest).
#[derive(Clone)]
pub struct IngestConfig {
    pub(super) brokers: String,
    pub(super) group_id: String,
    pub(super) topics: Vec<String>,
    pub(super) dead_letter_topic: Option<String>,
    pub(super) max_unsettled: usize,
    pub(super) max_unsettled_bytes: usize,
    pub(super) max_served: usize,
    pub(super) resume_below: usize,
    pub(super) max_batch_per_entity: usize,
    pub(super) position_save_interval: Duration,
    pub(super) retry_backoff: (Duration, Duration),
    pub(super) revocation_timeout: Duration,
    pub(super) start_at: StartAt,
    pub(super) client_config: Vec<(String, String)>,
}

impl IngestConfig {
    /// Reads `topics` as member of the consumer group `group_id`, from the
    /// brokers `brokers` (`host:port[,host:port...]`).
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            dead_letter_topic: None,
            max_unsettled: 20_000,
            max_unsettled_bytes: 64 * 1024 * 1024,
            max_served: 100_000,
            resume_below: 10_000,
            max_batch_per_entity: 256,
            position_save_interval: Duration::from_secs(1),
            retry_backoff: (Duration::from_millis(50), Duration::from_secs(5)),
            revocation_timeout: Duration::from_secs(30),
            start_at: StartAt::Earliest,
            client_config: Vec::new(),
        }
    }

    /// Sends records that cannot be decoded, or whose command is refused
    /// (a domain refusal, a corrupt stored state), to `topic`, with the
    /// error and the record's origin in headers. Without one they are
    /// logged, counted and skipped.
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Pauses consumption when `max` records are received and not yet
    /// settled (applied, acknowledged or dead-lettered), and resumes when at
    /// most `resume_below` are (default 20,000 and 10,000).
    pub fn with_max_unsettled(mut self, max: usize, resume_below: usize) -> Self {
        self.max_unsettled = max.max(1);
        self.resume_below = resume_below.min(self.max_unsettled - 1);
        self
    }

    /// Pauses consumption while the copies of unsettled records held for
    /// dead-lettering (with a dead-letter topic) take more than `bytes`
    /// (default 64 MiB); it resumes once they take half of it.
    pub fn with_max_unsettled_bytes(mut self, bytes: usize) -> Self {
        self.max_unsettled_bytes = bytes.max(1);
        self
    }

    /// Remembers at most this many of the entities each partition's records
    /// went to, to hand them over when the partition moves (default 100,000,
    /// [`Config::max_resident`](crate::Config::max_resident)'s default: set it
    /// to the manager's). An entity forgotten and still resident is not
    /// handed over, which only costs the next owner a revision conflict.
    pub fn with_max_served(mut self, entities: usize) -> Self {
        self.max_served = entities.max(1);
        self
    }

    /// At most this many records of one entity are sent to it at once (default 256).
    pub fn with_max_batch_per_entity(mut self, max: usize) -> Self {
        self.max_batch_per_entity = max.max(1);
        self
    }

    /// How often the partitions' positions are stored (default 1 s). A
    /// position is only where reading resumes: records past it that were
    /// applied already are recognised by the offsets stored with each
    /// entity's state.
    pub fn with_position_save_interval(mut self, interval: Duration) -> Self {
        self.position_save_interval = interval;
        self
    }

    /// Retries a record that failed for a reason that may pass (the database
    /// is down, a conflict, overload) after `first`, doubling up to `max`
    /// (default 50 ms up to 5 s).
    pub fn with_retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.retry_backoff = (first, max.max(first));
        self
    }

    /// How long a revocation waits for the records in flight of the revoked
    /// partitions to commit (default 30 s). Records still in flight after it
    /// are left to the next owner; a late write of this node then loses its
    /// revision check, or is recognised as applied.
    pub fn with_revocation_timeout(mut self, timeout: Duration) -> Self {
        self.revocation_timeout = timeout;
        self
    }

    /// Where to start a partition with no stored position.
    pub fn with_start_at(mut self, start_at: StartAt) -> Self {
        self.start_at = start_at;
        self
    }

    /// Sets any librdkafka property (`session.timeout.ms`,
    /// `security.protocol`...), for the consumer and the dead-letter
    /// producer. The ingest's own (`group.id`, `enable.auto.commit`,
    /// `auto.offset.reset`) cannot be overridden. TLS and SASL need
    /// rdkafka's `ssl` / `sasl` features: add `rdkafka = { version = "0.39",
    /// features = ["ssl"] }` to your own dependencies.
    pub fn with_client_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.client_config.push((key.into(), value.into()));
        self
    }

    /// The name under which the position of `topic`'s `partition` is stored.
    pub(super) fn position_name(&self, topic: &str, partition: i32) -> String {
        format!("kafka/{}/{}/{}", self.group_id, topic, partition)
    }

    /// The prefix of the names under which the dead-letter intents of
    /// `topic`'s `partition` are stored (`<prefix><offset>`, and
    /// `<prefix><offset>/written` once the dead letter is acknowledged).
    pub(super) fn intents_prefix(&self, topic: &str, partition: i32) -> String {
        format!("{}/dead-letters/", self.position_name(topic, partition))
    }
}

impl std::fmt::Debug for IngestConfig {
    /// Client properties are shown by name only: their values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let client_config: Vec<&str> = self.client_config.iter().map(|(key, _)| key.as_str()).collect();
        f.debug_struct("IngestConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("max_unsettled", &self.max_unsettled)
            .field("resume_below", &self.resume_below)
            .field("max_batch_per_entity", &self.max_batch_per_entity)
            .field("position_save_interval", &self.position_save_interval)
            .field("retry_backoff", &self.retry_backoff)
            .field("revocation_timeout", &self.revocation_timeout)
            .field("start_at", &self.start_at)
            .field("client_config", &client_config)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_names_client_properties_but_hides_their_values() {
        let config = IngestConfig::new("b:9092", "g", ["t"]).with_client_config("sasl.password", "hunter2");
        let shown = format!("{config:?}");
        assert!(shown.contains("sasl.password"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn the_low_water_mark_stays_below_the_high_one() {
        let config = IngestConfig::new("b:9092", "g", ["t"]).with_max_unsettled(10, 50);
        assert_eq!((config.max_unsettled, config.resume_below), (10, 9));
    }
}
