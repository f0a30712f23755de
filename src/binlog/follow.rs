//! Following the binary log: each row read is published in commit order, gathered into
//! batches while a backlog is read, retried after a failure, and handed to the settler.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{after, select, Receiver, RecvTimeoutError, TryRecvError};
use mysql::prelude::Queryable;

use super::events::{self, Change, PartialKind};
use super::worker::Settle;
use super::worker::{Session, Tail};
use crate::broker::Broker;
use crate::dispatcher::backoff::backoff;
use crate::error::{Error, Result, Worker};
use crate::record::Record;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::mysql::{padded, placeholders};
use crate::store::mysql::{DISCARDED, PENDING};

/// How long a position reached only through other tables' transactions waits before it
/// is saved: saving it costs a write, and only shortens what a restart reads again.
const SAVE_INTERVAL: Duration = Duration::from_secs(10);
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
                        if !self.flush(broker, session)? {
                            return Ok(());
                        }
                        self.signals.succeeded(Worker::Relay);
                        let due = if session.foreign && session.commit.is_some() {
                            SAVE_INTERVAL.saturating_sub(session.last_save.elapsed())
                        } else {
                            Duration::from_secs(3600)
                        };
                        select! {
                            recv(changes) -> change => match change {
                                Ok(change) => change?,
                                Err(_) => return Err(gone()),
                            },
                            recv(self.signals.stop) -> _ => return Ok(()),
                            recv(after(due)) -> _ => continue,
                        }
                    }
                }
            };
            if !self.apply(broker, session, change)? {
                return Ok(());
            }
        }
    }

    /// Acts on one change read from the binary log; false when the stop signal came
    /// during a publish's retries.
    fn apply(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        change: Change,
    ) -> Result<bool> {
        match change {
            Change::Inserted(record) => {
                if self.held(session, &record) {
                    return Ok(true);
                }
                session.batch.push(record);
                if session.batch.len() >= self.settings.batch_size {
                    return self.flush(broker, session);
                }
            }
            Change::Committed { at, gtid, foreign } => {
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
                return Ok(self.flush(broker, session)?
                    && self.revive(broker, session, id, key, replayed)?);
            }
            Change::Partial { id, kind } => {
                if let Some(change) = self.read_back(id, kind)? {
                    return self.apply(broker, session, change);
                }
            }
        }
        Ok(true)
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
                "SELECT {RECORD_COLUMNS}, o.state, o.topic, o.msg_key FROM `{table}` o \
                 WHERE o.id = ? LOCK IN SHARE MODE"
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
        let wanted = match kind {
            PartialKind::Inserted | PartialKind::Replayed => PENDING,
            PartialKind::Discarded => DISCARDED,
        };
        if state != Some(wanted) {
            return Ok(None);
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
    /// batch holds [`BACKLOG_BATCH`] rows or more and is not full): fuller batches are
    /// fewer produce requests, which cost the broker less. A batch of a few rows, the
    /// steady trickle of commits, does not wait.
    fn gather(
        &self,
        session: &Session,
        changes: &Receiver<Result<Change>>,
    ) -> Result<Option<Change>> {
        let gathered = session.batch.len();
        if gathered < BACKLOG_BATCH || gathered >= self.settings.batch_size {
            return Ok(None);
        }
        match changes.recv_timeout(GATHER_GAP) {
            Ok(change) => change.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(events::stream_ended()),
        }
    }

    /// Whether `record` waits behind a dead message of its key.
    pub(super) fn held(&self, session: &Session, record: &Record) -> bool {
        let Some(key) = record.message.key() else {
            return false;
        };
        !session.blocked.is_empty()
            && session
                .blocked
                .contains(&(record.message.topic().to_string(), key.to_vec()))
    }

    /// Publishes the batch and hands its rows to the settler, with the position after it;
    /// or hands over a position that only other tables' transactions moved once it is
    /// [`SAVE_INTERVAL`] old. False when the stop signal came during retries (what was
    /// acknowledged is still marked).
    pub(super) fn flush(&self, broker: &mut impl Broker, session: &mut Session) -> Result<bool> {
        let table = self.store.table();
        if session.batch.is_empty() {
            if session.foreign && session.last_save.elapsed() >= SAVE_INTERVAL {
                if let Some((at, gtid)) = session.commit.take() {
                    self.hand_over(session, Settle::Position(at, gtid))?;
                }
                session.foreign = false;
                session.last_save = Instant::now();
            }
            return Ok(true);
        }
        let mut records = std::mem::take(&mut session.batch);
        if records.iter().any(|r| r.id <= session.verify_below) {
            let below: Vec<u64> = records
                .iter()
                .filter(|r| r.id <= session.verify_below)
                .map(|r| r.id)
                .collect();
            // Padded to a few lengths, so that the connection reuses its prepared statements.
            let ids = padded(&below);
            // Any connection of the pool. The read locks the rows for a moment: a row whose
            // commit the binary log holds may not be visible yet, and a plain read would
            // conclude it is not pending and drop it for good; a locking read waits for it.
            let pending: HashSet<u64> = self
                .store
                .pool()
                .get_conn()?
                .exec::<u64, _, _>(
                    format!(
                        "SELECT id FROM `{table}` WHERE state = 0 AND id IN ({}) \
                         LOCK IN SHARE MODE",
                        placeholders(ids.len())
                    ),
                    ids,
                )?
                .into_iter()
                .collect();
            records.retain(|r| r.id > session.verify_below || pending.contains(&r.id));
        }
        let started = Instant::now();
        let (delivered, finished) = self.publish(broker, session, records)?;
        let published = Instant::now();
        self.signals.succeeded(Worker::Relay);
        self.meter.stage("publish", published - started);
        self.meter.settled(
            delivered.iter(),
            SystemTime::now(),
            std::iter::empty(),
            std::iter::empty(),
        );
        let commit = if finished {
            session.commit.take()
        } else {
            None
        };
        if commit.is_some() {
            session.foreign = false;
            session.last_save = Instant::now();
        }
        let ids: Vec<u64> = delivered.iter().map(|r| r.id).collect();
        let count = ids.len();
        self.hand_over(session, Settle::Delivered { ids, commit })?;
        log::debug!(
            "published {count} in {:?}, handed over in {:?}",
            published - started,
            published.elapsed()
        );
        Ok(finished)
    }

    /// Publishes `records` until each is acknowledged or dead, retrying failures after a
    /// backoff, a key's later records behind its failed one. Returns the acknowledged
    /// records, and false if the stop signal cut the retries short.
    fn publish(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        mut pending: Vec<Record>,
    ) -> Result<(Vec<Record>, bool)> {
        let mut delivered = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
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
            let mut outcomes = broker.publish(&pending);
            outcomes.resize_with(pending.len(), || {
                Err(Error::Broker("the broker returned no outcome".into()))
            });
            let mut retry = Vec::new();
            let mut failed_keys = HashSet::new();
            let mut failures: Vec<(Record, String, bool)> = Vec::new();
            let mut first_error = None;
            for (mut record, outcome) in pending.into_iter().zip(outcomes) {
                let key = record
                    .message
                    .order_key()
                    .map(|(topic, key)| (topic.to_string(), key.to_vec()));
                let behind = key.as_ref().is_some_and(|k| failed_keys.contains(k));
                match outcome {
                    Ok(()) => {
                        if behind {
                            log::error!(
                                "message {} was acknowledged after an earlier message of its key \
                                 failed: that key's order is broken in Kafka",
                                record.message_id
                            );
                        }
                        delivered.push(record);
                    }
                    Err(_) if behind => retry.push(record),
                    Err(Error::NotSent(_)) => {
                        failed_keys.extend(key);
                        retry.push(record);
                    }
                    Err(e) => {
                        failed_keys.extend(key);
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
                            if self.settings.dead_blocks_key {
                                if let Some(k) = record.message.key() {
                                    session
                                        .blocked
                                        .insert((record.message.topic().to_string(), k.to_vec()));
                                }
                            }
                        } else {
                            retry.push(record);
                        }
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                self.signals.report(e);
            }
            if !failures.is_empty() {
                let failed: Vec<&Record> = failures.iter().map(|(r, ..)| r).collect();
                let dead: Vec<&Record> = failures.iter().filter(|f| f.2).map(|(r, ..)| r).collect();
                self.meter
                    .settled(std::iter::empty(), SystemTime::now(), failed, dead);
                self.hand_over(session, Settle::Failed(failures))?;
            }
            // Behind a message that just died: later rows of its key stay pending.
            retry.retain(|record| !self.held(session, record));
            pending = retry;
            if let Some(most) = pending.iter().map(|r| r.attempts).max() {
                let wait = backoff(
                    most.max(1),
                    self.settings.backoff_min,
                    self.settings.backoff_max,
                );
                self.signals.pause(wait);
                if self.signals.stopped() {
                    return Ok((delivered, false));
                }
            }
        }
        Ok((delivered, true))
    }
}
