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

mod apply;
mod cleaner;
mod consumer;
mod context;
mod dead;
mod delivery;
mod revoked;
mod settings;
#[cfg(feature = "opentelemetry")]
mod span;

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Pool, Transaction};
use uuid::Uuid;

pub use self::apply::HandlerError;
pub use self::consumer::{InboxConsumer, InboxHandle};
pub use self::dead::DeadDelivery;
pub use self::delivery::{Delivery, FALLBACK_ID_NAMESPACE};
pub use self::settings::{Assignment, InboxSettings, MAX_INBOX_BATCH};
use crate::error::{Error, Result};
use crate::store::sql::{padded_with_last, placeholders, validate_table_name};

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

#[cfg(test)]
mod tests {
    use super::*;

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
