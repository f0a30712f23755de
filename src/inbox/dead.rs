//! Records a consumer gave up on: kept whole in the dead table, listed, replayed by the
//! consumer on request, or discarded.

use std::time::SystemTime;

use mysql::prelude::Queryable;
use mysql::Transaction;

use super::{Delivery, Inbox, MAX_ERROR_LEN};
use crate::error::{Error, Result};
use crate::store::sql::{first_chars, placeholders};
use crate::time::{micros_of, time, time_or_never};

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
        let error = first_chars(error, MAX_ERROR_LEN);
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
                (first_chars(error, MAX_ERROR_LEN), id),
            )?,
        }
        Ok(())
    }
}

/// Header values are bytes; the dead table keeps them in JSON as hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
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
}
