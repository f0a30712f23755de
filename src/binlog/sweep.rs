//! The safety net: a slow sweep of the table that publishes any row left pending behind
//! the relay, whatever the cause (an event the relay did not act on), so that nothing
//! stays pending for good.
//!
//! Every [`sweep_after`](super::BinlogSettings::sweep_after), while the relay is idle, it
//! notes the pending rows older than that which the relay does not hold back on purpose
//! (held behind a failure, or behind a dead row), and where the server's binary log ends
//! then: those rows committed before that end. Once the relay has read past it, any of
//! them still pending and not held was passed over: it is published, with a warning
//! naming it and a count (`outbox_binlog_rows_swept_total`).

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use super::hold::Slot;
use super::server;
use super::worker::{Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::sql::{padded, placeholders, scheduled, PENDING};

/// Most rows one look notes.
const SWEEP_ROWS: usize = 1_000;

impl Tail {
    /// Looks at the table if a look is due: publishes the rows noted at the last look that
    /// the relay passed over, and notes the next ones. Runs while the tail is idle.
    pub(super) fn sweep(&self, broker: &mut impl Broker, session: &mut Session) -> Result<()> {
        let every = self.binlog.sweep_after;
        let now = Instant::now();
        match session.sweep.next {
            None => {
                session.sweep.next = Some(now + every);
                return Ok(());
            }
            Some(next) if now < next => return Ok(()),
            Some(_) => session.sweep.next = Some(now + every),
        }
        if let Some((ids, end)) = session.sweep.noted.take() {
            if !session.read_through.reached(&end) {
                // Still reading what was committed before: not behind it yet.
                session.sweep.noted = Some((ids, end));
                return Ok(());
            }
            let missed = self.still_pending(session, &ids)?;
            if !missed.is_empty() {
                for record in &missed {
                    log::warn!(
                        "binlog relay {}: row {} (message {}, topic {}) was still pending {:?} \
                         after the binary log was read past its commit: its event was passed \
                         over; the sweep publishes it",
                        self.owner,
                        record.id,
                        record.message_id,
                        record.message.topic(),
                        every
                    );
                }
                self.meter.swept(missed.len() as u64);
                session.batch_pin = Some(session.read_through.clone());
                session.batch = missed;
                self.flush(broker, session, super::follow::SAVE_INTERVAL)?;
            }
        }
        let noted = self.note(session, every)?;
        if !noted.is_empty() {
            let mut lock_free = self.store.pool().get_conn()?;
            let end = server::current(&mut lock_free)?;
            session.sweep.noted = Some((noted, end));
        }
        Ok(())
    }

    /// The pending rows older than `age` that the relay does not hold back on purpose.
    fn note(&self, session: &Session, age: Duration) -> Result<Vec<u64>> {
        let rows: Vec<(u64, String, Option<Vec<u8>>)> = self.store.pool().get_conn()?.exec(
            format!(
                "SELECT id, topic, msg_key FROM `{}` WHERE state = {PENDING} AND locked_by = 0 AND \
                 created_on < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND AND NOT {} \
                 ORDER BY id LIMIT {SWEEP_ROWS}",
                self.store.table(),
                scheduled("")
            ),
            (u64::try_from(age.as_micros()).unwrap_or(u64::MAX),),
        )?;
        Ok(rows
            .into_iter()
            .filter(|(id, topic, key)| !self.holds_back(session, *id, topic, key.as_deref()))
            .map(|(id, ..)| id)
            .collect())
    }

    /// The rows of `ids` still pending and not held back on purpose, as records.
    fn still_pending(&self, session: &Session, ids: &[u64]) -> Result<Vec<Record>> {
        let params = padded(ids);
        let rows: Vec<mysql::Row> = self.store.pool().get_conn()?.exec(
            format!(
                "SELECT {RECORD_COLUMNS} FROM `{}` o WHERE o.state = {PENDING} AND o.locked_by = 0 \
                 AND o.id IN ({}) ORDER BY o.id",
                self.store.table(),
                placeholders(params.len())
            ),
            params,
        )?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            match decode_record(row) {
                Ok(record) => {
                    let (topic, key) = (record.message.topic().to_string(), record.message.key());
                    if !self.holds_back(session, record.id, &topic, key) {
                        records.push(record);
                    }
                }
                // A row that is no message is the claim's and the tail's to bury: left.
                Err(Error::CorruptRow { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }

    /// Whether the relay keeps row `id` pending on purpose: behind a failure, behind a
    /// dead row of its key, or delayed (or behind a delayed row of its key); or whether a
    /// delayed row's release published it a moment ago.
    fn holds_back(&self, session: &Session, id: u64, topic: &str, key: Option<&[u8]>) -> bool {
        if session.schedule.has(id) || session.schedule.published(id) {
            return true;
        }
        let slot = match key {
            Some(key) => Slot::Key((topic.to_string(), key.to_vec())),
            None => Slot::Row(id),
        };
        if session.held.holds_slot(&slot) {
            return true;
        }
        matches!(&slot, Slot::Key(key) if session.blocked.contains(key) || session.schedule.holds(key))
    }
}
