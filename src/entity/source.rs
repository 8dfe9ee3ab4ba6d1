//! Where an ingested record came from: the machinery's redelivery protection
//! for records read from a partitioned log (a Kafka topic partition), which
//! needs no window of event ids.
//!
//! Records of one partition reach one entity in offset order, so an entity
//! only has to remember, per partition, the offset of the last record that
//! reached it: that offset is written in the same row as the state it led
//! to, and a record at or below it has been settled already. The records it
//! refused (and so did not apply) are remembered beside it, with why: read
//! again, such a record is refused again, never taken for applied, so that
//! it ends in the dead-letter topic even if the first dead letter was never
//! written. Once the ingest has its dead letter, it sends the record again
//! marked `dead_lettered`, and the refusal is
//! forgotten: read again after that, it is settled, not dead-lettered twice.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A record's place in its source: the partition (`topic/partition`) and the
/// record's offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordOrigin {
    pub(crate) partition: Arc<str>,
    pub(crate) offset: i64,
    /// Sent again once its dead letter is written: the entity settles its
    /// refusal of it (read again, it is then found settled, not refused),
    /// and never applies it.
    pub(crate) dead_lettered: bool,
}

// Made by the Kafka ingest and the records other nodes forward.
#[cfg_attr(not(any(feature = "kafka", feature = "http")), allow(dead_code))]
impl RecordOrigin {
    /// The record at `offset` of `partition`, to be applied.
    pub(crate) fn new(partition: Arc<str>, offset: i64) -> Self {
        Self {
            partition,
            offset,
            dead_lettered: false,
        }
    }

    /// The same record, now in the dead-letter topic.
    pub(crate) fn dead_lettered(&self) -> Self {
        Self {
            dead_lettered: true,
            ..self.clone()
        }
    }
}

/// Per source partition, the offset of the last record applied to an
/// entity; stored beside its state as `source_offsets`.
pub type SourceOffsets = BTreeMap<String, i64>;

/// The partitions an entity remembers at most, the most recently fed first
/// kept: a topic created again under another name, or partitions added,
/// would otherwise grow every such entity's row for good. A partition
/// forgotten loses its redelivery protection (event ids still apply).
pub(crate) const MAX_PARTITIONS: usize = 64;

/// Refused records remembered per partition at most, the latest kept.
const MAX_REFUSED: usize = 16;

/// The longest reason kept for a refused record, in bytes.
const MAX_REASON_BYTES: usize = 256;

/// What an entity remembers of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not reached yet.
    New,
    /// Applied, or settled without a change (a no-op, a late record).
    Applied,
    /// Refused, for this reason: refused again if read again.
    Refused(String),
}

/// [`SourceOffsets`] as an entity in memory carries them, with the records
/// it refused: boxed, because most entities are never ingested and every
/// resident one would otherwise pay for empty collections.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct AppliedOffsets(Option<Box<Sources>>);

/// The partitions an entity was fed from, the least recently fed first.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sources(Vec<Source>);

#[derive(Debug, Clone, PartialEq)]
struct Source {
    partition: String,
    /// The offset of the last record settled.
    last: i64,
    /// Refused records at or below `last`, by offset, with why.
    refused: BTreeMap<i64, String>,
}

impl AppliedOffsets {
    /// What `origin`'s record is to this entity.
    pub(crate) fn seen(&self, origin: &RecordOrigin) -> Seen {
        let Some(source) = self.source(&origin.partition) else {
            return Seen::New;
        };
        if origin.offset > source.last {
            return Seen::New;
        }
        match source.refused.get(&origin.offset) {
            Some(reason) => Seen::Refused(reason.clone()),
            None => Seen::Applied,
        }
    }

    /// Remembers the record as the last one settled from its partition.
    pub(crate) fn record(&mut self, origin: &RecordOrigin) {
        self.source_mut(origin);
    }

    /// Forgets that the record was refused (it is in the dead-letter topic
    /// now): read again, it is settled like an applied one.
    pub(crate) fn settle_refused(&mut self, origin: &RecordOrigin) {
        if let Some(source) = self.0.as_deref_mut().and_then(|sources| {
            sources
                .0
                .iter_mut()
                .find(|source| *source.partition == *origin.partition)
        }) {
            source.refused.remove(&origin.offset);
        }
    }

    /// Remembers the record as settled and refused, for `reason`.
    pub(crate) fn record_refused(&mut self, origin: &RecordOrigin, reason: &str) {
        let source = self.source_mut(origin);
        source.refused.insert(origin.offset, truncated(reason));
        while source.refused.len() > MAX_REFUSED {
            source.refused.pop_first();
        }
    }

    /// The offsets as [`StoredState::source_offsets`](crate::StoredState::source_offsets) shows them.
    pub(crate) fn to_map(&self) -> SourceOffsets {
        self.sources()
            .iter()
            .map(|source| (source.partition.clone(), source.last))
            .collect()
    }

    /// Nothing remembered.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn sources(&self) -> &[Source] {
        self.0.as_deref().map_or(&[], |sources| &sources.0)
    }

    fn source(&self, partition: &str) -> Option<&Source> {
        self.sources().iter().find(|source| source.partition == partition)
    }

    /// `origin`'s partition, moved to the most recently fed and raised to
    /// its offset; the least recently fed is forgotten beyond [`MAX_PARTITIONS`].
    fn source_mut(&mut self, origin: &RecordOrigin) -> &mut Source {
        let sources = &mut self.0.get_or_insert_with(Default::default).0;
        let mut source = match sources.iter().position(|s| *s.partition == *origin.partition) {
            Some(at) => sources.remove(at),
            None => Source {
                partition: origin.partition.to_string(),
                last: origin.offset,
                refused: BTreeMap::new(),
            },
        };
        source.last = source.last.max(origin.offset);
        if sources.len() >= MAX_PARTITIONS {
            sources.remove(0);
        }
        sources.push(source);
        sources.last_mut().expect("just pushed")
    }

    /// The `source_offsets` field of a stored payload: a JSON object whose
    /// keys are in the order the partitions were last fed, oldest first.
    pub(crate) fn offsets_field(&self) -> impl Serialize + '_ {
        OffsetsField(self.sources())
    }

    /// The `refused_records` field of a stored payload, if any record was refused.
    pub(crate) fn refused_field(&self) -> Option<impl Serialize + '_> {
        let refused: BTreeMap<&str, &BTreeMap<i64, String>> = self
            .sources()
            .iter()
            .filter(|source| !source.refused.is_empty())
            .map(|source| (source.partition.as_str(), &source.refused))
            .collect();
        (!refused.is_empty()).then_some(refused)
    }

    /// Read back from a payload's two fields (the refused records' offsets
    /// as the object keys they are stored as; one that is not a number is
    /// not an offset this crate wrote, and is passed over).
    pub(crate) fn from_fields(offsets: StoredOffsets, refused: BTreeMap<String, BTreeMap<String, String>>) -> Self {
        let mut refused: BTreeMap<String, BTreeMap<i64, String>> = refused
            .into_iter()
            .map(|(partition, records)| {
                let records = records
                    .into_iter()
                    .filter_map(|(offset, reason)| Some((offset.parse().ok()?, reason)))
                    .collect();
                (partition, records)
            })
            .collect();
        if offsets.0.is_empty() {
            return Self::default();
        }
        let sources = offsets
            .0
            .into_iter()
            .map(|(partition, last)| Source {
                refused: refused.remove(&partition).unwrap_or_default(),
                partition,
                last,
            })
            .collect();
        Self(Some(Box::new(Sources(sources))))
    }
}

fn truncated(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

struct OffsetsField<'a>(&'a [Source]);

impl Serialize for OffsetsField<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for source in self.0 {
            map.serialize_entry(&source.partition, &source.last)?;
        }
        map.end()
    }
}

/// A payload's `source_offsets` as read: the partitions in the order the
/// object lists them (the order they were last fed, oldest first).
#[derive(Debug, Default)]
pub(crate) struct StoredOffsets(Vec<(String, i64)>);

impl<'de> Deserialize<'de> for StoredOffsets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = StoredOffsets;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of partitions and offsets")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StoredOffsets, A::Error> {
                let mut offsets = Vec::new();
                while let Some(entry) = map.next_entry::<String, i64>()? {
                    offsets.push(entry);
                }
                Ok(StoredOffsets(offsets))
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(partition: &str, offset: i64) -> RecordOrigin {
        RecordOrigin::new(partition.into(), offset)
    }

    #[test]
    fn a_record_at_or_below_the_remembered_offset_of_its_partition_is_applied() {
        let mut offsets = AppliedOffsets::default();
        offsets.record(&origin("t/0", 10));
        assert_eq!(offsets.seen(&origin("t/0", 10)), Seen::Applied);
        assert_eq!(offsets.seen(&origin("t/0", 3)), Seen::Applied);
        assert_eq!(offsets.seen(&origin("t/0", 11)), Seen::New);
        assert_eq!(
            offsets.seen(&origin("t/1", 3)),
            Seen::New,
            "another partition is its own sequence"
        );
    }

    #[test]
    fn a_refused_record_read_again_is_refused_again_with_its_reason() {
        let mut offsets = AppliedOffsets::default();
        offsets.record_refused(&origin("t/0", 4), "no such product");
        offsets.record(&origin("t/0", 5));
        assert_eq!(offsets.seen(&origin("t/0", 4)), Seen::Refused("no such product".into()));
        assert_eq!(offsets.seen(&origin("t/0", 5)), Seen::Applied);
    }

    #[test]
    fn a_refused_record_whose_dead_letter_is_written_is_settled_when_read_again() {
        let mut offsets = AppliedOffsets::default();
        offsets.record_refused(&origin("t/0", 4), "no such product");
        offsets.record_refused(&origin("t/0", 6), "no such product");
        offsets.settle_refused(&origin("t/0", 4));
        assert_eq!(offsets.seen(&origin("t/0", 4)), Seen::Applied);
        assert_eq!(
            offsets.seen(&origin("t/0", 6)),
            Seen::Refused("no such product".into()),
            "another refusal stays"
        );
        assert_eq!(offsets.to_map()["t/0"], 6, "the remembered offset stays");
    }

    #[test]
    fn an_entity_never_ingested_carries_no_collections() {
        assert_eq!(std::mem::size_of::<AppliedOffsets>(), 8);
        let mut applied = AppliedOffsets::default();
        assert_eq!(applied.seen(&origin("t/0", 0)), Seen::New);
        applied.record(&origin("t/0", 3));
        assert_eq!(applied.seen(&origin("t/0", 3)), Seen::Applied);
    }

    #[test]
    fn the_remembered_offset_never_goes_back() {
        let mut offsets = AppliedOffsets::default();
        offsets.record(&origin("t/0", 10));
        offsets.record(&origin("t/0", 4));
        assert_eq!(offsets.to_map()["t/0"], 10);
    }

    /// Before, an entry per partition was kept for good.
    #[test]
    fn only_the_most_recently_fed_partitions_are_remembered() {
        let mut offsets = AppliedOffsets::default();
        for partition in 0..MAX_PARTITIONS + 10 {
            offsets.record(&origin(&format!("t/{partition}"), 1));
            // The first partition stays the most recently fed.
            offsets.record(&origin("t/0", 1));
        }
        let map = offsets.to_map();
        assert_eq!(map.len(), MAX_PARTITIONS);
        assert!(map.contains_key("t/0"), "fed last, kept");
        assert!(!map.contains_key("t/1"), "the least recently fed, forgotten");
        assert!(map.contains_key(&format!("t/{}", MAX_PARTITIONS + 9)));
    }

    #[test]
    fn refused_records_are_bounded_per_partition_the_latest_kept() {
        let mut offsets = AppliedOffsets::default();
        for offset in 0..(MAX_REFUSED as i64 + 5) {
            offsets.record_refused(&origin("t/0", offset), &"x".repeat(1_000));
        }
        assert_eq!(
            offsets.seen(&origin("t/0", 0)),
            Seen::Applied,
            "the oldest refusal forgotten"
        );
        let Seen::Refused(reason) = offsets.seen(&origin("t/0", MAX_REFUSED as i64 + 4)) else {
            panic!("the latest refusal is kept");
        };
        assert_eq!(reason.len(), MAX_REASON_BYTES);
    }

    #[test]
    fn the_fields_read_back_as_written_in_the_order_partitions_were_fed() {
        let mut offsets = AppliedOffsets::default();
        offsets.record(&origin("b/0", 1));
        offsets.record(&origin("a/0", 2));
        offsets.record_refused(&origin("b/0", 3), "why");
        let json = serde_json::to_string(&offsets.offsets_field()).unwrap();
        assert_eq!(json, r#"{"a/0":2,"b/0":3}"#);
        let refused = serde_json::to_value(offsets.refused_field().unwrap()).unwrap();
        assert_eq!(refused, serde_json::json!({"b/0": {"3": "why"}}));
        let read = AppliedOffsets::from_fields(
            serde_json::from_str(&json).unwrap(),
            serde_json::from_value(refused).unwrap(),
        );
        assert_eq!(read, offsets);
    }
}
