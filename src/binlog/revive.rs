//! Dead rows an operator replayed or discarded: the replayed row is published, and the
//! key it held back goes on.

use std::time::Instant;

use mysql::prelude::Queryable;

use super::delayed::{due_columns, not_due};
use super::follow::SAVE_INTERVAL;
use super::hold::Slot;
use super::server;
use super::worker::Settle;
use super::worker::{Key, Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::sql::{DEAD, PENDING};

impl Tail {
    /// A dead row `id` an operator replayed (`replayed`, its record) or discarded:
    /// publishes the replayed one and, when its key was held behind it and no other dead
    /// row of the key is left, the key's pending rows in id order.
    pub(super) fn revive(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        id: u64,
        key: Option<Key>,
        replayed: Option<Record>,
    ) -> Result<()> {
        let table = self.store.table();
        let records: Vec<Record> = replayed.into_iter().collect();
        if let Some(entry) = key.filter(|entry| session.blocked.contains(entry)) {
            let (topic, key) = &entry;
            let mut conn = self.store.pool().get_conn()?;
            // The binary log may bring the replay or discard before its commit is visible:
            // a locking read of the row waits for it, so that the next read does not still
            // see the row dead and keep the key held for good. The rows of its key that
            // committed before it are visible by then too (commits become visible in the
            // order of the binary log).
            conn.exec_drop(
                format!("SELECT id FROM `{table}` WHERE id = ? LOCK IN SHARE MODE"),
                (id,),
            )?;
            let dead_left: Option<bool> = conn.exec_first(
                format!(
                    "SELECT EXISTS (SELECT 1 FROM `{table}` WHERE topic = ? AND msg_key = ? \
                     AND state = {DEAD})"
                ),
                (topic, key),
            )?;
            if !dead_left.unwrap_or(true) {
                session.blocked.remove(&entry);
                return self.release_key(broker, session, &mut conn, &entry, (0, id), records);
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        session.batch = records;
        session.batch_pin = Some(session.read_through.clone());
        self.flush(broker, session, SAVE_INTERVAL)
    }

    /// Publishes the replayed row `records` (if any) and the pending rows of `key`, no
    /// longer held behind a dead row, in id order, read a batch at a time. They are
    /// remembered as published ahead of their events (see [`Ahead`]), which the binary
    /// log may bring later.
    ///
    /// [`Ahead`]: super::ahead::Ahead
    ///
    /// Only rows from id `from` on are read. A delayed row not due yet stops the read:
    /// it is scheduled, and the rows after it wait for it.
    pub(super) fn release_key(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        conn: &mut mysql::PooledConn,
        key: &Key,
        (from, replayed): (u64, u64),
        mut records: Vec<Record>,
    ) -> Result<()> {
        let (topic, msg_key) = key;
        let table = self.store.table();
        let limit = self.settings.batch_size.max(1);
        let mut after = from.saturating_sub(1);
        let mut read = Vec::new();
        let mut waits = false;
        loop {
            let rows: Vec<mysql::Row> = conn.exec(
                format!(
                    "SELECT {RECORD_COLUMNS}, {} FROM `{table}` o WHERE o.topic = ? AND \
                     o.msg_key = ? AND o.state = {PENDING} AND o.locked_by = 0 AND o.id <> ? \
                     AND o.id > ? ORDER BY o.id LIMIT {limit}",
                    due_columns(),
                ),
                (topic, msg_key, replayed, after),
            )?;
            let full = rows.len() == limit;
            log::debug!("read back {} rows of a released key", rows.len());
            let mut corrupt = Vec::new();
            for mut row in rows {
                let due = not_due(&mut row);
                let id: u64 = row.get(0).unwrap_or_default();
                if let Some(due) = due {
                    session.schedule.add(id, Slot::Key(key.clone()), due);
                    waits = true;
                    break;
                }
                if session.schedule.published(id) {
                    after = id;
                    continue;
                }
                match decode_record(row) {
                    Ok(record) => {
                        after = record.id;
                        records.push(record);
                    }
                    Err(Error::CorruptRow { id, reason }) => {
                        after = id;
                        corrupt.push((id, reason));
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(first) = corrupt.iter().map(|(id, _)| *id).min() {
                // Dead again, and holding the key back again, at the first of them: only
                // the rows before it go.
                records.retain(|r| r.id < first);
                session.blocked.insert(key.clone());
                self.hand_over(session, Settle::Bury(corrupt))?;
            }
            records.sort_by_key(|r| r.id);
            read.extend(records.iter().map(|r| r.id).filter(|&id| id != replayed));
            for record in records.drain(..) {
                if session.held.holds(&record) {
                    session.held.queue(record);
                } else {
                    session.batch.push(record);
                }
            }
            if !session.batch.is_empty() {
                session.batch_pin = Some(session.read_through.clone());
                self.flush(broker, session, SAVE_INTERVAL)?;
            }
            if !full || waits || session.blocked.contains(key) {
                break;
            }
        }
        // Every event of a row read here lies before the log's end now.
        let end = server::current(conn)?;
        session
            .schedule
            .released(read.iter().copied(), Instant::now());
        session.ahead.add(read, end);
        Ok(())
    }
}
