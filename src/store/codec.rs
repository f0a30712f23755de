//! How a message is stored in a row and read back: the headers' JSON, the values of an
//! INSERT, and the decoding of a claimed row.

use std::time::{Duration, UNIX_EPOCH};

use mysql::Row;
use serde_json::Value as Json;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::message::{Due, Message};
use crate::record::Record;

/// Headers as stored: a JSON array of `[name, value]` pairs, in order, where the value is
/// a string when it is UTF-8 and an array of byte values otherwise. `None` when empty.
pub(crate) fn encode_headers(headers: &[(String, Vec<u8>)]) -> Option<String> {
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

/// Reads headers written by [`encode_headers`].
pub(crate) fn decode_headers(text: &str) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
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

/// Appends one row of an INSERT of [`INSERT_COLUMNS`](super::insert::INSERT_COLUMNS) to
/// `sql`. Every value is a hexadecimal literal: nothing in a message can end the literal
/// or change the statement, whatever the server's SQL mode. The topic and headers carry
/// their character set so that MySQL 8 takes them as text (its JSON type refuses binary
/// strings). Both times are the database's clock in UTC, whatever the session's zone:
/// `available_on` is the add's time, or later for a delayed message ([`Due`]).
pub(crate) fn push_row(sql: &mut String, id: Uuid, message: &Message) {
    sql.push('(');
    push_hex(sql, "", id.as_bytes());
    sql.push_str(", ");
    push_hex(sql, "_ascii ", message.topic().as_bytes());
    sql.push_str(", ");
    match message.key() {
        Some(key) => push_hex(sql, "", key),
        None => sql.push_str("NULL"),
    }
    sql.push_str(", ");
    match encode_headers(message.headers()) {
        Some(headers) => push_hex(sql, "_utf8mb4 ", headers.as_bytes()),
        None => sql.push_str("NULL"),
    }
    sql.push_str(", ");
    push_hex(sql, "", message.payload());
    sql.push_str(", UTC_TIMESTAMP(6), ");
    push_due(sql, message.due());
    sql.push(')');
}

/// Appends the SQL of the time a message is due. Validation keeps it within ten years,
/// so the microseconds fit.
fn push_due(sql: &mut String, due: Due) {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    match due {
        Due::Now => sql.push_str("UTC_TIMESTAMP(6)"),
        Due::After(delay) => sql.push_str(&format!(
            "UTC_TIMESTAMP(6) + INTERVAL {} MICROSECOND",
            micros(delay)
        )),
        // A time already past is the add's.
        Due::At(time) => sql.push_str(&format!(
            "GREATEST(UTC_TIMESTAMP(6), TIMESTAMP'1970-01-01 00:00:00' + INTERVAL {} MICROSECOND)",
            micros(time.duration_since(UNIX_EPOCH).unwrap_or_default())
        )),
    }
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

/// Columns a claim reads, in the order [`decode_record`] expects.
/// `created_on` is read as microseconds since 1970 by arithmetic on the stored value, which
/// is UTC: `UNIX_TIMESTAMP` would read it in the session's time zone.
pub(crate) const RECORD_COLUMNS: &str =
    "o.id, o.message_id, o.topic, o.msg_key, o.headers, o.payload, o.number_of_attempts, \
     TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', o.created_on)";

/// How many columns [`RECORD_COLUMNS`] reads: a query may read more after them.
pub(crate) const RECORD_WIDTH: usize = 8;

/// A claimed row, read as [`RECORD_COLUMNS`], back into a record; [`Error::CorruptRow`]
/// when it cannot be.
pub(crate) fn decode_record(mut row: Row) -> Result<Record> {
    let id: u64 = take(&mut row, 0, 0)?;
    let message_id: Vec<u8> = take(&mut row, 1, id)?;
    let topic: String = take(&mut row, 2, id)?;
    let key: Option<Vec<u8>> = take(&mut row, 3, id)?;
    let headers: Option<Vec<u8>> = take(&mut row, 4, id)?;
    let payload: Vec<u8> = take(&mut row, 5, id)?;
    let attempts: u32 = take(&mut row, 6, id)?;
    let created_micros: i64 = take(&mut row, 7, id)?;
    assemble(
        id,
        &message_id,
        topic,
        key,
        headers,
        payload,
        attempts,
        created_micros,
    )
}

/// A record from its row's columns, as stored; [`Error::CorruptRow`] when they do not
/// make one. `created_micros` is `created_on` in microseconds since 1970 (UTC).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    id: u64,
    message_id: &[u8],
    topic: String,
    key: Option<Vec<u8>>,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
    attempts: u32,
    created_micros: i64,
) -> Result<Record> {
    let corrupt = |reason: String| Error::CorruptRow { id, reason };
    let message_id =
        Uuid::from_slice(message_id).map_err(|e| corrupt(format!("message_id: {e}")))?;
    let mut message = Message::new(topic, payload);
    if let Some(key) = key {
        message = message.with_key(key);
    }
    if let Some(headers) = headers {
        let text =
            std::str::from_utf8(&headers).map_err(|_| corrupt("headers are not UTF-8".into()))?;
        for (name, value) in decode_headers(text).map_err(corrupt)? {
            message = message.with_header(name, value);
        }
    }
    let created = u64::try_from(created_micros)
        .ok()
        .and_then(|micros| UNIX_EPOCH.checked_add(Duration::from_micros(micros)))
        .ok_or_else(|| corrupt(format!("created_on is {created_micros} us from 1970")))?;
    Ok(Record {
        id,
        message_id,
        attempts,
        created,
        message,
    })
}

/// Column `index` of the row `id`, taken out of `row`; [`Error::CorruptRow`] when it is
/// missing or of another type.
pub(crate) fn take<T: mysql::prelude::FromValue>(
    row: &mut Row,
    index: usize,
    id: u64,
) -> Result<T> {
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

    const TIMES: &str = "UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)";

    #[test]
    fn rows_are_hex_with_nulls_for_no_key_and_no_headers_and_utc_times() {
        let id = Uuid::from_bytes([0xab; 16]);
        let mut sql = String::new();
        push_row(
            &mut sql,
            id,
            &Message::new("t.1", vec![0x00, 0x27, 0x5c, 0xff]),
        );
        assert_eq!(
            sql,
            format!(
                "(X'{}', _ascii X'742E31', NULL, NULL, X'00275CFF', {TIMES})",
                "AB".repeat(16)
            )
        );
    }

    #[test]
    fn rows_carry_key_and_headers_as_encoded() {
        let message = Message::new("t", "").with_key("k'").with_header("h", "v");
        let mut sql = String::new();
        push_row(&mut sql, Uuid::nil(), &message);
        let headers: String = encode_headers(message.headers())
            .unwrap()
            .bytes()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert!(
            sql.ends_with(&format!(", X'6B27', _utf8mb4 X'{headers}', X'', {TIMES})")),
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
}
