//! Following the binary log: each row read is published in commit order ([`publish`]),
//! gathered into batches while a backlog is read; a row of a key held behind a failed
//! or a dead message waits.
//!
//! [`publish`]: super::publish

use std::time::{Duration, Instant};

use crossbeam_channel::{after, select, Receiver, RecvTimeoutError, TryRecvError};
use mysql::prelude::Queryable;

use super::change::{Change, PartialKind};
use super::events;
use super::hold::Slot;
use super::worker::Settle;
use super::worker::{Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::record::Record;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::sql::{DISCARDED, PENDING};
use crate::time::{micros_of, time};

/// How long the tail waits for a change when nothing else is due.
const IDLE: Duration = Duration::from_secs(3600);
/// How long a position reached only through other tables' transactions waits before it
/// is saved: saving it costs a write, and only shortens what a restart reads again.
pub(super) const SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// A batch that gathered this many rows without a pause is reading a backlog, and waits
/// up to [`GATHER_GAP`] for each next row before it is published.
const BACKLOG_BATCH: usize = 64;
/// How long a backlog's batch waits for its next row (measured on a 100,000-row drain:
/// a wait of 2 ms halved the produce requests; 0.5 ms gave the fastest drains, about a
/// tenth faster than none).
const GATHER_GAP: Duration = Duration::from_micros(500);

impl Tail {
    /// Publishes each change as it comes, in the order of the binary log: rows are
    /// gathered while more are waiting and published as soon as none is, or when a
    /// batch is full.
    pub(super) fn follow(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        changes: &Receiver<Result<Change>>,
    ) -> Result<()> {
        let gone = events::stream_ended;
        loop {
            let change = match changes.try_recv() {
                Ok(change) => change?,
                Err(TryRecvError::Disconnected) => return Err(gone()),
                Err(TryRecvError::Empty) => {
                    if let Some(change) = self.gather(session, changes)? {
                        change
                    } else {
                        self.flush(broker, session, SAVE_INTERVAL)?;
                        self.retry(broker, session)?;
                        self.release_scheduled(broker, session)?;
                        self.sweep(broker, session)?;
                        self.signals.succeeded(Worker::Relay);
                        let save = if session.foreign && session.commit.is_some() {
                            SAVE_INTERVAL.saturating_sub(session.last_save.elapsed())
                        } else {
                            IDLE
                        };
                        let now = Instant::now();
                        let retry = session
                            .held
                            .next_due()
                            .map_or(IDLE, |due| due.saturating_duration_since(now))
                            .min(self.next_scheduled(session).unwrap_or(IDLE))
                            .min(session.sweep.due_in(now, self.binlog.sweep_after));
                        select! {
                            recv(changes) -> change => match change {
                                Ok(change) => change?,
                                Err(_) => return Err(gone()),
                            },
                            recv(self.signals.stop) -> _ => return Ok(()),
                            recv(after(save.min(retry))) -> _ => continue,
                        }
                    }
                }
            };
            self.apply(broker, session, change)?;
            if self.signals.stopped() {
                return Ok(());
            }
        }
    }

    /// Acts on one change read from the binary log.
    fn apply(&self, broker: &mut impl Broker, session: &mut Session, change: Change) -> Result<()> {
        match change {
            Change::Inserted(record) => {
                if self.blocked(session, &record)
                    || session.ahead.published(record.id, &session.read_through)
                {
                    return Ok(());
                }
                if session.held.holds(&record) {
                    session.held.queue(record);
                    return Ok(());
                }
                if session.batch.is_empty() {
                    session.batch_pin = Some(session.read_through.clone());
                    session.batch_since = Instant::now();
                }
                session.batch.push(record);
                if session.batch.len() >= self.settings.batch_size {
                    self.flush(broker, session, SAVE_INTERVAL)?;
                    self.retry(broker, session)?;
                    self.release_scheduled(broker, session)?;
                }
            }
            Change::Scheduled { id, key, due } => {
                let slot = match key {
                    Some(key) => Slot::Key(key),
                    None => Slot::Row(id),
                };
                session.schedule.add(id, slot, due);
            }
            Change::Committed { at, gtid, foreign } => {
                session.read_through = at.clone();
                session.commit = Some((at, gtid));
                session.foreign |= foreign;
            }
            Change::Corrupt { id, reason, key } => {
                // Its key's later rows wait behind it as behind any dead row.
                if let Some(key) = key.filter(|_| self.settings.dead_blocks_key) {
                    session.blocked.insert(key);
                }
                self.hand_over(session, Settle::Bury(vec![(id, reason)]))?;
            }
            Change::Revived { id, key, replayed } => {
                let replayed =
                    replayed.filter(|_| !session.ahead.published(id, &session.read_through));
                self.flush(broker, session, SAVE_INTERVAL)?;
                self.revive(broker, session, id, key, replayed)?;
            }
            Change::Partial { id, kind } => {
                if let Some(change) = self.read_back(id, kind)? {
                    return self.apply(broker, session, change);
                }
            }
        }
        Ok(())
    }

    /// The change a row the binary log gave only in part stands for, read from the table
    /// by its id: `None` when the row is no longer what the binary log saw (settled since,
    /// or deleted). The read locks the row for a moment: its transaction, whose commit
    /// the binary log holds already, may not be visible yet, and a locking read waits for
    /// it instead of concluding that the row is not there.
    fn read_back(&self, id: u64, kind: PartialKind) -> Result<Option<Change>> {
        let table = self.store.table();
        let row: Option<mysql::Row> = self.store.pool().get_conn()?.exec_first(
            format!(
                "SELECT {RECORD_COLUMNS}, o.state, o.topic, o.msg_key, \
                   o.number_of_attempts = 0 AND o.available_on > o.created_on, {} \
                 FROM `{table}` o WHERE o.id = ? LOCK IN SHARE MODE",
                micros_of("o.available_on")
            ),
            (id,),
        )?;
        let Some(mut row) = row else {
            return Ok(None);
        };
        let state: Option<u8> = row.take(8);
        let topic: Option<String> = row.take(9);
        let key: Option<Option<Vec<u8>>> = row.take(10);
        let key = topic.zip(key.flatten());
        let delayed: Option<bool> = row.take(11);
        let due: Option<i64> = row.take(12);
        let wanted = match kind {
            PartialKind::Inserted | PartialKind::Replayed => PENDING,
            PartialKind::Discarded => DISCARDED,
        };
        if state != Some(wanted) {
            return Ok(None);
        }
        if let (PartialKind::Inserted, Some(true), Some(due)) = (kind, delayed, due) {
            return Ok(Some(Change::Scheduled {
                id,
                key,
                due: time(due),
            }));
        }
        if kind == PartialKind::Discarded {
            return Ok(Some(Change::Revived {
                id,
                key,
                replayed: None,
            }));
        }
        Ok(Some(match decode_record(row) {
            Ok(record) if kind == PartialKind::Inserted => Change::Inserted(record),
            Ok(record) => Change::Revived {
                id,
                key,
                replayed: Some(record),
            },
            Err(Error::CorruptRow { id, reason }) => Change::Corrupt { id, reason, key },
            Err(e) => return Err(e),
        }))
    }

    /// The next change, if it comes within [`GATHER_GAP`] while a backlog is read (the
    /// batch holds [`BACKLOG_BATCH`] rows or more and is not full), or, for a batch of a
    /// few rows, before `linger` has passed since its first: fuller batches are fewer
    /// produce requests and marks, which cost the broker and the database less. With no
    /// linger (the default), the steady trickle of commits does not wait.
    fn gather(
        &self,
        session: &Session,
        changes: &Receiver<Result<Change>>,
    ) -> Result<Option<Change>> {
        let gathered = session.batch.len();
        if gathered == 0 || gathered >= self.settings.batch_size {
            return Ok(None);
        }
        let wait = if gathered >= BACKLOG_BATCH {
            GATHER_GAP
        } else {
            (session.batch_since + self.binlog.linger).saturating_duration_since(Instant::now())
        };
        if wait.is_zero() {
            return Ok(None);
        }
        match changes.recv_timeout(wait) {
            Ok(change) => change.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(events::stream_ended()),
        }
    }

    /// Whether `record` waits behind a dead or a delayed message of its key.
    pub(super) fn blocked(&self, session: &Session, record: &Record) -> bool {
        let Some(key) = record.message.key() else {
            return false;
        };
        if session.blocked.is_empty() && session.schedule.is_empty() {
            return false;
        }
        let key = (record.message.topic().to_string(), key.to_vec());
        session.blocked.contains(&key) || session.schedule.holds(&key)
    }
}
