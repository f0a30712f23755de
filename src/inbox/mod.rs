//! The consumer's side: an inbox that applies each message once, however often it
//! arrives.
//!
//! The outbox delivers at least once. The inbox keeps, in a MySQL table, the id of every
//! message a consumer applied, written **in the transaction of its effect**: a second
//! delivery of the same message finds its id there and is skipped, and a crash before the
//! commit leaves neither the effect nor the id. Several consumers (by name) share one
//! table.
//!
//! - [`Inbox`]: the tables (`migrate`), [`Inbox::record`] for applications that run their
//!   own Kafka loop, the dead records and their replay, retention.
//! - [`InboxConsumer`]: the loop on an OS thread over rdkafka's `BaseConsumer`, in the
//!   style of the dispatcher: for each record it opens a transaction, records the id,
//!   calls the handler, commits, and only then lets the offset go.
//!
//! ```no_run
//! use outbox::inbox::{Assignment, Inbox, InboxConsumer, InboxSettings};
//! use outbox::mysql::prelude::Queryable;
//!
//! # fn main() -> outbox::Result<()> {
//! let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
//! let inbox = Inbox::new(pool);
//! inbox.migrate()?;
//! let consumer = InboxConsumer::new(
//!     inbox,
//!     "billing",                                   // the consumer (and its group)
//!     "127.0.0.1:9092",
//!     Assignment::Group(vec!["orders".into()]),
//!     InboxSettings::default(),
//! )?;
//! let mut handle = consumer.start(|tx: &mut mysql::Transaction<'_>, delivery: &outbox::inbox::Delivery| {
//!     tx.exec_drop(
//!         "INSERT INTO invoices (order_event, body) VALUES (?, ?)",
//!         (delivery.message_id().to_string(), delivery.payload()),
//!     )?;
//!     Ok(())
//! })?;
//! // ... the service runs; errors arrive on handle.errors() ...
//! handle.stop()?;
//! # Ok(()) }
//! ```

mod consumer;
mod delivery;
mod revoked;
mod settings;

use std::time::{Duration, SystemTime};

use mysql::prelude::Queryable;
use mysql::{Pool, Transaction};
use uuid::Uuid;

pub use self::consumer::{Assignment, HandlerError, InboxConsumer, InboxHandle};
pub use self::delivery::{Delivery, FALLBACK_ID_NAMESPACE};
pub use self::settings::{InboxSettings, MAX_INBOX_BATCH};
use crate::admin::time::{micros_of, time, time_or_never};
use crate::error::{Error, Result};
use crate::store::mysql::{placeholders, validate_table_name};

const SCHEMA: &str = include_str!("../../sql/inbox.sql");
/// Longest inbox table name: its dead records' and offsets' tables add a suffix.
pub const MAX_INBOX_TABLE_LEN: usize = 56;
/// Longest consumer name (the `consumer` columns' width).
pub const MAX_CONSUMER_LEN: usize = 100;
/// Longest error text kept with a dead record.
const MAX_ERROR_LEN: usize = 4000;

/// Whether [`Inbox::record`] found the message new or already applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First time: apply its effect in the same transaction, then commit.
    New,
    /// Already applied (and committed) by this consumer: do nothing.
    Duplicate,
}

/// The inbox's tables: `inbox` (processed message ids), `inbox_dead` and `inbox_offsets`,
/// or the same three under another name (`sql/inbox.sql`).
#[derive(Clone)]
pub struct Inbox {
    pool: Pool,
    table: String,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// A record whose handler failed `max_attempts` times, kept in the dead table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadDelivery {
    /// Its row id in the dead table, which [`Inbox::replay`] takes.
    pub id: u64,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// The record, as the handler saw it.
    pub delivery: Delivery,
    /// The handler's last error.
    pub error: String,
    /// How many times the handler failed on it.
    pub attempts: u32,
    /// When it was declared dead (the database's clock).
    pub died_on: SystemTime,
    /// When a replay was asked for, if one waits.
    pub replay_requested_on: Option<SystemTime>,
}

impl Inbox {
    /// The inbox in the table `inbox` (with `inbox_dead` and `inbox_offsets`).
    pub fn new(pool: Pool) -> Inbox {
        Inbox {
            pool,
            table: "inbox".into(),
        }
    }

    /// The inbox in `table`, `{table}_dead` and `{table}_offsets`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] unless `table` is a plain identifier of at most
    /// [`MAX_INBOX_TABLE_LEN`] characters.
    pub fn with_table(pool: Pool, table: &str) -> Result<Inbox> {
        validate_table_name(table, MAX_INBOX_TABLE_LEN)?;
        Ok(Inbox {
            pool,
            table: table.into(),
        })
    }

    /// The processed ids' table; the others are named after it.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool the inbox takes its connections from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates the three tables if they do not exist (`sql/inbox.sql`). Safe to call on
    /// every start, from several processes at once.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if a statement fails.
    pub fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.get_conn()?;
        let sql: String = SCHEMA
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .map(|line| format!("{line}\n"))
            .collect();
        for statement in sql.split(';').filter(|s| s.contains("CREATE")) {
            conn.query_drop(named(statement, &self.table))?;
        }
        Ok(())
    }

    /// Records that `consumer` applies `delivery`, in the caller's transaction, and says
    /// whether it is [`New`](Recorded::New) (apply its effect in the same transaction) or
    /// a [`Duplicate`](Recorded::Duplicate) (already committed: do nothing). Call it
    /// before the effect: a second delivery being applied at the same moment by another
    /// thread then waits here for the first transaction, and is a duplicate once it
    /// commits.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a consumer name that is empty or longer than
    /// [`MAX_CONSUMER_LEN`]; [`Error::Database`] if the statement fails (the transaction
    /// should then be rolled back).
    pub fn record(
        &self,
        tx: &mut Transaction<'_>,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<Recorded> {
        check_consumer(consumer)?;
        tx.exec_drop(
            format!(
                "INSERT IGNORE INTO `{}` (consumer, message_id, topic, kafka_partition, \
                 kafka_offset, processed_on) VALUES (?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
                self.table
            ),
            (
                consumer,
                delivery.message_id().as_bytes().as_slice(),
                delivery.topic(),
                delivery.partition(),
                delivery.offset(),
            ),
        )?;
        Ok(if tx.affected_rows() == 1 {
            Recorded::New
        } else {
            Recorded::Duplicate
        })
    }

    /// As [`record`](Inbox::record) for each of `batch`, in two statements instead of one
    /// per record: which ids are there already, then the others in one INSERT. Says for
    /// each record whether it is new; a record whose id came earlier in the batch is a
    /// duplicate. `None` when another transaction recorded one of the new ids meanwhile:
    /// roll back, and record them one by one with [`record`](Inbox::record).
    ///
    /// # Errors
    ///
    /// As [`record`](Inbox::record).
    pub fn record_all(
        &self,
        tx: &mut Transaction<'_>,
        consumer: &str,
        batch: &[Delivery],
    ) -> Result<Option<Vec<Recorded>>> {
        check_consumer(consumer)?;
        if batch.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let ids: Vec<[u8; 16]> = batch.iter().map(|d| *d.message_id().as_bytes()).collect();
        let mut params: Vec<mysql::Value> = vec![consumer.into()];
        params.extend(
            padded_with_last(&ids)
                .into_iter()
                .map(|id| id.to_vec().into()),
        );
        let found: Vec<Vec<u8>> = tx.exec(
            format!(
                "SELECT message_id FROM `{}` WHERE consumer = ? AND message_id IN ({})",
                self.table,
                placeholders(params.len() - 1)
            ),
            params,
        )?;
        let mut seen: std::collections::HashSet<[u8; 16]> = found
            .into_iter()
            .filter_map(|id| <[u8; 16]>::try_from(id.as_slice()).ok())
            .collect();
        let mut fresh = Vec::new();
        let recorded: Vec<Recorded> = batch
            .iter()
            .zip(&ids)
            .map(|(delivery, id)| {
                if seen.insert(*id) {
                    fresh.push(delivery);
                    Recorded::New
                } else {
                    Recorded::Duplicate
                }
            })
            .collect();
        if fresh.is_empty() {
            return Ok(Some(recorded));
        }
        let rows = padded_with_last(&fresh);
        let mut params: Vec<mysql::Value> = Vec::with_capacity(rows.len() * 5);
        for delivery in &rows {
            params.extend([
                consumer.into(),
                delivery.message_id().as_bytes().to_vec().into(),
                delivery.topic().into(),
                delivery.partition().into(),
                delivery.offset().into(),
            ]);
        }
        tx.exec_drop(
            format!(
                "INSERT IGNORE INTO `{}` (consumer, message_id, topic, kafka_partition, \
                 kafka_offset, processed_on) VALUES {}",
                self.table,
                vec!["(?, ?, ?, ?, ?, UTC_TIMESTAMP(6))"; rows.len()].join(", ")
            ),
            params,
        )?;
        Ok((tx.affected_rows() == fresh.len() as u64).then_some(recorded))
    }

    /// Whether `consumer` applied the message `message_id` (and it is still within
    /// retention).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the query fails.
    pub fn is_processed(&self, consumer: &str, message_id: Uuid) -> Result<bool> {
        let found: Option<u8> = self.pool.get_conn()?.exec_first(
            format!(
                "SELECT 1 FROM `{}` WHERE consumer = ? AND message_id = ?",
                self.table
            ),
            (consumer, message_id.as_bytes().as_slice()),
        )?;
        Ok(found.is_some())
    }

    /// Up to `limit` dead records, of `consumer` or of all consumers, oldest first, after
    /// the row id `after_id` (for paging; 0 from the start).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the query fails; [`Error::CorruptRow`] for a row whose
    /// headers were edited into something else than the inbox writes.
    pub fn dead(
        &self,
        consumer: Option<&str>,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<DeadDelivery>> {
        let rows: Vec<mysql::Row> = self.pool.get_conn()?.exec(
            format!(
                "SELECT {} FROM `{}_dead` WHERE id > ? AND (? IS NULL OR consumer = ?) \
                 ORDER BY id LIMIT ?",
                dead_columns(),
                self.table
            ),
            (after_id, consumer, consumer, limit as u64),
        )?;
        rows.into_iter().map(dead_delivery).collect()
    }

    /// Asks the consumers to run their handler again on the dead records `ids` (row ids
    /// from [`dead`](Inbox::dead)): each consumer replays its own, in id order, within
    /// its `replay_interval`. A replayed record that succeeds leaves the dead table; one
    /// that fails again stays, with its new error. Returns how many were found.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the update fails.
    pub fn replay(&self, ids: &[u64]) -> Result<u64> {
        self.update_dead(
            ids,
            "UPDATE `{}_dead` SET replay_requested_on = UTC_TIMESTAMP(6)",
        )
    }

    /// Deletes the dead records `ids` without applying them. Returns how many were found.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the delete fails.
    pub fn discard(&self, ids: &[u64]) -> Result<u64> {
        self.update_dead(ids, "DELETE FROM `{}_dead`")
    }

    fn update_dead(&self, ids: &[u64], statement: &str) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "{} WHERE id IN ({})",
            statement.replace("{}", &self.table),
            placeholders(ids.len())
        );
        let mut conn = self.pool.get_conn()?;
        conn.exec_drop(sql, ids.to_vec())?;
        Ok(conn.affected_rows())
    }

    /// Deletes up to `limit` of `consumer`'s processed ids older than `older_than` (by
    /// the database's clock). Returns how many it deleted.
    pub(crate) fn purge(
        &self,
        conn: &mut mysql::PooledConn,
        consumer: &str,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64> {
        let micros = u64::try_from(older_than.as_micros()).unwrap_or(u64::MAX);
        conn.exec_drop(
            format!(
                "DELETE FROM `{}` WHERE consumer = ? AND processed_on < \
                 UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND LIMIT ?",
                self.table
            ),
            (consumer, micros, limit as u64),
        )?;
        Ok(conn.affected_rows())
    }

    /// The next offsets saved for `consumer` on `partitions`, where there is one.
    pub(crate) fn offsets(
        &self,
        conn: &mut impl Queryable,
        consumer: &str,
    ) -> Result<Vec<(String, i32, i64)>> {
        Ok(conn.exec(
            format!(
                "SELECT topic, kafka_partition, next_offset FROM `{}_offsets` WHERE consumer = ?",
                self.table
            ),
            (consumer,),
        )?)
    }

    /// Saves, in `tx`, that `consumer` reads `delivery`'s partition next after it.
    pub(crate) fn save_offset(
        &self,
        tx: &mut Transaction<'_>,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<()> {
        tx.exec_drop(
            format!(
                "INSERT INTO `{}_offsets` (consumer, topic, kafka_partition, next_offset, \
                 updated_on) VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6)) ON DUPLICATE KEY UPDATE \
                 next_offset = GREATEST(next_offset, VALUES(next_offset)), \
                 updated_on = VALUES(updated_on)",
                self.table
            ),
            (
                consumer,
                delivery.topic(),
                delivery.partition(),
                delivery.offset().saturating_add(1),
            ),
        )?;
        Ok(())
    }

    /// Keeps `delivery` in the dead table, in `tx`, with the handler's last `error`.
    pub(crate) fn bury(
        &self,
        tx: &mut Transaction<'_>,
        consumer: &str,
        delivery: &Delivery,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        let headers: Vec<(&str, String)> = delivery
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), hex(value)))
            .collect();
        let error: String = error.chars().take(MAX_ERROR_LEN).collect();
        tx.exec_drop(
            format!(
                "INSERT INTO `{}_dead` (consumer, message_id, topic, kafka_partition, \
                 kafka_offset, msg_key, headers, payload, record_timestamp, error, \
                 number_of_attempts, died_on) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6)) \
                 ON DUPLICATE KEY UPDATE error = VALUES(error), \
                 number_of_attempts = number_of_attempts + VALUES(number_of_attempts), \
                 died_on = VALUES(died_on), replay_requested_on = NULL",
                self.table
            ),
            (
                consumer,
                delivery.message_id().as_bytes().as_slice(),
                delivery.topic(),
                delivery.partition(),
                delivery.offset(),
                delivery.key(),
                serde_json::to_string(&headers)?,
                delivery.payload(),
                delivery.timestamp(),
                error,
                attempts,
            ),
        )?;
        Ok(())
    }

    /// The dead records of `consumer` whose replay was asked for, oldest request first.
    pub(crate) fn replays(
        &self,
        conn: &mut impl Queryable,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadDelivery>> {
        let rows: Vec<mysql::Row> = conn.exec(
            format!(
                "SELECT {} FROM `{}_dead` WHERE consumer = ? AND replay_requested_on IS NOT NULL \
                 ORDER BY replay_requested_on, id LIMIT ?",
                dead_columns(),
                self.table
            ),
            (consumer, limit as u64),
        )?;
        rows.into_iter().map(dead_delivery).collect()
    }

    /// Ends the replay of the dead record `id`, in `tx`: deleted when it was applied (or
    /// found a duplicate), kept with its new error otherwise.
    pub(crate) fn settle_replay(
        &self,
        tx: &mut Transaction<'_>,
        id: u64,
        failure: Option<&str>,
    ) -> Result<()> {
        match failure {
            None => tx.exec_drop(
                format!("DELETE FROM `{}_dead` WHERE id = ?", self.table),
                (id,),
            )?,
            Some(error) => tx.exec_drop(
                format!(
                    "UPDATE `{}_dead` SET error = ?, number_of_attempts = number_of_attempts + 1, \
                     replay_requested_on = NULL WHERE id = ?",
                    self.table
                ),
                (error.chars().take(MAX_ERROR_LEN).collect::<String>(), id),
            )?,
        }
        Ok(())
    }
}

/// `sql` with the schema's table names replaced by those of the inbox `table`.
fn named(sql: &str, table: &str) -> String {
    sql.replace("`inbox_dead`", &format!("`{table}_dead`"))
        .replace("`inbox_offsets`", &format!("`{table}_offsets`"))
        .replace("`inbox`", &format!("`{table}`"))
}

/// Checks a consumer name: 1 to [`MAX_CONSUMER_LEN`] characters, no control characters.
pub(crate) fn check_consumer(consumer: &str) -> Result<()> {
    if consumer.is_empty()
        || consumer.chars().count() > MAX_CONSUMER_LEN
        || consumer.chars().any(char::is_control)
    {
        return Err(Error::config(format!(
            "consumer name {consumer:?} must be 1 to {MAX_CONSUMER_LEN} characters with no \
             control characters"
        )));
    }
    Ok(())
}

/// `items` padded to a power of two by repeating the last, so that statements of a few
/// lengths are prepared once per connection; a repeated row or id changes nothing.
fn padded_with_last<T: Copy>(items: &[T]) -> Vec<T> {
    let Some(&last) = items.last() else {
        return Vec::new();
    };
    let mut padded = items.to_vec();
    padded.resize(items.len().next_power_of_two(), last);
    padded
}

/// Header values are bytes; the dead table keeps them in JSON as hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The dead table's columns as [`dead_delivery`] reads them.
fn dead_columns() -> String {
    format!(
        "id, consumer, topic, kafka_partition, kafka_offset, msg_key, headers, payload, \
         record_timestamp, error, number_of_attempts, {}, {}",
        micros_of("died_on"),
        micros_of("COALESCE(replay_requested_on, '1970-01-01')")
    )
}

/// A row of the dead table, as [`dead_columns`] selects it.
fn dead_delivery(row: mysql::Row) -> Result<DeadDelivery> {
    fn column<T: mysql::prelude::FromValue>(row: &mut mysql::Row, index: usize) -> Result<T> {
        match row.take_opt(index) {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(Error::CorruptRow {
                id: 0,
                reason: format!("dead inbox record, column {index}: {e}"),
            }),
            None => Err(Error::CorruptRow {
                id: 0,
                reason: format!("dead inbox record: no column {index}"),
            }),
        }
    }
    let mut row = row;
    let id: u64 = column(&mut row, 0)?;
    let consumer: String = column(&mut row, 1)?;
    let topic: String = column(&mut row, 2)?;
    let partition: i32 = column(&mut row, 3)?;
    let offset: i64 = column(&mut row, 4)?;
    let key: Option<Vec<u8>> = column(&mut row, 5)?;
    let headers: String = column(&mut row, 6)?;
    let payload: Vec<u8> = column(&mut row, 7)?;
    let ts: Option<i64> = column(&mut row, 8)?;
    let error: String = column(&mut row, 9)?;
    let attempts: u32 = column(&mut row, 10)?;
    let died: i64 = column(&mut row, 11)?;
    let replay: i64 = column(&mut row, 12)?;
    let corrupt = |reason: &str| Error::CorruptRow {
        id,
        reason: format!("dead inbox record: {reason}"),
    };
    let pairs: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| corrupt(&e.to_string()))?;
    let headers = pairs
        .into_iter()
        .map(|(name, value)| {
            Ok((
                name,
                unhex(&value).ok_or_else(|| corrupt("header not hex"))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DeadDelivery {
        id,
        consumer,
        delivery: Delivery::new(&topic, partition, offset, key, payload, headers, ts),
        error,
        attempts,
        died_on: time(died),
        replay_requested_on: time_or_never(replay),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_round_trip_through_hex() {
        for value in [&b""[..], b"\x00\xffabc", "é".as_bytes()] {
            assert_eq!(unhex(&hex(value)).as_deref(), Some(value));
        }
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn lists_are_padded_to_a_power_of_two_with_their_last() {
        assert_eq!(padded_with_last::<u8>(&[]), Vec::<u8>::new());
        assert_eq!(padded_with_last(&[1]), vec![1]);
        assert_eq!(padded_with_last(&[1, 2, 3]), vec![1, 2, 3, 3]);
        assert_eq!(padded_with_last(&[1, 2, 3, 4, 5]).len(), 8);
    }

    #[test]
    fn consumer_names_are_checked() {
        assert!(check_consumer("billing").is_ok());
        for bad in ["", "a\nb", &"x".repeat(MAX_CONSUMER_LEN + 1)] {
            assert!(
                matches!(check_consumer(bad), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_schema_is_renamed_whole() {
        let named = named(SCHEMA, "billing_inbox");
        assert!(named.contains("`billing_inbox`"));
        assert!(named.contains("`billing_inbox_dead`"));
        assert!(named.contains("`billing_inbox_offsets`"));
        assert!(!named.contains("`inbox"));
    }
}
