//! Delayed messages in the binlog relay: read back from the table when a session starts,
//! and published from the table, with their keys' later rows, when they are due.

use std::time::{Duration, Instant, SystemTime};

use mysql::prelude::Queryable;

use super::follow::SAVE_INTERVAL;
use super::hold::Slot;
use super::schedule::Schedule;
use super::worker::{Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::store::codec::{decode_record, RECORD_COLUMNS, RECORD_WIDTH};
use crate::store::sql::{scheduled, PENDING};
use crate::time::{micros_of, micros_since_epoch, time};

/// How long a delayed row whose key is held behind a failure waits before it is tried
/// again.
const HELD_RECHECK: Duration = Duration::from_secs(1);

/// The columns a read of pending rows adds after [`RECORD_COLUMNS`] (its rows aliased
/// `o`) to learn which of them are delayed rows not due yet; [`not_due`] reads them.
pub(super) fn due_columns() -> String {
    format!("{}, {}", scheduled("o"), micros_of("o.available_on"))
}

/// Takes the [`due_columns`] out of `row`: when it is a delayed row not due yet, the time
/// it is due (the database's clock).
pub(super) fn not_due(row: &mut mysql::Row) -> Option<SystemTime> {
    let not_due: Option<bool> = row.take(RECORD_WIDTH);
    let due: Option<i64> = row.take(RECORD_WIDTH + 1);
    match (not_due, due) {
        (Some(true), Some(due)) => Some(time(due)),
        _ => None,
    }
}

impl Tail {
    /// The delayed rows pending in the table, and the database's clock ahead of this
    /// host's, in microseconds. A session reads them at its start: the saved position may
    /// lie past their events, which a session that stopped read without publishing.
    pub(super) fn scheduled_rows(
        &self,
        conn: &mut impl Queryable,
        table: &str,
    ) -> Result<(Schedule, i64)> {
        let before = SystemTime::now();
        let now: Option<i64> =
            conn.query_first(format!("SELECT {}", micros_of("UTC_TIMESTAMP(6)")))?;
        let local = before + before.elapsed().unwrap_or_default() / 2;
        let offset = now.unwrap_or_default() - micros_since_epoch(local);
        let rows: Vec<(u64, String, Option<Vec<u8>>, i64)> = conn.query(format!(
            "SELECT id, topic, msg_key, {} FROM `{table}` WHERE state = {PENDING} \
             AND locked_by = 0 AND number_of_attempts = 0 AND available_on > created_on ORDER BY id",
            micros_of("available_on")
        ))?;
        let mut schedule = Schedule::default();
        for (id, topic, key, due) in rows {
            let slot = match key {
                Some(key) => Slot::Key((topic, key)),
                None => Slot::Row(id),
            };
            schedule.add(id, slot, time(due));
        }
        Ok((schedule, offset))
    }

    /// This host's clock read as the database's.
    pub(super) fn database_now(&self, session: &Session) -> SystemTime {
        let shift = Duration::from_micros(session.clock_offset.unsigned_abs());
        let now = SystemTime::now();
        if session.clock_offset >= 0 {
            now + shift
        } else {
            now.checked_sub(shift).unwrap_or(now)
        }
    }

    /// How long until the next delayed row is due.
    pub(super) fn next_scheduled(&self, session: &Session) -> Option<Duration> {
        let due = session.schedule.next_due()?;
        Some(
            due.duration_since(self.database_now(session))
                .unwrap_or_default(),
        )
    }

    /// Publishes the delayed rows that are due, each with its key's rows after it, in id
    /// order, up to the next row of the key not due yet. A key held behind a failure
    /// waits for it; one held behind a dead row goes when that row is replayed or
    /// discarded.
    pub(super) fn release_scheduled(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
    ) -> Result<()> {
        let now = self.database_now(session);
        let due = session.schedule.take_due(now);
        if due.is_empty() {
            return Ok(());
        }
        self.flush(broker, session, SAVE_INTERVAL)?;
        let mut conn = self.store.pool().get_conn()?;
        for (id, slot) in due {
            if session.held.holds_slot(&slot) {
                session.schedule.add(id, slot, now + HELD_RECHECK);
                continue;
            }
            match slot {
                Slot::Key(key) if session.blocked.contains(&key) => {}
                Slot::Key(key) => {
                    self.release_key(broker, session, &mut conn, &key, (id, 0), Vec::new())?
                }
                Slot::Row(id) => self.release_row(broker, session, &mut conn, id)?,
            }
        }
        Ok(())
    }

    /// Publishes the delayed row `id`, which has no key, if it is still pending and due.
    fn release_row(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        conn: &mut mysql::PooledConn,
        id: u64,
    ) -> Result<()> {
        if session.schedule.published(id) {
            return Ok(());
        }
        let row: Option<mysql::Row> = conn.exec_first(
            format!(
                "SELECT {RECORD_COLUMNS}, {} FROM `{}` o WHERE o.id = ? \
                 AND o.state = {PENDING} AND o.locked_by = 0",
                due_columns(),
                self.store.table()
            ),
            (id,),
        )?;
        let Some(mut row) = row else {
            return Ok(());
        };
        if let Some(due) = not_due(&mut row) {
            session.schedule.add(id, Slot::Row(id), due);
            return Ok(());
        }
        match decode_record(row) {
            Ok(record) => {
                session.schedule.released([id], Instant::now());
                if session.batch.is_empty() {
                    session.batch_pin = Some(session.read_through.clone());
                }
                session.batch.push(record);
                self.flush(broker, session, SAVE_INTERVAL)
            }
            // A row that is no message is the claim's and the tail's to bury: left.
            Err(Error::CorruptRow { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
