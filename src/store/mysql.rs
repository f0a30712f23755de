//! [`Store`] on MySQL 8.0+ and MariaDB 10.6+, through a `mysql::Pool`.

use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{IsolationLevel, Params, Pool, Row, Transaction, TxOpts, Value};
use serde_json::Value as Json;
use uuid::Uuid;

use super::connections::Connections;
use super::{Failure, Store};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::record::Record;

/// The schema, with `outbox` as the table name.
const SCHEMA: &str = include_str!("../../sql/outbox.sql");
/// Longest table name MySQL accepts.
const MAX_TABLE_NAME_LEN: usize = 64;
/// Longest error text kept in a row (the `error` column's width).
const MAX_ERROR_LEN: usize = 1000;
/// Most rows one INSERT of a batch add carries.
const INSERT_CHUNK: usize = 500;
/// Bytes of messages after which a batch add starts a new INSERT (well under the
/// servers' default `max_allowed_packet` of 16 MiB and more).
const INSERT_CHUNK_BYTES: usize = 4 << 20;

/// Most ids in one `IN (...)` list.
const MAX_ID_LIST: usize = 1024;
/// Most keys whose runs one claim extends.
const RUN_KEYS: usize = 8;

const PENDING: u8 = 0;
const DELIVERED: u8 = 1;
const DEAD: u8 = 2;

/// An outbox table in MySQL or MariaDB. Cheap to clone: clones share the pool.
///
/// ```no_run
/// # fn main() -> outbox::Result<()> {
/// let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
/// let store = outbox::MySqlStore::with_table(pool, "billing_outbox")?;
/// store.migrate()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    conns: Arc<Connections>,
    table: Arc<str>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// A store on the table `outbox`.
    pub fn new(pool: Pool) -> MySqlStore {
        MySqlStore {
            conns: Arc::new(Connections::new(pool)),
            table: Arc::from("outbox"),
        }
    }

    /// A store on the table `table`: 1 to 64 characters of `A-Z a-z 0-9 _`, not starting
    /// with a digit.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for any other name; nothing reaches the database.
    pub fn with_table(pool: Pool, table: &str) -> Result<MySqlStore> {
        validate_table_name(table)?;
        Ok(MySqlStore {
            conns: Arc::new(Connections::new(pool)),
            table: Arc::from(table),
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool this store draws its connections from.
    pub fn pool(&self) -> &Pool {
        self.conns.pool()
    }

    /// Creates the table and its indexes if they do not exist (`sql/outbox.sql`).
    /// Safe to call on every start, from several processes at once.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    pub fn migrate(&self) -> Result<()> {
        let ddl = SCHEMA.replacen("`outbox`", &format!("`{}`", self.table), 1);
        self.conns.with(|conn| Ok(conn.query_drop(&ddl)?))
    }

    /// Inserts validated messages with their ids through `tx`, in order: multi-row
    /// INSERTs of at most [`INSERT_CHUNK`] rows and about [`INSERT_CHUNK_BYTES`] each.
    pub(crate) fn insert(
        &self,
        tx: &mut mysql::Transaction<'_>,
        rows: &[(Uuid, &Message)],
    ) -> Result<()> {
        let mut start = 0;
        while start < rows.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < rows.len()
                && end - start < INSERT_CHUNK
                && (end == start || bytes < INSERT_CHUNK_BYTES)
            {
                bytes += rows[end].1.size();
                end += 1;
            }
            self.insert_chunk(tx, &rows[start..end])?;
            start = end;
        }
        Ok(())
    }

    fn insert_chunk(
        &self,
        tx: &mut mysql::Transaction<'_>,
        rows: &[(Uuid, &Message)],
    ) -> Result<()> {
        let mut params = Vec::with_capacity(rows.len() * 5);
        for (id, message) in rows {
            params.push(Value::Bytes(id.as_bytes().to_vec()));
            params.push(Value::from(message.topic()));
            params.push(message.key().map_or(Value::NULL, Value::from));
            params.push(encode_headers(message.headers()).map_or(Value::NULL, Value::from));
            params.push(Value::Bytes(message.payload().to_vec()));
        }
        let values = vec!["(?, ?, ?, ?, ?)"; rows.len()].join(", ");
        let sql = format!(
            "INSERT INTO `{}` (message_id, topic, msg_key, headers, payload) VALUES {values}",
            self.table
        );
        tx.exec_drop(sql, Params::Positional(params))?;
        Ok(())
    }

    /// Columns a claim reads, in the order [`decode_record`] expects.
    const COLUMNS: &'static str =
        "o.id, o.message_id, o.topic, o.msg_key, o.headers, o.payload, o.number_of_attempts";

    /// The heads: claimable rows with no older row of their key still blocking.
    fn heads_sql(&self, blocking: &str) -> String {
        format!(
            "SELECT {c} FROM `{t}` o \
             WHERE o.state = 0 AND o.locked_by IS NULL AND o.available_on <= NOW(6) \
               AND o.id >= ? AND o.id < ? \
               AND (o.msg_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM `{t}` p \
                 WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
                   AND p.state IN {blocking} AND p.id < o.id)) \
             ORDER BY o.id LIMIT ? \
             FOR UPDATE SKIP LOCKED",
            c = Self::COLUMNS,
            t = self.table
        )
    }

    /// Claims the heads, scanning the pending rows a window at a time, so that a long run
    /// of held-back rows (the followers of a message in flight or backing off) costs one
    /// window per claim instead of a scan of the whole backlog; it slides on only while a
    /// window holds nothing.
    fn claim_heads(
        &self,
        tx: &mut Transaction<'_>,
        limit: usize,
        blocking: &str,
    ) -> Result<Vec<Row>> {
        let bounds: Option<(Option<u64>, Option<u64>)> = tx.exec_first(
            format!(
                "SELECT MIN(id), MAX(id) FROM `{}` WHERE state = 0",
                self.table
            ),
            (),
        )?;
        let (Some(first), Some(last)) = bounds.unwrap_or((None, None)) else {
            return Ok(Vec::new());
        };
        let window = (limit as u64).saturating_mul(4).max(1_000);
        let sql = self.heads_sql(blocking);
        let mut from = first;
        loop {
            let to = from.saturating_add(window);
            let rows: Vec<Row> = tx.exec(&sql, (from, to, limit as u64))?;
            if !rows.is_empty() || to > last {
                return Ok(rows);
            }
            from = to;
        }
    }

    /// Extends the claim, while it has room, with the rows that follow the first few keys
    /// it holds: a hot key then moves a batch per round instead of one message. Whether
    /// the result keeps each key's order is checked afterwards by [`Self::keep_in_order`].
    fn extend_runs(
        &self,
        tx: &mut Transaction<'_>,
        records: &mut Vec<Record>,
        limit: usize,
    ) -> Result<()> {
        let follow_sql = format!(
            "SELECT {c} FROM `{t}` o \
             WHERE o.topic = ? AND o.msg_key = ? AND o.id > ? \
               AND o.state = 0 AND o.locked_by IS NULL AND o.available_on <= NOW(6) \
             ORDER BY o.id LIMIT ? FOR UPDATE SKIP LOCKED",
            c = Self::COLUMNS,
            t = self.table
        );
        let mut last_of_key: Vec<(String, String, u64)> = Vec::new();
        for r in records.iter() {
            let Some(key) = r.message.key() else { continue };
            let topic = r.message.topic();
            if let Some(i) = last_of_key
                .iter()
                .position(|(t, k, _)| t == topic && k == key)
            {
                last_of_key[i].2 = last_of_key[i].2.max(r.id);
            } else if last_of_key.len() < RUN_KEYS {
                last_of_key.push((topic.into(), key.into(), r.id));
            }
        }
        for (topic, key, last) in last_of_key {
            let room = limit.saturating_sub(records.len());
            if room == 0 {
                break;
            }
            let rows: Vec<Row> = tx.exec(&follow_sql, (&topic, &key, last, room as u64))?;
            let mut corrupt = Vec::new();
            for row in rows {
                match decode_record(row) {
                    Ok(record) => records.push(record),
                    Err(Error::CorruptRow { id, reason }) => {
                        corrupt.push((id, reason));
                        break;
                    }
                    Err(other) => return Err(other),
                }
            }
            self.bury(tx, &corrupt)?;
        }
        Ok(())
    }

    /// Keeps, of each key's claimed rows (sorted by id), only the unbroken run from the
    /// key's oldest blocking row: a claimed row is kept only while every older row of its
    /// key that is still pending (or dead, with `dead_blocks_key`) is kept too.
    ///
    /// This check must be its own statement. The claim's locking reads see rows committed
    /// after the statement began, while its `NOT EXISTS` subquery reads the snapshot taken
    /// when it began: a transaction that committed two rows of a key in between would
    /// otherwise let the second pass for a head. A new statement reads a new snapshot,
    /// which holds every row the locking reads saw. Rows dropped here stay unleased.
    fn keep_in_order(
        &self,
        tx: &mut Transaction<'_>,
        records: Vec<Record>,
        blocking: &str,
    ) -> Result<Vec<Record>> {
        // Per key, the ids claimed, in id order (records are sorted).
        let mut claimed: Vec<(&str, &str, Vec<u64>)> = Vec::new();
        for r in &records {
            let Some(key) = r.message.key() else { continue };
            let topic = r.message.topic();
            match claimed
                .iter_mut()
                .find(|(t, k, _)| *t == topic && *k == key)
            {
                Some(entry) => entry.2.push(r.id),
                None => claimed.push((topic, key, vec![r.id])),
            }
        }
        if claimed.is_empty() {
            return Ok(records);
        }
        let mut dropped = std::collections::HashSet::new();
        for chunk in claimed.chunks(MAX_ID_LIST / 4) {
            // Pad to a power of two (repeating the last key) so the statement is reused.
            let len = chunk.len().next_power_of_two();
            let condition = vec!["(topic = ? AND msg_key = ? AND id <= ?)"; len].join(" OR ");
            let sql = format!(
                "SELECT topic, msg_key, id FROM `{}` WHERE state IN {blocking} AND ({condition}) ORDER BY id",
                self.table
            );
            let mut params = Vec::with_capacity(len * 3);
            for i in 0..len {
                let (topic, key, ids) = &chunk[i.min(chunk.len() - 1)];
                params.extend([
                    Value::from(*topic),
                    Value::from(*key),
                    Value::from(ids[ids.len() - 1]),
                ]);
            }
            let blocking_rows: Vec<(String, Vec<u8>, u64)> =
                tx.exec(sql, Params::Positional(params))?;
            for (topic, key, ids) in chunk {
                let pending = blocking_rows
                    .iter()
                    .filter(|(t, k, _)| t == topic && k.as_slice() == key.as_bytes())
                    .map(|(_, _, id)| *id);
                let run = ids.iter().zip(pending).take_while(|(c, p)| *c == p).count();
                if run < ids.len() {
                    log::debug!(
                        "claim keeps {run} of {} rows of key {key:?}: an older row is elsewhere",
                        ids.len()
                    );
                    dropped.extend(ids[run..].iter().copied());
                }
            }
        }
        Ok(records
            .into_iter()
            .filter(|r| !dropped.contains(&r.id))
            .collect())
    }

    /// Makes corrupt rows dead, with the reason as their error, so they block nothing.
    fn bury(&self, tx: &mut Transaction<'_>, corrupt: &[(u64, String)]) -> Result<()> {
        for (id, reason) in corrupt {
            log::error!(
                "outbox row {id} in `{}` is corrupt and now dead: {reason}",
                self.table
            );
            tx.exec_drop(
                format!(
                    "UPDATE `{}` SET state = {DEAD}, error = ?, processed_on = NOW(6), \
                     last_attempted_on = NOW(6) WHERE id = ?",
                    self.table
                ),
                (truncate(&format!("corrupt row: {reason}")), id),
            )?;
        }
        Ok(())
    }

    fn purge(&self, state: u8, older_than: Duration, limit: usize) -> Result<u64> {
        self.read_committed(
            &format!(
                "DELETE FROM `{}` WHERE state = ? AND processed_on < NOW(6) - INTERVAL ? MICROSECOND LIMIT ?",
                self.table
            ),
            (state, micros(older_than), limit as u64),
        )
    }

    /// Runs one statement that scans an index range in a READ COMMITTED transaction, so
    /// that it locks only the rows it changes: under REPEATABLE READ its gap locks would
    /// stall (and deadlock with) the application's inserts into the outbox.
    fn read_committed(&self, sql: &str, params: impl Into<Params> + Clone) -> Result<u64> {
        self.conns.with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            tx.exec_drop(sql, params.clone())?;
            let changed = tx.affected_rows();
            tx.commit()?;
            Ok(changed)
        })
    }

    /// Runs `sql`, whose last condition is `id IN ({ids})`, over `ids` in chunks, after
    /// the `leading` parameters; returns the rows changed. The lists are padded to a few
    /// fixed lengths (repeating the last id), so the connection's prepared statements are
    /// reused.
    fn update_ids(&self, sql: &str, leading: Vec<Value>, ids: &[u64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.conns.with(|conn| {
            let mut changed = 0;
            for chunk in ids.chunks(MAX_ID_LIST) {
                let len = chunk.len().next_power_of_two().min(MAX_ID_LIST);
                let mut params = leading.clone();
                params.extend((0..len).map(|i| Value::from(chunk[i.min(chunk.len() - 1)])));
                conn.exec_drop(
                    sql.replace("{ids}", &placeholders(len)),
                    Params::Positional(params),
                )?;
                changed += conn.affected_rows();
            }
            Ok(changed)
        })
    }
}

impl Store for MySqlStore {
    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Vec<Record>> {
        let blocking = if dead_blocks_key { "(0, 2)" } else { "(0)" };
        self.conns.with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            let rows = self.claim_heads(&mut tx, limit, blocking)?;
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let mut records = Vec::with_capacity(limit);
            let mut corrupt = Vec::new();
            for row in rows {
                match decode_record(row) {
                    Ok(record) => records.push(record),
                    Err(Error::CorruptRow { id, reason }) => corrupt.push((id, reason)),
                    Err(other) => return Err(other),
                }
            }
            self.bury(&mut tx, &corrupt)?;
            if records.len() < limit {
                self.extend_runs(&mut tx, &mut records, limit)?;
            }
            records.sort_by_key(|r| r.id);
            records.dedup_by_key(|r| r.id);
            let records = self.keep_in_order(&mut tx, records, blocking)?;
            for chunk in records.chunks(MAX_ID_LIST) {
                let mut params = vec![Value::from(owner)];
                params.extend(chunk.iter().map(|r| Value::from(r.id)));
                tx.exec_drop(
                    format!(
                        "UPDATE `{}` SET locked_by = ?, locked_on = NOW(6) WHERE id IN ({})",
                        self.table,
                        placeholders(chunk.len())
                    ),
                    Params::Positional(params),
                )?;
            }
            tx.commit()?;
            Ok(records)
        })
    }

    fn mark_delivered(&self, owner: &str, ids: &[u64]) -> Result<u64> {
        let sql = format!(
            "UPDATE `{}` SET state = {DELIVERED}, processed_on = NOW(6), last_attempted_on = NOW(6), \
             number_of_attempts = number_of_attempts + 1, locked_by = NULL, locked_on = NULL \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(owner)], ids)
    }

    fn mark_failed(&self, owner: &str, failures: &[Failure]) -> Result<u64> {
        if failures.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE `{}` SET number_of_attempts = number_of_attempts + 1, error = ?, \
             last_attempted_on = NOW(6), locked_by = NULL, locked_on = NULL, \
             available_on = NOW(6) + INTERVAL ? MICROSECOND, state = ?, \
             processed_on = IF(? = {DEAD}, NOW(6), NULL) \
             WHERE id = ? AND locked_by = ? AND state = {PENDING}",
            self.table
        );
        self.conns.with(|conn| {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let mut changed = 0;
            for failure in failures {
                let state = if failure.dead { DEAD } else { PENDING };
                tx.exec_drop(
                    &sql,
                    (
                        truncate(&failure.error),
                        micros(failure.retry_in),
                        state,
                        state,
                        failure.id,
                        owner,
                    ),
                )?;
                changed += tx.affected_rows();
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    fn release(&self, owner: &str, ids: &[u64]) -> Result<u64> {
        let sql = format!(
            "UPDATE `{}` SET locked_by = NULL, locked_on = NULL \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(owner)], ids)
    }

    fn release_expired(&self, older_than: Duration) -> Result<u64> {
        self.read_committed(
            &format!(
                "UPDATE `{}` SET locked_by = NULL, locked_on = NULL \
                 WHERE state = {PENDING} AND locked_on < NOW(6) - INTERVAL ? MICROSECOND",
                self.table
            ),
            (micros(older_than),),
        )
    }

    fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge(DELIVERED, older_than, limit)
    }

    fn purge_dead(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge(DEAD, older_than, limit)
    }
}

fn validate_table_name(table: &str) -> Result<()> {
    let mut chars = table.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || table.len() > MAX_TABLE_NAME_LEN {
        return Err(Error::config(format!(
            "table name {table:?} is not a plain identifier (1 to {MAX_TABLE_NAME_LEN} of A-Z a-z 0-9 _, \
             not starting with a digit)"
        )));
    }
    Ok(())
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn truncate(error: &str) -> String {
    error.chars().take(MAX_ERROR_LEN).collect()
}

/// Headers as stored: a JSON array of `[name, value]` pairs, in order, where the value is
/// a string when it is UTF-8 and an array of byte values otherwise. `None` when empty.
fn encode_headers(headers: &[(String, Vec<u8>)]) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    let pairs = headers
        .iter()
        .map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => Json::from(text),
                Err(_) => Json::from(value.clone()),
            };
            Json::Array(vec![Json::from(name.as_str()), value])
        })
        .collect();
    Some(Json::Array(pairs).to_string())
}

fn decode_headers(text: &str) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let json: Json =
        serde_json::from_str(text).map_err(|e| format!("headers are not JSON: {e}"))?;
    let Json::Array(pairs) = json else {
        return Err("headers are not a JSON array".into());
    };
    pairs
        .into_iter()
        .map(|pair| match pair {
            Json::Array(mut nv) if nv.len() == 2 => {
                let value = nv.pop().unwrap_or_default();
                let Some(Json::String(name)) = nv.pop() else {
                    return Err("a header name is not a string".to_string());
                };
                let value = match value {
                    Json::String(text) => text.into_bytes(),
                    Json::Array(bytes) => bytes
                        .into_iter()
                        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| format!("header {name:?} has a byte out of range"))?,
                    _ => {
                        return Err(format!(
                            "header {name:?} has a value that is neither string nor bytes"
                        ))
                    }
                };
                Ok((name, value))
            }
            _ => Err("a header is not a [name, value] pair".to_string()),
        })
        .collect()
}

fn decode_record(mut row: Row) -> Result<Record> {
    let id: u64 = take(&mut row, 0, 0)?;
    let corrupt = |reason: String| Error::CorruptRow { id, reason };
    let message_id: Vec<u8> = take(&mut row, 1, id)?;
    let topic: String = take(&mut row, 2, id)?;
    let key: Option<Vec<u8>> = take(&mut row, 3, id)?;
    let headers: Option<Vec<u8>> = take(&mut row, 4, id)?;
    let payload: Vec<u8> = take(&mut row, 5, id)?;
    let attempts: u32 = take(&mut row, 6, id)?;

    let message_id =
        Uuid::from_slice(&message_id).map_err(|e| corrupt(format!("message_id: {e}")))?;
    let mut message = Message::new(topic, payload);
    if let Some(key) = key {
        let key = String::from_utf8(key).map_err(|_| corrupt("msg_key is not UTF-8".into()))?;
        message = message.with_key(key);
    }
    if let Some(headers) = headers {
        let text =
            std::str::from_utf8(&headers).map_err(|_| corrupt("headers are not UTF-8".into()))?;
        for (name, value) in decode_headers(text).map_err(corrupt)? {
            message = message.with_header(name, value);
        }
    }
    Ok(Record {
        id,
        message_id,
        attempts,
        message,
    })
}

fn take<T: mysql::prelude::FromValue>(row: &mut Row, index: usize, id: u64) -> Result<T> {
    match row.take_opt::<T, _>(index) {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(Error::CorruptRow {
            id,
            reason: format!("column {index}: {e}"),
        }),
        None => Err(Error::CorruptRow {
            id,
            reason: format!("column {index} is missing"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_order_with_binary_values() {
        let headers = vec![
            ("b".to_string(), b"2".to_vec()),
            ("a".to_string(), vec![0, 159, 146, 150, 255]),
            ("b".to_string(), "ünïcode".as_bytes().to_vec()),
            ("empty".to_string(), Vec::new()),
        ];
        let text = encode_headers(&headers).unwrap();
        assert_eq!(decode_headers(&text).unwrap(), headers);
        assert_eq!(encode_headers(&[]), None);
    }

    #[test]
    fn corrupt_headers_are_reported_not_panicked() {
        for bad in [
            "",
            "{}",
            "[1]",
            "[[1, \"v\"]]",
            "[[\"n\", 3]]",
            "[[\"n\", [256]]]",
            "[[\"n\"]]",
        ] {
            assert!(decode_headers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["outbox", "_t", "Billing_Outbox_2", &"t".repeat(64)] {
            assert!(validate_table_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1t",
            "a-b",
            "a b",
            "t`; DROP TABLE x; --",
            "db.t",
            "tä",
            &"t".repeat(65),
        ] {
            assert!(
                matches!(validate_table_name(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_are_truncated_to_the_column() {
        assert_eq!(truncate(&"é".repeat(2000)).chars().count(), MAX_ERROR_LEN);
    }

    #[test]
    fn schema_names_the_table_once() {
        assert_eq!(SCHEMA.matches("`outbox`").count(), 1);
    }
}
