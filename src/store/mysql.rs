//! [`Store`] on MySQL 8.0+ and MariaDB 10.6+, through a `mysql::Pool`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{IsolationLevel, Params, Pool, Row, Transaction, TxOpts, Value};
use serde_json::Value as Json;
use uuid::Uuid;

use super::claim::{keep_unbroken, pick, Candidate};
use super::connections::Connections;
use super::{Claim, Failure, Store};
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
pub(crate) const INSERT_CHUNK: usize = 500;
/// Bytes of messages after which a batch add starts a new INSERT (well under the
/// servers' default `max_allowed_packet` of 16 MiB and more).
pub(crate) const INSERT_CHUNK_BYTES: usize = 4 << 20;
/// The columns an add writes, in the order its values follow.
const INSERT_COLUMNS: &str = "message_id, topic, msg_key, headers, payload";

/// How recent a lease must be for the claim to count its row as being published. A
/// dispatcher settles its batches within the broker's delivery timeout, usually within
/// milliseconds; a lease older than this may belong to a dispatcher that died.
const FRESH_LEASE: Duration = Duration::from_secs(10);
/// Most ids in one `IN (...)` list.
const MAX_ID_LIST: usize = 1024;
/// A row as the claim's scan reads it: id, topic, key, ready to take, leased (to any
/// claimer) less than [`FRESH_LEASE`] ago.
type ScanRow = (u64, String, Option<Vec<u8>>, bool, bool);

/// Columns a claim reads, in the order [`decode_record`] expects.
const COLUMNS: &str =
    "o.id, o.message_id, o.topic, o.msg_key, o.headers, o.payload, o.number_of_attempts";

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

    /// The number a lease owner is written as in `locked_by` (0 means no lease): the
    /// owner's 64-bit FNV-1a hash, never 0. A number rather than the owner's name keeps the
    /// column fixed in width, so that taking and ending a lease rewrite the row in place.
    pub fn lease_token(owner: &str) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = owner.bytes().fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        });
        hash.max(1)
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
    /// [`Error::Database`] if a statement fails;
    /// [`Error::Config`] if the table exists with the layout of an earlier version
    /// (`locked_by` not a number), which this store cannot use.
    pub fn migrate(&self) -> Result<()> {
        let ddl = SCHEMA.replacen("`outbox`", &format!("`{}`", self.table), 1);
        let lease_type: Option<String> = self.conns.with(|conn| {
            conn.query_drop(&ddl)?;
            Ok(conn.exec_first(
                "SELECT DATA_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'locked_by'",
                (&*self.table,),
            )?)
        })?;
        match lease_type.as_deref() {
            Some("bigint") => Ok(()),
            other => Err(Error::config(format!(
                "table `{}` exists with another layout (locked_by is {other:?}, not bigint): \
                 it was made by an earlier outbox version; see sql/outbox.sql",
                self.table
            ))),
        }
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
        let sql = format!("{}{values}", self.insert_head());
        tx.exec_drop(sql, Params::Positional(params))?;
        Ok(())
    }

    /// `INSERT INTO <table> (<columns>) VALUES `: rows follow, as
    /// [`push_row_literal`] writes them or as placeholders.
    pub(crate) fn insert_head(&self) -> String {
        format!("INSERT INTO `{}` ({INSERT_COLUMNS}) VALUES ", self.table)
    }

    /// Chooses the rows to claim, without locking anything yet.
    ///
    /// The first read takes the oldest `window` pending rows in id order, in one snapshot,
    /// and [`pick`] applies the order rule to them: every older pending row of a key is in
    /// that read, so runs of one key can be taken whole. Only when nothing there can be
    /// taken, and none of it was leased in the last [`FRESH_LEASE`] (all held back behind
    /// messages backing off, dead, or leased by a dispatcher that may have died), the scan
    /// slides on a window at a time, taking there only rows with no older
    /// blocking row at all, checked by a subquery in the same snapshot.
    fn choose(
        &self,
        tx: &mut Transaction<'_>,
        limit: usize,
        dead_blocks_key: bool,
    ) -> Result<(Vec<Candidate>, bool)> {
        let window = (limit as u64).saturating_mul(2).max(1_000);
        let dead_before = if dead_blocks_key {
            format!(
                "AND NOT EXISTS (SELECT 1 FROM `{}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
                 AND p.state = {DEAD} AND p.id < o.id)",
                self.table
            )
        } else {
            String::new()
        };
        let first: Vec<ScanRow> = tx.exec(
            format!(
                "SELECT o.id, o.topic, o.msg_key, \
                   (o.locked_by = 0 AND o.available_on <= NOW(6) {dead_before}), \
                   (o.locked_by <> 0 AND o.locked_on > NOW(6) - INTERVAL ? MICROSECOND) \
                 FROM `{}` o WHERE o.state = {PENDING} ORDER BY o.id LIMIT ?",
                self.table
            ),
            (micros(FRESH_LEASE), window),
        )?;
        let in_flight = first.iter().any(|row| row.4);
        let candidates: Vec<Candidate> = first.into_iter().map(candidate).collect();
        let (picked, more) = pick(&candidates, limit);
        let picked: Vec<Candidate> = picked.into_iter().cloned().collect();
        let scanned_all = (candidates.len() as u64) < window;
        // Dig past held-back rows only when nothing is in flight there, at this claimer or
        // another: otherwise those deliveries are about to let rows through, and sliding
        // on would read the rest of the backlog to find every key held behind them (with
        // several dispatchers on one backlog, that halved the drain). A lease older than
        // FRESH_LEASE does not count: its holder may be dead, and the rest must not wait
        // the whole max_lock_duration for the lock checker.
        if !picked.is_empty() || scanned_all || in_flight {
            return Ok((picked, more));
        }

        let blocking = if dead_blocks_key { "(0, 2)" } else { "(0)" };
        let slide_sql = format!(
            "SELECT o.id, o.topic, o.msg_key, TRUE, FALSE FROM `{t}` o \
             WHERE o.state = {PENDING} AND o.id > ? AND o.id <= ? \
               AND o.locked_by = 0 AND o.available_on <= NOW(6) \
               AND (o.msg_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM `{t}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
                   AND p.state IN {blocking} AND p.id < o.id)) \
             ORDER BY o.id LIMIT ?",
            t = self.table
        );
        let last: Option<u64> = tx.exec_first(
            format!(
                "SELECT MAX(id) FROM `{}` WHERE state = {PENDING}",
                self.table
            ),
            (),
        )?;
        let last = last.unwrap_or(0);
        let mut from = candidates.last().map_or(0, |c| c.id);
        while from < last {
            let to = from.saturating_add(window);
            // One more than the limit tells whether a next claim finds work at once.
            let heads: Vec<ScanRow> = tx.exec(&slide_sql, (from, to, limit as u64 + 1))?;
            if !heads.is_empty() {
                let mut heads: Vec<Candidate> = heads.into_iter().map(candidate).collect();
                let more = heads.len() > limit;
                heads.truncate(limit);
                return Ok((heads, more));
            }
            from = to;
        }
        Ok((Vec::new(), false))
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
    /// the `leading` parameters; returns the rows changed.
    fn update_ids(&self, sql: &str, leading: Vec<Value>, ids: &[u64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.conns.with(|conn| {
            let mut changed = 0;
            for chunk in ids.chunks(MAX_ID_LIST) {
                let chunk = padded(chunk);
                let in_list = placeholders(chunk.len());
                let mut params = leading.clone();
                params.extend(chunk);
                conn.exec_drop(sql.replace("{ids}", &in_list), Params::Positional(params))?;
                changed += conn.affected_rows();
            }
            Ok(changed)
        })
    }
}

impl Store for MySqlStore {
    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Claim> {
        self.conns.with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            let (chosen, more) = self.choose(&mut tx, limit, dead_blocks_key)?;
            if chosen.is_empty() {
                return Ok(Claim::default());
            }
            // Lock what is still unleased; another claimer may have taken some since.
            let ids = padded(&chosen.iter().map(|c| c.id).collect::<Vec<_>>());
            let rows: Vec<Row> = tx.exec(
                format!(
                    "SELECT {COLUMNS} FROM `{}` o WHERE o.id IN ({}) AND o.state = {PENDING} \
                     AND o.locked_by = 0 FOR UPDATE SKIP LOCKED",
                    self.table,
                    placeholders(ids.len())
                ),
                Params::Positional(ids),
            )?;
            let mut corrupt = Vec::new();
            let mut locked = HashMap::with_capacity(rows.len());
            for row in rows {
                match decode_record(row) {
                    Ok(record) => {
                        locked.insert(record.id, record);
                    }
                    Err(Error::CorruptRow { id, reason }) => corrupt.push((id, reason)),
                    Err(other) => return Err(other),
                }
            }
            self.bury(&mut tx, &corrupt)?;
            let picked: Vec<&Candidate> = chosen.iter().collect();
            let present: HashSet<u64> = locked.keys().copied().collect();
            let kept = keep_unbroken(&picked, &present);
            if kept.is_empty() {
                tx.commit()?;
                return Ok(Claim::default());
            }
            let ids = padded(&kept);
            let sql = format!(
                "UPDATE `{}` SET locked_by = ?, locked_on = NOW(6) WHERE id IN ({})",
                self.table,
                placeholders(ids.len())
            );
            let mut params = vec![Value::from(Self::lease_token(owner))];
            params.extend(ids);
            tx.exec_drop(sql, Params::Positional(params))?;
            tx.commit()?;
            Ok(Claim {
                records: kept.iter().filter_map(|id| locked.remove(id)).collect(),
                more,
            })
        })
    }

    fn mark_delivered(&self, owner: &str, ids: &[u64]) -> Result<u64> {
        let sql = format!(
            "UPDATE `{}` SET state = {DELIVERED}, processed_on = NOW(6), last_attempted_on = NOW(6), \
             number_of_attempts = number_of_attempts + 1, locked_by = 0 \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(Self::lease_token(owner))], ids)
    }

    fn mark_failed(&self, owner: &str, failures: &[Failure]) -> Result<u64> {
        if failures.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE `{}` SET number_of_attempts = number_of_attempts + 1, error = ?, \
             last_attempted_on = NOW(6), locked_by = 0, \
             available_on = NOW(6) + INTERVAL ? MICROSECOND, state = ?, \
             processed_on = IF(? = {DEAD}, NOW(6), processed_on) \
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
                        Self::lease_token(owner),
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
            "UPDATE `{}` SET locked_by = 0 \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(Self::lease_token(owner))], ids)
    }

    fn release_expired(&self, older_than: Duration) -> Result<u64> {
        self.read_committed(
            &format!(
                "UPDATE `{}` SET locked_by = 0 \
                 WHERE state = {PENDING} AND locked_by <> 0 \
                   AND locked_on < NOW(6) - INTERVAL ? MICROSECOND",
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

/// `ids` as parameters, padded to a power of two (up to [`MAX_ID_LIST`]) by repeating the
/// last: `IN` lists of a few fixed lengths let the connection reuse its prepared
/// statements, and a repeated id changes nothing.
fn padded(ids: &[u64]) -> Vec<Value> {
    let Some(&last) = ids.last() else {
        return Vec::new();
    };
    let len = if ids.len() <= MAX_ID_LIST {
        ids.len().next_power_of_two()
    } else {
        ids.len()
    };
    (0..len)
        .map(|i| Value::from(ids.get(i).copied().unwrap_or(last)))
        .collect()
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

/// Appends one row of an INSERT after [`MySqlStore::insert_head`] to `sql`, every value
/// a hexadecimal literal: nothing in a message can end the literal or change the
/// statement, whatever the server's SQL mode. The topic and headers carry their character
/// set so that MySQL 8 takes them as text (its JSON type refuses binary strings).
pub(crate) fn push_row_literal(sql: &mut String, id: Uuid, message: &Message) {
    sql.push('(');
    push_hex(sql, "", id.as_bytes());
    sql.push_str(", ");
    push_hex(sql, "_ascii ", message.topic().as_bytes());
    sql.push_str(", ");
    match message.key() {
        Some(key) => push_hex(sql, "", key.as_bytes()),
        None => sql.push_str("NULL"),
    }
    sql.push_str(", ");
    match encode_headers(message.headers()) {
        Some(headers) => push_hex(sql, "_utf8mb4 ", headers.as_bytes()),
        None => sql.push_str("NULL"),
    }
    sql.push_str(", ");
    push_hex(sql, "", message.payload());
    sql.push(')');
}

/// Appends `X'<bytes in hex>'` after `introducer` (a character set such as `_ascii `, or
/// nothing for a binary string).
fn push_hex(sql: &mut String, introducer: &str, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    sql.reserve(introducer.len() + 3 + 2 * bytes.len());
    sql.push_str(introducer);
    sql.push_str("X'");
    for byte in bytes {
        sql.push(char::from(DIGITS[usize::from(byte >> 4)]));
        sql.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    sql.push('\'');
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

fn candidate((id, topic, key, ready, _leased): ScanRow) -> Candidate {
    Candidate {
        id,
        key: key.map(|k| (topic, k)),
        ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_literals_are_hex_with_nulls_for_no_key_and_no_headers() {
        let id = Uuid::from_bytes([0xab; 16]);
        let mut sql = String::new();
        push_row_literal(
            &mut sql,
            id,
            &Message::new("t.1", vec![0x00, 0x27, 0x5c, 0xff]),
        );
        assert_eq!(
            sql,
            format!(
                "(X'{}', _ascii X'742E31', NULL, NULL, X'00275CFF')",
                "AB".repeat(16)
            )
        );
    }

    #[test]
    fn row_literals_carry_key_and_headers_as_encoded() {
        let message = Message::new("t", "").with_key("k'").with_header("h", "v");
        let mut sql = String::new();
        push_row_literal(&mut sql, Uuid::nil(), &message);
        let headers: String = encode_headers(message.headers())
            .unwrap()
            .bytes()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert!(
            sql.ends_with(&format!(", X'6B27', _utf8mb4 X'{headers}', X'')")),
            "{sql}"
        );
    }

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
    fn id_lists_are_padded_to_a_few_lengths_with_the_last_id() {
        assert!(padded(&[]).is_empty());
        assert_eq!(padded(&[7]), vec![Value::from(7u64)]);
        assert_eq!(
            padded(&[1, 2, 3]),
            [1u64, 2, 3, 3].map(Value::from).to_vec()
        );
        assert_eq!(padded(&vec![5; MAX_ID_LIST + 1]).len(), MAX_ID_LIST + 1);
    }

    #[test]
    fn lease_tokens_are_fnv1a_and_never_zero() {
        // FNV-1a 64 reference values.
        assert_eq!(MySqlStore::lease_token("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(MySqlStore::lease_token("foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(
            MySqlStore::lease_token("billing#00000001"),
            MySqlStore::lease_token("billing#00000002")
        );
        assert_eq!(MySqlStore::lease_token(""), 0xcbf2_9ce4_8422_2325);
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
