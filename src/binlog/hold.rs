//! Which rows the binlog relay holds back after a failed publish, and when it tries them
//! again: a message that failed holds back the later messages of its own key only, and
//! everything else goes on. The rule, apart from any I/O, as `store/claim.rs` is for the
//! polling relay.
//!
//! A key's held rows wait in order, in memory up to a bound shared by all keys; past it,
//! a key's later rows are left in the table (`spilled`) and read back, in id order, once
//! those before them went out. While any row is held, the saved position stays before
//! the transaction of the oldest (its `pin`), so that a restart reads it again.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::position::Position;
use crate::record::Record;

/// A topic and key whose later messages wait behind a failed or dead one.
pub(super) type Key = (String, Vec<u8>);

/// What a held row holds back: the later rows of its key, or nothing but itself when it
/// has no key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    Key(Key),
    Row(u64),
}

impl Slot {
    /// The slot of `record`.
    pub fn of(record: &Record) -> Slot {
        match record.message.order_key() {
            Some((topic, key)) => Slot::Key((topic.to_string(), key.to_vec())),
            None => Slot::Row(record.id),
        }
    }
}

/// One slot's held rows.
#[derive(Debug)]
struct Queue {
    /// In id order; the first is the one that failed.
    records: VecDeque<Record>,
    /// When the first may be tried again.
    due: Instant,
    /// Its records are out for a publish: they come back if it fails.
    out: bool,
    /// The position before the transaction of the slot's oldest held row.
    pin: Position,
    /// The first and last id of the key's rows left in the table, to read back in order.
    spilled: Option<(u64, u64)>,
}

/// Every slot held, and the records kept for them.
#[derive(Debug)]
pub(crate) struct Held {
    queues: HashMap<Slot, Queue>,
    /// Records kept in memory, over all slots.
    kept: usize,
    /// Most records kept in memory: past it, rows of held keys stay in the table.
    limit: usize,
}

impl Held {
    /// No slot held; at most `limit` records kept in memory.
    pub fn new(limit: usize) -> Held {
        Held {
            queues: HashMap::new(),
            kept: 0,
            limit: limit.max(1),
        }
    }

    /// Whether nothing is held.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Whether `record`'s slot is held: it must wait behind the slot's rows.
    pub fn holds(&self, record: &Record) -> bool {
        !self.queues.is_empty() && self.queues.contains_key(&Slot::of(record))
    }

    /// Whether `slot` is held.
    pub fn holds_slot(&self, slot: &Slot) -> bool {
        self.queues.contains_key(slot)
    }

    /// A row read after its slot came to be held waits behind the others: in memory
    /// while fewer than the limit are kept, else in the table.
    pub fn queue(&mut self, record: Record) {
        let Some(queue) = self.queues.get_mut(&Slot::of(&record)) else {
            return;
        };
        if self.kept < self.limit && queue.spilled.is_none() {
            queue.records.push_back(record);
            self.kept += 1;
        } else {
            let (first, _) = queue.spilled.unwrap_or((record.id, record.id));
            queue.spilled = Some((first, record.id));
        }
    }

    /// `records` (one slot's, in order, the first the one that failed or came back
    /// untried) wait until `due`, in front of whatever else the slot holds. A slot held
    /// for the first time keeps the position at or before `pin`.
    pub fn hold(&mut self, records: Vec<Record>, due: Instant, pin: &Position) {
        let Some(first) = records.first() else {
            return;
        };
        let slot = Slot::of(first);
        let queue = self.queues.entry(slot).or_insert_with(|| Queue {
            records: VecDeque::new(),
            due,
            out: false,
            pin: pin.clone(),
            spilled: None,
        });
        self.kept += records.len();
        for record in records.into_iter().rev() {
            queue.records.push_front(record);
        }
        queue.due = due;
        queue.out = false;
    }

    /// The records of every slot due at `now` and not out, from the front, up to `limit`
    /// in all, the earliest due first; their slots are out until [`back`](Held::back).
    pub fn take_due(&mut self, now: Instant, limit: usize) -> Vec<Record> {
        let mut due: Vec<(&Slot, Instant)> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.out && q.due <= now && !q.records.is_empty())
            .map(|(slot, q)| (slot, q.due))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        let slots: Vec<Slot> = due.into_iter().map(|(slot, _)| slot.clone()).collect();
        let mut taken = Vec::new();
        for slot in slots {
            if taken.len() >= limit {
                break;
            }
            let Some(queue) = self.queues.get_mut(&slot) else {
                continue;
            };
            let n = queue.records.len().min(limit - taken.len());
            taken.extend(queue.records.drain(..n));
            queue.out = true;
            self.kept -= n;
        }
        taken
    }

    /// The publish of the records taken from `slot` is over (what failed went back with
    /// [`hold`](Held::hold)): a slot with nothing left is let go; one with more goes on at
    /// once.
    pub fn back(&mut self, slot: &Slot, now: Instant) {
        let Some(queue) = self.queues.get_mut(slot) else {
            return;
        };
        if !queue.out {
            return;
        }
        queue.out = false;
        if queue.records.is_empty() && queue.spilled.is_none() {
            self.queues.remove(slot);
        } else {
            queue.due = queue.due.min(now);
        }
    }

    /// Gives up `slot` and what it keeps (its key is held behind a dead row instead):
    /// its rows stay in the table.
    pub fn drop_slot(&mut self, slot: &Slot) {
        if let Some(queue) = self.queues.remove(slot) {
            self.kept -= queue.records.len();
        }
    }

    /// Keys whose kept rows all went out and that left rows in the table: each with the
    /// first and last id to read back, in order. Reading them back is
    /// [`refill`](Held::refill)'s.
    pub fn spilled(&self) -> Vec<(Key, u64, u64)> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.out && q.records.is_empty())
            .filter_map(|(slot, q)| match (slot, q.spilled) {
                (Slot::Key(key), Some((first, last))) => Some((key.clone(), first, last)),
                _ => None,
            })
            .collect()
    }

    /// The rows of `key` read back from the table, in id order, the last of them being
    /// `read_to` or, when fewer came than asked, all there was up to the spilled range's
    /// end (`exhausted`).
    pub fn refill(&mut self, key: &Key, records: Vec<Record>, read_to: u64, exhausted: bool) {
        let slot = Slot::Key(key.clone());
        let Some(queue) = self.queues.get_mut(&slot) else {
            return;
        };
        self.kept += records.len();
        queue.records.extend(records);
        queue.spilled = match queue.spilled {
            Some((_, last)) if !exhausted && read_to < last => Some((read_to + 1, last)),
            _ => None,
        };
        if queue.records.is_empty() && queue.spilled.is_none() {
            self.queues.remove(&slot);
        }
    }

    /// The earliest time a slot not out comes due: one with rows to read back from the
    /// table is due at once.
    pub fn next_due(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter(|q| !q.out && (!q.records.is_empty() || q.spilled.is_some()))
            .map(|q| {
                if q.records.is_empty() {
                    Instant::now()
                } else {
                    q.due
                }
            })
            .min()
    }

    /// The earliest position a held row's transaction starts after: the saved position
    /// must not pass it.
    pub fn pin(&self) -> Option<&Position> {
        self.queues
            .values()
            .map(|q| &q.pin)
            .min_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)))
    }

    /// How many records are kept in memory.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept
    }
}

/// The earlier of two positions, in the binary log's order.
pub(crate) fn earlier(a: Position, b: &Position) -> Position {
    if (&b.file, b.offset) < (&a.file, a.offset) {
        b.clone()
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::message::Message;

    fn record(id: u64, key: Option<&str>) -> Record {
        let mut message = Message::new("t", format!("m{id}"));
        if let Some(key) = key {
            message = message.with_key(key);
        }
        Record {
            id,
            message_id: uuid::Uuid::now_v7(),
            message,
            attempts: 0,
            created: std::time::SystemTime::now(),
        }
    }

    fn at(offset: u64) -> Position {
        Position {
            file: "b.000001".into(),
            offset,
        }
    }

    fn ids(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_failed_row_holds_its_key_only_and_its_later_rows_wait_behind_it() {
        let now = Instant::now();
        let mut held = Held::new(100);
        held.hold(
            vec![record(1, Some("a")), record(2, Some("a"))],
            now + Duration::from_secs(1),
            &at(10),
        );
        assert!(held.holds(&record(5, Some("a"))));
        assert!(!held.holds(&record(6, Some("b"))), "other keys go on");
        assert!(!held.holds(&record(7, None)));
        held.queue(record(5, Some("a")));
        assert!(held.take_due(now, 10).is_empty(), "not due yet");
        assert_eq!(held.next_due(), Some(now + Duration::from_secs(1)));
        let taken = held.take_due(now + Duration::from_secs(1), 10);
        assert_eq!(ids(&taken), [1, 2, 5], "in order, the failed one first");
        assert!(held.holds(&record(8, Some("a"))), "still held while out");
        assert_eq!(held.next_due(), None, "out, so not due");
        held.back(&Slot::Key(("t".into(), b"a".to_vec())), now);
        assert!(held.is_empty(), "all went: the key is let go");
    }

    #[test]
    fn a_retry_that_fails_again_goes_back_in_front_of_rows_queued_meanwhile() {
        let now = Instant::now();
        let mut held = Held::new(100);
        held.hold(vec![record(1, Some("a"))], now, &at(10));
        let taken = held.take_due(now, 10);
        held.queue(record(4, Some("a")));
        held.hold(taken, now + Duration::from_secs(2), &at(99));
        let slot = Slot::Key(("t".into(), b"a".to_vec()));
        held.back(&slot, now);
        assert_eq!(held.pin(), Some(&at(10)), "the first pin stays");
        assert!(held.take_due(now + Duration::from_secs(1), 10).is_empty());
        assert_eq!(
            ids(&held.take_due(now + Duration::from_secs(2), 10)),
            [1, 4]
        );
    }

    #[test]
    fn due_slots_go_earliest_first_up_to_the_limit_and_the_rest_wait_for_the_next_round() {
        let now = Instant::now();
        let mut held = Held::new(100);
        held.hold(
            vec![record(3, Some("b"))],
            now + Duration::from_millis(2),
            &at(30),
        );
        held.hold(
            vec![record(1, Some("a")), record(2, Some("a"))],
            now,
            &at(10),
        );
        held.hold(
            vec![record(9, None)],
            now + Duration::from_millis(1),
            &at(20),
        );
        let taken = held.take_due(now + Duration::from_secs(1), 3);
        assert_eq!(ids(&taken), [1, 2, 9]);
        assert_eq!(ids(&held.take_due(now + Duration::from_secs(1), 3)), [3]);
        assert_eq!(held.pin(), Some(&at(10)));
    }

    #[test]
    fn past_the_limit_a_keys_rows_stay_in_the_table_and_are_read_back_in_order() {
        let now = Instant::now();
        let mut held = Held::new(2);
        held.hold(vec![record(1, Some("a"))], now, &at(10));
        held.queue(record(2, Some("a")));
        held.queue(record(3, Some("a")));
        held.queue(record(4, Some("a")));
        assert_eq!(held.kept(), 2);
        let key: Key = ("t".into(), b"a".to_vec());
        assert!(held.spilled().is_empty(), "not while kept rows wait");
        assert_eq!(ids(&held.take_due(now, 10)), [1, 2]);
        held.back(&Slot::Key(key.clone()), now);
        assert_eq!(held.spilled(), [(key.clone(), 3, 4)]);
        held.refill(&key, vec![record(3, Some("a"))], 3, false);
        assert_eq!(ids(&held.take_due(now, 10)), [3]);
        held.back(&Slot::Key(key.clone()), now);
        assert_eq!(held.spilled(), [(key.clone(), 4, 4)]);
        held.refill(&key, vec![], 4, true);
        assert!(held.is_empty(), "read back to the end: let go");
    }

    #[test]
    fn a_dropped_slot_frees_what_it_kept() {
        let now = Instant::now();
        let mut held = Held::new(10);
        held.hold(
            vec![record(1, Some("a")), record(2, Some("a"))],
            now,
            &at(10),
        );
        held.drop_slot(&Slot::Key(("t".into(), b"a".to_vec())));
        assert!(held.is_empty());
        assert_eq!(held.kept(), 0);
        assert_eq!(held.pin(), None);
    }

    #[test]
    fn positions_compare_by_file_then_offset() {
        let later_file = Position {
            file: "b.000002".into(),
            offset: 4,
        };
        assert_eq!(earlier(later_file.clone(), &at(900)), at(900));
        assert_eq!(earlier(at(5), &at(900)), at(5));
    }
}
