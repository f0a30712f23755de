//! The settler: every write of a session (marks, failed attempts, dead rows and the
//! position) in the order the tail hands them over, on the connection that holds the
//! lock.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use mysql::prelude::Queryable;
use mysql::{Conn, TxOpts};

use super::fence::Fence;
use super::lock::ping;
use super::position::{self, Position};
use super::worker::{Session, Settle, Tail};
use crate::error::{Error, Result, Worker};
use crate::record::Record;
use crate::runtime::signal::Signals;
use crate::store::sql::{bury, padded, placeholders, truncate, DELIVERED, PENDING};

/// Longest a position waits to be saved while the settler is busy marking.
const POSITION_INTERVAL: Duration = Duration::from_secs(1);
/// Most ids in one marking statement.
const MARK_CHUNK: usize = crate::store::sql::MAX_ID_LIST;
/// Most writes waiting for the settler: the tail publishes on while the settler marks
/// what was published before, all of it at once.
pub(super) const SETTLE_QUEUE: usize = 64;

impl Tail {
    /// Writes what the tail sends, in order, on the lock's connection: a relay that lost
    /// the lock lost that connection, and writes nothing more. Batches that queued up
    /// while the last write ran are marked together. The position after them is saved at
    /// most every [`POSITION_INTERVAL`], and once nothing came for that long: rows marked
    /// past a saved position are looked up, not sent again, by the next session (see
    /// `settled_high` in `start`). A write that fails is tried again a few times
    /// (a lock wait, a deadlock); then the session ends.
    pub(super) fn settle(
        &self,
        mut lock: Conn,
        settles: Receiver<Settle>,
        fence: &Fence,
    ) -> Result<()> {
        let table = self.store.table();
        let mut unsaved: Option<(Position, Option<String>)> = None;
        let mut saved = Instant::now();
        loop {
            let first = match settles.recv_timeout(POSITION_INTERVAL.min(fence.ping_after())) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => {
                    // Quiet: the position the last marks reached, or else a ping, which
                    // keeps the lock's connection from looking idle to the server.
                    if unsaved.is_none() && fence.due_for_ping() {
                        self.write(fence, || ping(&mut lock))?;
                    }
                    if let Some((at, gtid)) = unsaved.take() {
                        self.write(fence, || {
                            position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner)
                        })?;
                        saved = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut queued = vec![first];
            queued.extend(settles.try_iter().take(SETTLE_QUEUE));
            for settle in coalesce(queued) {
                let marking = Instant::now();
                match settle {
                    Settle::Delivered { ids, commit } => {
                        self.write(fence, || mark(&mut lock, table, &ids))?;
                        self.meter.stage("mark", marking.elapsed());
                        log::debug!("marked {} in {:?}", ids.len(), marking.elapsed());
                        unsaved = commit.or(unsaved);
                    }
                    Settle::Failed(failures) => {
                        self.write(fence, || record_failures(&mut lock, table, &failures))?
                    }
                    Settle::Position(at, gtid) => unsaved = Some((at, gtid)),
                    Settle::Bury(corrupt) => {
                        self.write(fence, || bury(&mut lock, table, &corrupt))?
                    }
                }
            }
            self.signals.succeeded(Worker::Settler);
            if saved.elapsed() >= POSITION_INTERVAL {
                if let Some((at, gtid)) = unsaved.take() {
                    self.write(fence, || {
                        position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner)
                    })?;
                    saved = Instant::now();
                }
            }
        }
        if let Some((at, gtid)) = unsaved {
            self.write(fence, || {
                position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner)
            })?;
        }
        Ok(())
    }

    /// Runs a write of the settler, again after a pause when it fails on anything but a
    /// lost connection, up to five times. Each that succeeds proves the lock is held.
    fn write(&self, fence: &Fence, mut write: impl FnMut() -> Result<()>) -> Result<()> {
        let mut pause = Duration::from_millis(50);
        let mut attempt = || {
            let sent = Instant::now();
            let written = write();
            if written.is_ok() {
                fence.proved(sent);
            }
            written
        };
        for _ in 0..5 {
            match attempt() {
                Err(e) if !matches!(e, Error::Database(mysql::Error::IoError(_))) => {
                    self.signals.report(e);
                    Signals::wait(pause);
                    pause *= 2;
                }
                done => return done,
            }
        }
        attempt()
    }

    /// Queues a write for the settler; an error when the settler has ended (its error
    /// is the session's).
    pub(super) fn hand_over(&self, session: &Session, settle: Settle) -> Result<()> {
        session
            .settler
            .send(settle)
            .map_err(|_| Error::Refused("the binlog relay's settler ended".into()))
    }
}

/// Writes in the order given, with each run of consecutive [`Settle::Delivered`] made one:
/// their ids together and the last position among them.
fn coalesce(queued: Vec<Settle>) -> Vec<Settle> {
    let mut out: Vec<Settle> = Vec::with_capacity(queued.len());
    for settle in queued {
        match (out.last_mut(), settle) {
            (
                Some(Settle::Delivered { ids, commit }),
                Settle::Delivered {
                    ids: more,
                    commit: later,
                },
            ) => {
                ids.extend(more);
                if later.is_some() {
                    *commit = later;
                }
            }
            (_, settle) => out.push(settle),
        }
    }
    out
}

/// Marks `ids` delivered, by primary key only (the lock's connection reads in READ
/// COMMITTED: the rows of transactions still open, writers' new rows, are neither scanned
/// nor waited for).
fn mark(lock: &mut Conn, table: &str, ids: &[u64]) -> Result<()> {
    // Padded to a few lengths, so that the connection reuses its prepared statements.
    for chunk in ids.chunks(MARK_CHUNK) {
        let params = padded(chunk);
        lock.exec_drop(
            format!(
                "UPDATE `{table}` FORCE INDEX (PRIMARY) SET state = {DELIVERED}, \
                 processed_on = UTC_TIMESTAMP(6), last_attempted_on = UTC_TIMESTAMP(6), number_of_attempts = number_of_attempts + 1 \
                 WHERE state = {PENDING} AND locked_by = 0 AND id IN ({})",
                placeholders(params.len())
            ),
            params,
        )?;
    }
    Ok(())
}

/// Writes failed attempts: the count, the error, and dead at `max_attempts`.
fn record_failures(
    lock: &mut Conn,
    table: &str,
    failures: &[(Record, String, bool)],
) -> Result<()> {
    let mut tx = lock.start_transaction(TxOpts::default())?;
    for (record, error, dead) in failures {
        let state = if *dead { 2 } else { 0 };
        tx.exec_drop(
            format!(
                "UPDATE `{table}` SET number_of_attempts = ?, error = ?, \
                 last_attempted_on = UTC_TIMESTAMP(6), state = ?, \
                 processed_on = IF(? = 2, UTC_TIMESTAMP(6), processed_on) \
                 WHERE id = ? AND state = {PENDING} AND locked_by = 0"
            ),
            (record.attempts, truncate(error), state, state, record.id),
        )?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(ids: &[u64], at: Option<u64>) -> Settle {
        Settle::Delivered {
            ids: ids.to_vec(),
            commit: at.map(|offset| {
                (
                    Position {
                        file: "b.000001".into(),
                        offset,
                    },
                    None,
                )
            }),
        }
    }

    #[test]
    fn consecutive_marks_become_one_with_the_last_position_and_other_writes_keep_their_place() {
        let position = |offset| Position {
            file: "b.000001".into(),
            offset,
        };
        let queued = vec![
            delivered(&[1, 2], Some(10)),
            delivered(&[3], None),
            Settle::Position(position(20), None),
            delivered(&[4], Some(30)),
            delivered(&[5], Some(40)),
        ];
        let out = coalesce(queued);
        assert_eq!(out.len(), 3);
        match &out[0] {
            Settle::Delivered { ids, commit } => {
                assert_eq!(ids, &[1, 2, 3]);
                assert_eq!(
                    commit.as_ref().map(|c| c.0.offset),
                    Some(10),
                    "a run without a later position keeps its own"
                );
            }
            _ => panic!("marks first"),
        }
        assert!(matches!(&out[1], Settle::Position(p, _) if p.offset == 20));
        match &out[2] {
            Settle::Delivered { ids, commit } => {
                assert_eq!(ids, &[4, 5]);
                assert_eq!(commit.as_ref().map(|c| c.0.offset), Some(40));
            }
            _ => panic!("marks last"),
        }
    }
}
