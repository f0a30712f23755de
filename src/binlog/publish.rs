//! Publishing what the tail gathered, and trying again what failed: each batch is sent
//! once; a message that fails is held with the later messages of its key
//! ([`hold`](super::hold)) and tried again when its backoff ends, while everything else
//! goes on. What was acknowledged is handed to the settler, with the position after it,
//! which never passes a row still held.

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

use mysql::prelude::Queryable;

use super::delayed::{due_columns, not_due};
use super::hold::{earlier, Slot};
use super::position::Position;
use super::worker::{Key, Session, Settle, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::record::Record;
use crate::runtime::backoff::backoff;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::sql::{padded, placeholders, PENDING};

/// How a publish left one slot's records.
struct Failed {
    /// The records to hold, in order: the one that failed (or came back untried) first.
    records: Vec<Record>,
    /// When to try them again.
    due: Instant,
}

impl Tail {
    /// Publishes the batch and hands its rows to the settler, with the position after it
    /// (or before the oldest row held, if that is earlier); or hands over a position that
    /// only other tables' transactions moved once it is `save_every` old.
    pub(super) fn flush(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        save_every: std::time::Duration,
    ) -> Result<()> {
        if session.batch.is_empty() {
            if session.foreign && session.last_save.elapsed() >= save_every {
                if let Some((at, gtid)) = session.commit.take() {
                    let (at, gtid) = pinned(session, at, gtid);
                    self.hand_over(session, Settle::Position(at, gtid))?;
                }
                session.foreign = false;
                session.last_save = Instant::now();
            }
            return Ok(());
        }
        let mut records = std::mem::take(&mut session.batch);
        let pin = session
            .batch_pin
            .take()
            .unwrap_or_else(|| session.read_through.clone());
        self.verify(session, &mut records)?;
        let started = Instant::now();
        let delivered = self.publish(broker, session, records, &pin)?;
        let published = Instant::now();
        self.signals.succeeded(Worker::Relay);
        self.meter.stage("publish", published - started);
        let commit = session
            .commit
            .take()
            .map(|(at, gtid)| pinned(session, at, gtid));
        if commit.is_some() {
            session.foreign = false;
            session.last_save = Instant::now();
        }
        let ids: Vec<u64> = delivered.iter().map(|r| r.id).collect();
        log::debug!("published {} in {:?}", ids.len(), published - started);
        self.hand_over(session, Settle::Delivered { ids, commit })
    }

    /// Tries again the held rows whose backoff ended (reading back first, for a key
    /// whose kept rows all went out, its rows left in the table), up to a batch.
    pub(super) fn retry(&self, broker: &mut impl Broker, session: &mut Session) -> Result<()> {
        for (key, first, last) in session.held.spilled() {
            self.read_spilled(session, &key, first, last)?;
        }
        let due = session
            .held
            .take_due(Instant::now(), self.settings.batch_size);
        if due.is_empty() {
            return Ok(());
        }
        let slots: HashSet<Slot> = due.iter().map(Slot::of).collect();
        // Their slots keep the pins they were first held with.
        let pin = session.read_through.clone();
        let delivered = self.publish(broker, session, due, &pin)?;
        let now = Instant::now();
        for slot in &slots {
            session.held.back(slot, now);
        }
        let ids: Vec<u64> = delivered.iter().map(|r| r.id).collect();
        self.hand_over(session, Settle::Delivered { ids, commit: None })
    }

    /// Drops the rows the session may have settled before it read them (see
    /// `settled_high` in `start`) unless they are still pending, and takes their failed
    /// attempts from the table. The read locks the rows for a moment: a row whose commit
    /// the binary log holds may not be visible yet, and a plain read would conclude it is
    /// not pending and drop it for good; a locking read waits for it.
    fn verify(&self, session: &Session, records: &mut Vec<Record>) -> Result<()> {
        let below: Vec<u64> = records
            .iter()
            .filter(|r| r.id <= session.verify_below)
            .map(|r| r.id)
            .collect();
        if below.is_empty() {
            return Ok(());
        }
        // Padded to a few lengths, so that the connection reuses its prepared statements.
        let ids = padded(&below);
        let pending: HashMap<u64, u32> = self
            .store
            .pool()
            .get_conn()?
            .exec::<(u64, u32), _, _>(
                format!(
                    "SELECT id, number_of_attempts FROM `{}` WHERE state = {PENDING} AND id IN ({}) \
                     LOCK IN SHARE MODE",
                    self.store.table(),
                    placeholders(ids.len())
                ),
                ids,
            )?
            .into_iter()
            .collect();
        records.retain_mut(|r| {
            if r.id > session.verify_below {
                return true;
            }
            match pending.get(&r.id) {
                Some(&attempts) => {
                    r.attempts = attempts;
                    true
                }
                None => false,
            }
        });
        Ok(())
    }

    /// Publishes `records` once. What the broker acknowledged is returned; a message
    /// that failed is held with the later messages of its slot until its backoff ends
    /// (the saved position staying at or before `pin`, where it was read), or is dead at
    /// `max_attempts`: then, with `dead_blocks_key`, its key's later rows stay in the
    /// table until an operator acts.
    fn publish(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        records: Vec<Record>,
        pin: &Position,
    ) -> Result<Vec<Record>> {
        // Fencing by time: publish only while the lock is known to be held.
        if !session.fence.holds() {
            let fenced = || {
                Error::Refused(format!(
                    "the binlog relay {} could not prove for {:?} that it still holds the \
                     table's lock (its connection to the server is cut, or the server is \
                     silent): it publishes nothing more before the server could let a \
                     standby take over",
                    self.owner,
                    self.binlog.lock_timeout - self.binlog.lock_timeout / 4
                ))
            };
            // Said now: the session's end may be explained by the settler's error.
            self.signals.report(fenced());
            return Err(fenced());
        }
        let mut outcomes = broker.publish(&records);
        outcomes.resize_with(records.len(), || {
            Err(Error::Broker("the broker returned no outcome".into()))
        });
        let now = Instant::now();
        let mut delivered = Vec::with_capacity(records.len());
        let mut failed: HashMap<Slot, Failed> = HashMap::new();
        // Slots whose message died holding its key back: their later rows stay pending.
        let mut dead_keys: HashSet<Slot> = HashSet::new();
        let mut failures: Vec<(Record, String, bool)> = Vec::new();
        let mut first_error = None;
        for (mut record, outcome) in records.into_iter().zip(outcomes) {
            let slot = Slot::of(&record);
            if dead_keys.contains(&slot) {
                continue;
            }
            if let Some(behind) = failed.get_mut(&slot) {
                if outcome.is_ok() {
                    log::error!(
                        "message {} was acknowledged after an earlier message of its key \
                         failed: that key's order is broken in Kafka",
                        record.message_id
                    );
                    delivered.push(record);
                } else {
                    behind.records.push(record);
                }
                continue;
            }
            match outcome {
                Ok(()) => delivered.push(record),
                // Never tried: it waits as long as a failure of its own would.
                Err(Error::NotSent(_)) => {
                    let due = now + self.settings.backoff_min;
                    failed.insert(
                        slot,
                        Failed {
                            records: vec![record],
                            due,
                        },
                    );
                }
                Err(e) => {
                    record.attempts = record.attempts.saturating_add(1);
                    let dead = self
                        .settings
                        .max_attempts
                        .is_some_and(|max| record.attempts >= max);
                    failures.push((record.clone(), e.to_string(), dead));
                    if dead {
                        log::error!(
                            "message {} (row {}) is dead after {} attempts: {e}",
                            record.message_id,
                            record.id,
                            record.attempts
                        );
                        if let (true, Slot::Key(key)) = (self.settings.dead_blocks_key, &slot) {
                            session.blocked.insert(key.clone());
                            session.held.drop_slot(&slot);
                            dead_keys.insert(slot);
                        } else {
                            // Its later rows go on at once.
                            failed.insert(
                                slot,
                                Failed {
                                    records: Vec::new(),
                                    due: now,
                                },
                            );
                        }
                    } else {
                        let wait = backoff(
                            record.attempts,
                            self.settings.backoff_min,
                            self.settings.backoff_max,
                        );
                        failed.insert(
                            slot,
                            Failed {
                                records: vec![record],
                                due: now + wait,
                            },
                        );
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            self.signals.report(e);
        }
        for (_, held) in failed {
            session.held.hold(held.records, held.due, pin);
        }
        self.meter.settled(
            delivered.iter(),
            SystemTime::now(),
            failures.iter().map(|(r, ..)| r),
            failures.iter().filter(|f| f.2).map(|(r, ..)| r),
        );
        if !failures.is_empty() {
            self.hand_over(session, Settle::Failed(failures))?;
        }
        Ok(delivered)
    }

    /// Reads back up to a batch of `key`'s rows left in the table, from `first` to `last`,
    /// in id order, with a locking read (every one of them was read from the binary log:
    /// committed, if perhaps not visible yet). A delayed row ends the read: it and the
    /// rows after it are the schedule's, which publishes them in order when it is due.
    fn read_spilled(&self, session: &mut Session, key: &Key, first: u64, last: u64) -> Result<()> {
        let limit = self.settings.batch_size;
        let rows: Vec<mysql::Row> = self.store.pool().get_conn()?.exec(
            format!(
                "SELECT {RECORD_COLUMNS}, {} FROM `{}` o WHERE o.topic = ? AND o.msg_key = ? \
                 AND o.state = {PENDING} AND o.id BETWEEN ? AND ? ORDER BY o.id LIMIT {limit} \
                 LOCK IN SHARE MODE",
                due_columns(),
                self.store.table()
            ),
            (&key.0, &key.1, first, last),
        )?;
        let exhausted = rows.len() < limit;
        let mut records = Vec::with_capacity(rows.len());
        let mut read_to = first;
        for mut row in rows {
            let due = not_due(&mut row);
            let id: u64 = row.get(0).unwrap_or_default();
            if session.schedule.has(id) || due.is_some() {
                if let Some(due) = due {
                    session.schedule.add(id, Slot::Key(key.clone()), due);
                }
                session.held.refill(key, records, id, true);
                return Ok(());
            }
            match decode_record(row) {
                Ok(record) => {
                    read_to = record.id;
                    records.push(record);
                }
                Err(Error::CorruptRow { id, reason }) => {
                    // Dead, as the claim makes such a row. With `dead_blocks_key` the rows
                    // before it go, and what follows it stays in the table until an
                    // operator acts; else it is passed over.
                    self.hand_over(session, Settle::Bury(vec![(id, reason)]))?;
                    read_to = id;
                    if self.settings.dead_blocks_key {
                        session.held.refill(key, records, read_to, true);
                        session.blocked.insert(key.clone());
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        session.held.refill(key, records, read_to, exhausted);
        Ok(())
    }
}

/// The position to save after `at`: `at`, or the pin of the oldest row still held when
/// that is earlier (then without the GTID, which names `at`'s transaction).
fn pinned(session: &Session, at: Position, gtid: Option<String>) -> (Position, Option<String>) {
    match session.held.pin() {
        Some(pin) if (&pin.file, pin.offset) < (&at.file, at.offset) => (earlier(at, pin), None),
        _ => (at, gtid),
    }
}
