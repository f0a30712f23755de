//! Dead rows an operator replayed or discarded: the replayed row is published, and the
//! key it held back goes on.

use mysql::prelude::Queryable;

use super::follow::SAVE_INTERVAL;
use super::worker::Settle;
use super::worker::{Key, Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::codec::{decode_record, RECORD_COLUMNS};

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
        let mut records: Vec<Record> = replayed.into_iter().collect();
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
                     AND state = 2)"
                ),
                (topic, key),
            )?;
            if !dead_left.unwrap_or(true) {
                let rows: Vec<mysql::Row> = conn.exec(
                    format!(
                        "SELECT {RECORD_COLUMNS} FROM `{table}` o WHERE o.topic = ? AND \
                         o.msg_key = ? AND o.state = 0 AND o.locked_by = 0 AND o.id <> ? \
                         ORDER BY o.id"
                    ),
                    (topic, key, id),
                )?;
                session.blocked.remove(&entry);
                let mut corrupt = Vec::new();
                for row in rows {
                    match decode_record(row) {
                        Ok(record) => records.push(record),
                        Err(Error::CorruptRow { id, reason }) => corrupt.push((id, reason)),
                        Err(e) => return Err(e),
                    }
                }
                if !corrupt.is_empty() {
                    // Dead again, and holding the key back again, at the first of them:
                    // only the rows before it go.
                    let first = corrupt.iter().map(|(id, _)| *id).min().unwrap_or(0);
                    records.retain(|r| r.id < first);
                    session.blocked.insert(entry.clone());
                    self.hand_over(session, Settle::Bury(corrupt))?;
                }
                // Rows of this key the binary log brings later were read here already.
                let newest = records.iter().map(|r| r.id).max().unwrap_or(0);
                session.verify_below = session.verify_below.max(newest);
            }
        }
        records.sort_by_key(|r| r.id);
        if records.is_empty() {
            return Ok(());
        }
        session.batch = records;
        session.batch_pin = Some(session.read_through.clone());
        self.flush(broker, session, SAVE_INTERVAL)
    }
}
