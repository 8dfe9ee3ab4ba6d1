//! How far one partition is applied: the contiguous position below which
//! every record received is settled, while records of different entities
//! settle out of order.

use std::collections::BTreeSet;

/// Received and settled offsets of one partition in one assignment.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Where this assignment started reading, when known.
    start: Option<i64>,
    /// The highest offset received.
    highest: Option<i64>,
    /// Offsets received and not yet settled.
    unsettled: BTreeSet<i64>,
}

impl Progress {
    /// An assignment that starts reading at `start` (`None`: wherever the
    /// broker says, known with the first record).
    pub(super) fn starting_at(start: Option<i64>) -> Self {
        Self {
            start,
            ..Self::default()
        }
    }

    pub(super) fn received(&mut self, offset: i64) {
        self.unsettled.insert(offset);
        self.highest = Some(self.highest.map_or(offset, |highest| highest.max(offset)));
    }

    /// The record at `offset` is applied, acknowledged or dead-lettered.
    pub(super) fn settled(&mut self, offset: i64) {
        self.unsettled.remove(&offset);
    }

    /// The offset the next record read should have: after the highest
    /// received, or where reading started.
    pub(super) fn next_offset(&self) -> Option<i64> {
        self.highest.map(|highest| highest + 1).or(self.start)
    }

    /// The offset to resume reading at: every record received below it is
    /// settled. `None` until anything is known.
    pub(super) fn position(&self) -> Option<i64> {
        match (self.unsettled.first(), self.highest) {
            (Some(&first), _) => Some(first),
            (None, Some(highest)) => Some(highest + 1),
            (None, None) => self.start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_stays_at_the_first_record_not_settled() {
        let mut progress = Progress::starting_at(Some(98));
        for offset in 98..=101 {
            progress.received(offset);
        }
        assert_eq!(progress.position(), Some(98));
        progress.settled(100);
        progress.settled(99);
        assert_eq!(progress.position(), Some(98), "98 is still in flight");
        progress.settled(98);
        assert_eq!(progress.position(), Some(101));
        progress.settled(101);
        assert_eq!(progress.position(), Some(102), "everything received is settled");
    }

    #[test]
    fn before_any_record_the_position_is_where_reading_started() {
        assert_eq!(Progress::starting_at(Some(7)).position(), Some(7));
        assert_eq!(Progress::starting_at(None).position(), None);
    }

    #[test]
    fn offsets_may_have_gaps() {
        let mut progress = Progress::starting_at(None);
        progress.received(10);
        progress.received(14);
        progress.settled(10);
        assert_eq!(progress.position(), Some(14));
        progress.settled(14);
        assert_eq!(progress.position(), Some(15));
    }
}
