//! Rows a revive published ahead of their own events.
//!
//! When a dead row is replayed, the relay reads its key's pending rows from the table and
//! publishes them then. Some of them may have their own event further on in the binary
//! log (another dead row of the key replayed in the same or a later transaction, a row
//! that committed meanwhile), and their marks are only queued: publishing them again
//! there would send a row a second time after a later row of its key. Every such event
//! lies before the log's end as the server gave it after the read, so the rows are
//! remembered until the relay has read that far.

use std::collections::HashSet;

use super::position::Position;

/// Rows published ahead of their events, and where the binary log ended after they were
/// read.
#[derive(Debug, Default)]
pub(super) struct Ahead {
    ids: HashSet<u64>,
    until: Option<Position>,
}

impl Ahead {
    /// Remembers `ids`, read from the table when the log ended at `until`.
    pub fn add(&mut self, ids: impl IntoIterator<Item = u64>, until: Position) {
        self.ids.extend(ids);
        self.until = Some(until);
    }

    /// Whether the row `id`, whose event the relay reads now (having read whole
    /// transactions through `read_through`), was published ahead of it: then it is not
    /// published again. Forgets everything once the relay has read to where the log
    /// ended.
    pub fn published(&mut self, id: u64, read_through: &Position) -> bool {
        if self
            .until
            .as_ref()
            .is_some_and(|end| read_through.reached(end))
        {
            self.ids.clear();
            self.until = None;
        }
        self.ids.remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Position {
        Position {
            file: "log.000001".into(),
            offset,
        }
    }

    #[test]
    fn a_row_published_ahead_is_skipped_once_and_only_until_the_log_end_is_read() {
        let mut ahead = Ahead::default();
        ahead.add([7, 8, 9], at(1_000));
        assert!(ahead.published(7, &at(600)));
        assert!(!ahead.published(7, &at(700)), "skipped once");
        assert!(!ahead.published(5, &at(700)), "never published ahead");
        assert!(
            !ahead.published(8, &at(1_000)),
            "the log end is read: a later event of 8 is a new change"
        );
        assert!(!ahead.published(9, &at(1_200)));
    }
}
