//! A row as the binary log gives it: the outbox table's columns by position, a row image
//! (whole, or only some columns), and the record or change it stands for.

use std::time::SystemTime;

use mysql::binlog::row::BinlogRow;
use mysql::binlog::value::BinlogValue;
use mysql::prelude::Queryable;
use mysql::Value;

use super::change::{Change, PartialKind};
use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::codec::assemble;
use crate::time::time;

/// Where the outbox table's columns are in its rows, by name.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    pub names: Vec<String>,
    pub count: usize,
    pub id: usize,
    pub message_id: usize,
    pub topic: usize,
    pub key: usize,
    pub headers: usize,
    pub payload: usize,
    pub state: usize,
    pub created_on: usize,
    pub available_on: usize,
    pub attempts: usize,
}

impl Columns {
    /// The outbox table's layout, from `information_schema`.
    pub fn read(conn: &mut impl Queryable, table: &str) -> Result<Columns> {
        let names: Vec<String> = conn.exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (table,),
        )?;
        let at = |name: &str| {
            names.iter().position(|n| n == name).ok_or_else(|| {
                Error::config(format!(
                    "table `{table}` has no column {name}: is it an outbox table (migrate)?"
                ))
            })
        };
        Ok(Columns {
            count: names.len(),
            id: at("id")?,
            message_id: at("message_id")?,
            topic: at("topic")?,
            key: at("msg_key")?,
            headers: at("headers")?,
            payload: at("payload")?,
            state: at("state")?,
            created_on: at("created_on")?,
            available_on: at("available_on")?,
            attempts: at("number_of_attempts")?,
            names,
        })
    }
}

/// A row image of the outbox table, read by the table's column numbers whether it holds
/// every column or only some: a session that logs `binlog_row_image` MINIMAL or NOBLOB
/// leaves columns out, and the row then holds the others only.
pub(super) struct Image {
    row: BinlogRow,
    /// For each of the table's columns, where it is in the row, if it is there.
    at: Vec<Option<usize>>,
}

impl Image {
    pub(super) fn new(row: BinlogRow, columns: &Columns) -> Image {
        let at = if row.len() == columns.count {
            (0..columns.count).map(Some).collect()
        } else {
            // Each column is named by the table map: `@n` for the table's n-th column, or
            // its name when the server logs row metadata in full.
            let mut at = vec![None; columns.count];
            for (index, column) in row.columns_ref().iter().enumerate() {
                let name = column.name_str();
                let number = match name.strip_prefix('@') {
                    Some(number) => number.parse().ok(),
                    None => columns.names.iter().position(|n| *n == name),
                };
                if let Some(slot) = number.and_then(|n: usize| at.get_mut(n)) {
                    *slot = Some(index);
                }
            }
            at
        };
        Image { row, at }
    }

    pub(super) fn peek(&self, column: usize) -> Option<&BinlogValue<'_>> {
        let index = self.at.get(column).copied().flatten()?;
        self.row.as_ref(index)
    }

    /// The value of `column`, taken out of the image; `None` when the image lacks it or
    /// holds what cannot be read as a value (JSON the decoder cannot convert, say).
    pub(super) fn take(&mut self, column: usize) -> Option<Value> {
        let index = self.at.get(column).copied().flatten()?;
        match self.row.take(index)? {
            BinlogValue::Value(value) => Some(value),
            other => Value::try_from(other).ok(),
        }
    }

    /// An integer column's value, if the image holds it.
    pub(super) fn number(&self, column: usize) -> Option<i64> {
        match self.peek(column)? {
            BinlogValue::Value(v) => mysql::from_value_opt::<i64>(v.clone()).ok(),
            _ => None,
        }
    }

    /// The row's id. An insert's image holds it, and an update's before image: an
    /// update's after image may not (MINIMAL).
    pub(super) fn id(&self, columns: &Columns) -> Result<u64> {
        match self.peek(columns.id) {
            Some(BinlogValue::Value(v)) => mysql::from_value_opt(v.clone())
                .map_err(|e| corrupt_event(std::io::Error::other(e.to_string()))),
            _ => Err(corrupt_event(std::io::Error::other(
                "an outbox row without its id in the binary log",
            ))),
        }
    }

    /// A `DATETIME` column's value as microseconds since 1970, if the image holds it.
    fn time(&self, column: usize) -> Option<i64> {
        match self.peek(column)? {
            BinlogValue::Value(Value::Date(y, mo, d, h, mi, s, us)) => {
                micros_since_epoch(*y, *mo, *d, *h, *mi, *s, *us)
            }
            _ => None,
        }
    }

    /// When an inserted row is due, if it is a delayed message (never tried, and
    /// available later than it was created): the time on the database's clock.
    pub(super) fn delayed_until(&self, columns: &Columns) -> Option<SystemTime> {
        if self.number(columns.attempts)? != 0 {
            return None;
        }
        let (created, available) = (
            self.time(columns.created_on)?,
            self.time(columns.available_on)?,
        );
        (available > created).then(|| time(available))
    }

    /// The topic and key, where both are what they should be.
    pub(super) fn topic_and_key(&self, columns: &Columns) -> Option<(String, Vec<u8>)> {
        let read = |column| match self.peek(column) {
            Some(BinlogValue::Value(Value::Bytes(bytes))) => Some(bytes.clone()),
            _ => None,
        };
        Some((
            String::from_utf8(read(columns.topic)?).ok()?,
            read(columns.key)?,
        ))
    }
}

/// The change row `id`'s image, seen doing `kind`, stands for: its record, or
/// [`Change::Corrupt`] when the row is no message, or [`Change::Partial`] when the image
/// lacks what the record needs.
pub(super) fn readable(mut image: Image, id: u64, columns: &Columns, kind: PartialKind) -> Change {
    let key = image.topic_and_key(columns);
    if kind == PartialKind::Discarded {
        // What it held back goes, whatever else the row holds: its key is enough.
        return match key {
            Some(key) => Change::Revived {
                id,
                key: Some(key),
                replayed: None,
            },
            None => Change::Partial { id, kind },
        };
    }
    if kind == PartialKind::Inserted {
        if let Some(due) = image.delayed_until(columns) {
            // Read from the table when it is due; its key waits for it meanwhile.
            return Change::Scheduled { id, key, due };
        }
    }
    match record(&mut image, id, columns) {
        Ok(Some(record)) => match kind {
            PartialKind::Inserted => Change::Inserted(record),
            _ => Change::Revived {
                id,
                key,
                replayed: Some(record),
            },
        },
        Ok(None) => Change::Partial { id, kind },
        Err(Error::CorruptRow { id, reason }) => Change::Corrupt { id, reason, key },
        Err(_) => Change::Partial { id, kind },
    }
}

/// Row `id`'s image as a record; `None` when the image lacks a column the record needs.
pub(super) fn record(image: &mut Image, id: u64, columns: &Columns) -> Result<Option<Record>> {
    let corrupt = |column: &str, e: mysql::FromValueError| Error::CorruptRow {
        id,
        reason: format!("{column}: {e}"),
    };
    let values = [
        columns.message_id,
        columns.topic,
        columns.key,
        columns.headers,
        columns.payload,
        columns.attempts,
        columns.created_on,
    ]
    .map(|column| image.take(column));
    let [Some(message_id), Some(topic), Some(key), Some(headers), Some(payload), Some(attempts), Some(created)] =
        values
    else {
        return Ok(None);
    };
    let mut message_id: Vec<u8> =
        mysql::from_value_opt(message_id).map_err(|e| corrupt("message_id", e))?;
    // The binary log keeps BINARY(n) values without their trailing zero bytes.
    if message_id.len() < 16 {
        message_id.resize(16, 0);
    }
    let topic: String = mysql::from_value_opt(topic).map_err(|e| corrupt("topic", e))?;
    let key: Option<Vec<u8>> = mysql::from_value_opt(key).map_err(|e| corrupt("msg_key", e))?;
    let headers: Option<Vec<u8>> =
        mysql::from_value_opt(headers).map_err(|e| corrupt("headers", e))?;
    let payload: Vec<u8> = mysql::from_value_opt(payload).map_err(|e| corrupt("payload", e))?;
    let attempts: u32 =
        mysql::from_value_opt(attempts).map_err(|e| corrupt("number_of_attempts", e))?;
    let created = match created {
        Value::Date(y, mo, d, h, mi, s, us) => micros_since_epoch(y, mo, d, h, mi, s, us),
        _ => None,
    };
    assemble(
        id,
        &message_id,
        topic,
        key,
        headers,
        payload,
        attempts,
        created.unwrap_or(-1),
    )
    .map(Some)
}

/// A UTC date and time as microseconds since 1970 (days from the civil calendar, as in
/// Howard Hinnant's `days_from_civil`).
fn micros_since_epoch(y: u16, mo: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> Option<i64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let (y, m, d) = (
        i64::from(y) - i64::from(mo <= 2),
        i64::from(mo),
        i64::from(d),
    );
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + i64::from(h) * 3_600 + i64::from(mi) * 60 + i64::from(s);
    Some(seconds * 1_000_000 + i64::from(us))
}

/// An event the reader cannot decode, as an error.
pub(super) fn corrupt_event(e: std::io::Error) -> Error {
    Error::Database(mysql::Error::IoError(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_times_count_from_1970_in_utc() {
        assert_eq!(micros_since_epoch(1970, 1, 1, 0, 0, 0, 0), Some(0));
        assert_eq!(micros_since_epoch(1970, 1, 1, 0, 0, 1, 5), Some(1_000_005));
        // 2000-03-01, past a leap day of a year divisible by 400.
        assert_eq!(
            micros_since_epoch(2000, 3, 1, 0, 0, 0, 0),
            Some(951_868_800_000_000)
        );
        // 2026-12-02 08:55:54.123456 UTC
        assert_eq!(
            micros_since_epoch(2026, 12, 2, 8, 55, 54, 123_456),
            Some(1_796_201_754_123_456)
        );
        assert_eq!(micros_since_epoch(2026, 13, 2, 0, 0, 0, 0), None);
    }
}
