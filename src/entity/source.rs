//! Where an ingested record came from: the machinery's redelivery protection
//! for records read from a partitioned log (a Kafka topic partition), which
//! needs no window of event ids.
//!
//! Records of one partition reach one entity in offset order, so an entity
//! only has to remember, per partition, the offset of the last record that
//! changed it: that offset is written in the same row as the state it led
//! to, and a record at or below it has been applied already.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A record's place in its source: the partition (`topic/partition`) and the
/// record's offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordOrigin {
    pub(crate) partition: Arc<str>,
    pub(crate) offset: i64,
}

/// Per source partition, the offset of the last record applied to an
/// entity; stored beside its state as `source_offsets`.
pub type SourceOffsets = BTreeMap<String, i64>;

/// [`SourceOffsets`] as an entity in memory carries them: boxed, because
/// most entities are never ingested and every resident one would otherwise
/// pay 24 bytes for an empty map.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct AppliedOffsets(Option<Box<SourceOffsets>>);

impl AppliedOffsets {
    pub(crate) fn from_map(offsets: SourceOffsets) -> Self {
        Self((!offsets.is_empty()).then(|| Box::new(offsets)))
    }

    pub(crate) fn as_map(&self) -> &SourceOffsets {
        static NONE: SourceOffsets = BTreeMap::new();
        self.0.as_deref().unwrap_or(&NONE)
    }

    pub(crate) fn into_map(self) -> SourceOffsets {
        self.0.map(|offsets| *offsets).unwrap_or_default()
    }

    /// The record has been applied to this entity.
    pub(crate) fn contain(&self, origin: &RecordOrigin) -> bool {
        origin.is_applied_in(self.as_map())
    }

    /// Remembers the record as the last one applied from its partition.
    pub(crate) fn record(&mut self, origin: &RecordOrigin) {
        origin.record_in(self.0.get_or_insert_with(Default::default));
    }
}

impl RecordOrigin {
    /// The record has been applied to an entity that remembers `offsets`.
    fn is_applied_in(&self, offsets: &SourceOffsets) -> bool {
        offsets.get(&*self.partition).is_some_and(|&last| self.offset <= last)
    }

    /// Remembers this record as the last one applied from its partition.
    fn record_in(&self, offsets: &mut SourceOffsets) {
        match offsets.get_mut(&*self.partition) {
            Some(last) => *last = (*last).max(self.offset),
            None => {
                offsets.insert(self.partition.to_string(), self.offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(partition: &str, offset: i64) -> RecordOrigin {
        RecordOrigin {
            partition: partition.into(),
            offset,
        }
    }

    #[test]
    fn a_record_at_or_below_the_remembered_offset_of_its_partition_is_applied() {
        let mut offsets = SourceOffsets::new();
        origin("t/0", 10).record_in(&mut offsets);
        assert!(origin("t/0", 10).is_applied_in(&offsets));
        assert!(origin("t/0", 3).is_applied_in(&offsets));
        assert!(!origin("t/0", 11).is_applied_in(&offsets));
        assert!(
            !origin("t/1", 3).is_applied_in(&offsets),
            "another partition is its own sequence"
        );
    }

    #[test]
    fn an_entity_never_ingested_carries_no_map() {
        assert_eq!(std::mem::size_of::<AppliedOffsets>(), 8);
        let mut applied = AppliedOffsets::default();
        assert!(!applied.contain(&origin("t/0", 0)));
        applied.record(&origin("t/0", 3));
        assert!(applied.contain(&origin("t/0", 3)));
        assert_eq!(AppliedOffsets::from_map(applied.clone().into_map()), applied);
        assert_eq!(
            AppliedOffsets::from_map(SourceOffsets::new()),
            AppliedOffsets::default()
        );
    }

    #[test]
    fn the_remembered_offset_never_goes_back() {
        let mut offsets = SourceOffsets::new();
        origin("t/0", 10).record_in(&mut offsets);
        origin("t/0", 4).record_in(&mut offsets);
        assert_eq!(offsets["t/0"], 10);
    }
}
