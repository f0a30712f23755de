//! Delayed messages the binlog relay has seen and not yet published: when each is due,
//! and the keys they hold back meanwhile. The rule apart from any I/O, as `hold.rs` is
//! for failures.
//!
//! A delayed row stays in the table until it is due, with nothing pinned: the saved
//! position moves on past it, and a session that starts reads the delayed rows back from
//! the table. Its key's later rows stay in the table too, and go with it, in id order,
//! when it is due.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use super::hold::{Key, Slot};

/// How long the ids a release published are kept from being published again by the
/// next release of their key: their marks go through the settler's queue, and a read of
/// the table before the mark would see them pending still.
const RELEASED_MEMORY: Duration = Duration::from_secs(60);

/// The delayed rows not yet published, by when they are due (the database's clock).
#[derive(Debug, Default)]
pub(super) struct Schedule {
    by_due: BTreeSet<(SystemTime, u64)>,
    rows: HashMap<u64, (SystemTime, Slot)>,
    /// How many scheduled rows each key has.
    keys: HashMap<Key, usize>,
    /// Rows a release published lately, and when.
    released: HashMap<u64, Instant>,
}

impl Schedule {
    /// Row `id`, of `slot`, is due at `due`; a row scheduled already keeps its place.
    pub fn add(&mut self, id: u64, slot: Slot, due: SystemTime) {
        if self.rows.contains_key(&id) {
            return;
        }
        if let Slot::Key(key) = &slot {
            *self.keys.entry(key.clone()).or_default() += 1;
        }
        self.by_due.insert((due, id));
        self.rows.insert(id, (due, slot));
    }

    /// Whether a row of `key` is scheduled: the key's later rows wait.
    pub fn holds(&self, key: &Key) -> bool {
        !self.keys.is_empty() && self.keys.contains_key(key)
    }

    /// Whether no row is scheduled.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether row `id` is scheduled.
    pub fn has(&self, id: u64) -> bool {
        self.rows.contains_key(&id)
    }

    /// When the earliest row is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.by_due.first().map(|(due, _)| *due)
    }

    /// The rows due at `now`, earliest first, taken off the schedule: each slot once,
    /// with the lowest id of its rows due.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<(u64, Slot)> {
        let mut taken: Vec<(u64, Slot)> = Vec::new();
        while let Some(&(due, id)) = self.by_due.first() {
            if due > now {
                break;
            }
            self.by_due.pop_first();
            let Some((_, slot)) = self.rows.remove(&id) else {
                continue;
            };
            if let Slot::Key(key) = &slot {
                if let Some(count) = self.keys.get_mut(key) {
                    *count -= 1;
                    if *count == 0 {
                        self.keys.remove(key);
                    }
                }
            }
            match taken.iter_mut().find(|(_, s)| *s == slot) {
                Some(first) => first.0 = first.0.min(id),
                None => taken.push((id, slot)),
            }
        }
        taken
    }

    /// Remembers that a release published `ids` at `now`, and forgets those older than
    /// [`RELEASED_MEMORY`].
    pub fn released(&mut self, ids: impl IntoIterator<Item = u64>, now: Instant) {
        self.released
            .retain(|_, at| now.saturating_duration_since(*at) < RELEASED_MEMORY);
        self.released.extend(ids.into_iter().map(|id| (id, now)));
    }

    /// Whether a release published row `id` lately.
    pub fn published(&self, id: u64) -> bool {
        self.released.contains_key(&id)
    }

    /// How many rows are scheduled.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Slot {
        Slot::Key(("t".into(), k.as_bytes().to_vec()))
    }

    fn k(k: &str) -> Key {
        ("t".into(), k.as_bytes().to_vec())
    }

    #[test]
    fn rows_come_due_in_time_order_and_hold_their_keys_until_then() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut schedule = Schedule::default();
        schedule.add(5, key("a"), t0 + Duration::from_secs(10));
        schedule.add(3, key("b"), t0 + Duration::from_secs(5));
        schedule.add(9, Slot::Row(9), t0 + Duration::from_secs(1));
        schedule.add(5, key("a"), t0 + Duration::from_secs(1));
        assert_eq!(schedule.len(), 3, "a row scheduled twice is there once");
        assert!(schedule.holds(&k("a")) && schedule.holds(&k("b")));
        assert!(!schedule.holds(&k("c")));
        assert_eq!(schedule.next_due(), Some(t0 + Duration::from_secs(1)));

        assert!(schedule.take_due(t0).is_empty(), "nothing due yet");
        assert_eq!(
            schedule.take_due(t0 + Duration::from_secs(5)),
            [(9, Slot::Row(9)), (3, key("b"))]
        );
        assert!(!schedule.holds(&k("b")), "its only row went");
        assert!(schedule.holds(&k("a")));
        assert_eq!(
            schedule.take_due(t0 + Duration::from_secs(60)),
            [(5, key("a"))]
        );
        assert_eq!(schedule.next_due(), None);
        assert!(!schedule.holds(&k("a")));
    }

    #[test]
    fn a_key_with_two_rows_due_together_is_released_once_from_its_first() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut schedule = Schedule::default();
        schedule.add(8, key("a"), t0);
        schedule.add(4, key("a"), t0 + Duration::from_secs(1));
        schedule.add(6, key("a"), t0 + Duration::from_secs(9));
        assert_eq!(
            schedule.take_due(t0 + Duration::from_secs(2)),
            [(4, key("a"))]
        );
        assert!(schedule.holds(&k("a")), "row 6 is not due: the key waits");
    }

    #[test]
    fn released_rows_are_remembered_for_a_while() {
        let now = Instant::now();
        let mut schedule = Schedule::default();
        schedule.released([1, 2], now);
        assert!(schedule.published(1) && !schedule.published(3));
        schedule.released([3], now + RELEASED_MEMORY);
        assert!(!schedule.published(1), "forgotten");
        assert!(schedule.published(3));
    }
}
