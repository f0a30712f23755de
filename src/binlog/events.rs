//! The binlog reader: a connection of its own that asks the server for its binary log
//! from a position, as a replica does, and turns the events into the changes the relay
//! acts on: outbox rows inserted, dead rows revived, transactions ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mysql::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql::binlog::row::BinlogRow;
use mysql::binlog::value::BinlogValue;
use mysql::prelude::Queryable;
use mysql::{BinlogRequest, Conn, Opts, OptsBuilder, Value};

use super::position::{Position, POSITION_TABLE};
use crate::dispatcher::signal::Signals;
use crate::error::{Error, Result, Worker};
use crate::record::Record;
use crate::store::codec::assemble;

/// MariaDB's own event types, which the `mysql` crate does not name.
const MARIADB_GTID_EVENT: u8 = 162;
/// MySQL's event that wraps a compressed transaction (`binlog_transaction_compression`).
const MYSQL_TRANSACTION_PAYLOAD_EVENT: u8 = 40;
/// MariaDB's compressed rows events (`log_bin_compress`), from the first to the last.
const MARIADB_COMPRESSED_ROWS: std::ops::RangeInclusive<u8> = 166..=171;
/// What a MariaDB replica says it understands: GTID events and annotations (4, "mine").
const MARIADB_CAPABILITY: u8 = 4;
const PENDING: i64 = 0;
const DEAD: i64 = 2;
const DISCARDED: i64 = 3;
/// How often the reader records its success while events keep coming.
const SUCCESS_EVERY: Duration = Duration::from_millis(500);

/// One thing the relay acts on, in the order of the binary log.
#[derive(Debug)]
pub(crate) enum Change {
    /// A pending row inserted into the outbox table.
    Inserted(Record),
    /// A dead row an operator replayed (`replayed`: its record, pending again) or
    /// discarded (`None`); `key` is its topic and key, if it has a key.
    Revived {
        id: u64,
        key: Option<(String, Vec<u8>)>,
        replayed: Option<Record>,
    },
    /// A pending row that cannot be read as a message (written by hand, say): the relay
    /// makes it dead, with `reason`, instead of stopping on it. `key` is its topic and
    /// key where those could be read.
    Corrupt {
        id: u64,
        reason: String,
        key: Option<(String, Vec<u8>)>,
    },
    /// A row whose image lacks columns the relay needs, or holds one it cannot read (a
    /// session that logs `binlog_row_image` MINIMAL or NOBLOB, say): it is read from the
    /// table by its id instead.
    Partial { id: u64, kind: PartialKind },
    /// A transaction ended; reading from `at` goes on after it. `foreign`: it changed
    /// something besides the relay's own marks and position.
    Committed {
        at: Position,
        gtid: Option<String>,
        foreign: bool,
    },
}

/// What a [`Change::Partial`] row was seen doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartialKind {
    /// Inserted.
    Inserted,
    /// Made pending again by an operator's replay (its attempts set back to 0).
    Replayed,
    /// Discarded by an operator.
    Discarded,
}

/// Where the outbox table's columns are in its rows, by name.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    names: Vec<String>,
    count: usize,
    id: usize,
    message_id: usize,
    topic: usize,
    key: usize,
    headers: usize,
    payload: usize,
    state: usize,
    created_on: usize,
    attempts: usize,
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
            attempts: at("number_of_attempts")?,
            names,
        })
    }
}

/// What the reader needs to know to open the stream and pick the outbox table's rows.
/// Not `Debug`: its connection options hold the database password.
#[derive(Clone)]
pub(crate) struct Source {
    pub opts: Opts,
    pub server_id: u32,
    pub heartbeat: Duration,
    pub mariadb: bool,
    pub database: String,
    pub table: String,
    pub columns: Columns,
}

/// Reads the binary log from `from` and sends each change to `changes`, until `quit` is
/// set or the receiver is gone (then within a heartbeat) or the stream fails (then the
/// error is the last thing sent). Every event received counts as the reader's success.
pub(crate) fn read(
    source: Source,
    from: Position,
    changes: Sender<Result<Change>>,
    quit: &AtomicBool,
    signals: &Signals,
) {
    if let Err(e) = stream(&source, from, &changes, quit, signals) {
        let _ = changes.send(Err(e));
    }
}

fn stream(
    source: &Source,
    from: Position,
    changes: &Sender<Result<Change>>,
    quit: &AtomicBool,
    signals: &Signals,
) -> Result<()> {
    // The server sends a heartbeat when it has nothing else; a read that waits several
    // heartbeats in vain means the server or the network is gone.
    let opts = OptsBuilder::from_opts(source.opts.clone())
        .read_timeout(Some(source.heartbeat * 4 + Duration::from_secs(1)))
        .tcp_keepalive_time_ms(Some(10_000));
    let mut conn = Conn::new(opts)?;
    let nanos = u64::try_from(source.heartbeat.as_nanos()).unwrap_or(u64::MAX);
    conn.query_drop(format!("SET @master_heartbeat_period = {nanos}"))?;
    if source.mariadb {
        conn.query_drop(format!(
            "SET @mariadb_slave_capability = {MARIADB_CAPABILITY}"
        ))?;
    }
    let request = BinlogRequest::new(source.server_id)
        .with_filename(from.file.as_bytes().to_vec())
        .with_pos(from.offset);
    let mut events = conn.get_binlog_stream(request)?;
    let mut decoder = Decoder::new(source, from.file);
    let mut told = Instant::now();
    signals.succeeded(Worker::BinlogReader);
    while let Some(event) = events.next() {
        let event = event?;
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Heartbeats included: a reader that hears from the server is alive, busy or not.
        if told.elapsed() >= SUCCESS_EVERY {
            signals.succeeded(Worker::BinlogReader);
            told = Instant::now();
        }
        let mut sent = Ok(());
        decoder.decode(&event, |table_id| events.get_tme(table_id), &mut |change| {
            if sent.is_ok() {
                sent = changes.send(Ok(change));
            }
        })?;
        if sent.is_err() {
            return Ok(());
        }
    }
    Err(stream_ended())
}

/// The error of a binary log stream that ended: the server closed it or went away.
pub(crate) fn stream_ended() -> Error {
    Error::Database(mysql::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the binary log stream ended",
    )))
}

/// Which table a table id of the binary log stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Outbox,
    Positions,
    Other,
}

/// Turns events into changes, keeping what spans events: the file being read, the
/// tables behind table ids, the transaction's GTID and whether it is the relay's own.
struct Decoder<'s> {
    source: &'s Source,
    /// The file's name up to its number (`mysql-bin.`), which every file shares.
    base: String,
    file: String,
    /// Whether the stream's format (and so its checksum) is known yet.
    format_known: bool,
    tables: HashMap<u64, Table>,
    gtid: Option<String>,
    foreign: bool,
}

impl<'s> Decoder<'s> {
    fn new(source: &'s Source, file: String) -> Decoder<'s> {
        let base = match file.rfind('.') {
            Some(dot) => file[..=dot].to_string(),
            None => file.clone(),
        };
        Decoder {
            source,
            base,
            file,
            format_known: false,
            tables: HashMap::new(),
            gtid: None,
            foreign: false,
        }
    }

    fn decode<'e>(
        &mut self,
        event: &Event,
        table_map: impl Fn(u64) -> Option<&'e TableMapEvent<'static>>,
        emit: &mut impl FnMut(Change),
    ) -> Result<()> {
        let header = event.header();
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            // sequence number (8 bytes), domain (4), flags: "domain-server-sequence".
            let data = event.data();
            if data.len() >= 12 {
                let sequence = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
                self.gtid = Some(format!("{domain}-{}-{sequence}", header.server_id()));
            }
            return Ok(());
        }
        if let Some(setting) = compressed(header.event_type_raw()) {
            return Err(Error::config(format!(
                "the binary log holds a compressed event before {}:{} ({setting} is ON), \
                 which the binlog relay cannot read and must not skip: nothing after it is \
                 published. Run SET GLOBAL {setting} = OFF (and set it OFF under [mysqld]), \
                 then DELETE FROM {POSITION_TABLE} WHERE outbox_table = '{}': the relay \
                 then publishes what is pending from the table and follows the log from its \
                 end",
                self.file,
                header.log_pos(),
                self.source.table
            )));
        }
        let Some(data) = event.read_data().map_err(corrupt_event)? else {
            return Ok(());
        };
        match data {
            EventData::RotateEvent(rotate) => {
                let name = rotate.name();
                // The first rotate comes before the format is known, with its checksum
                // still after the name: it names the file asked for.
                self.file = match self.format_known {
                    true => name.into_owned(),
                    false if name.starts_with(&self.file) => self.file.clone(),
                    false => file_name(&self.base, &name),
                };
            }
            EventData::FormatDescriptionEvent(_) => self.format_known = true,
            EventData::GtidEvent(gtid) => {
                let sid = uuid::Uuid::from_bytes(gtid.sid());
                self.gtid = Some(format!("{sid}:{}", gtid.gno()));
            }
            EventData::TableMapEvent(map) => {
                let table = if map.database_name() != self.source.database {
                    Table::Other
                } else if map.table_name() == self.source.table {
                    Table::Outbox
                } else if map.table_name() == POSITION_TABLE {
                    Table::Positions
                } else {
                    Table::Other
                };
                self.tables.insert(map.table_id(), table);
            }
            EventData::RowsEvent(rows) => self.rows(&rows, table_map, emit)?,
            EventData::XidEvent(_) => self.commit(header.log_pos(), emit),
            // BEGIN opens a transaction; any other statement (COMMIT of a
            // non-transactional table, DDL) ends one.
            EventData::QueryEvent(query) if !query.query_raw().eq_ignore_ascii_case(b"BEGIN") => {
                self.commit(header.log_pos(), emit)
            }
            _ => {}
        }
        Ok(())
    }

    fn commit(&mut self, log_pos: u32, emit: &mut impl FnMut(Change)) {
        emit(Change::Committed {
            at: Position {
                file: self.file.clone(),
                offset: u64::from(log_pos),
            },
            gtid: self.gtid.take(),
            foreign: std::mem::take(&mut self.foreign),
        });
    }

    fn rows<'e>(
        &mut self,
        rows: &RowsEventData<'_>,
        table_map: impl Fn(u64) -> Option<&'e TableMapEvent<'static>>,
        emit: &mut impl FnMut(Change),
    ) -> Result<()> {
        let table = self
            .tables
            .get(&rows.table_id())
            .copied()
            .unwrap_or(Table::Other);
        let inserted = matches!(
            rows,
            RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_)
        );
        let updated = matches!(
            rows,
            RowsEventData::UpdateRowsEvent(_) | RowsEventData::UpdateRowsEventV1(_)
        );
        match table {
            Table::Positions => return Ok(()),
            Table::Other => {
                self.foreign = true;
                return Ok(());
            }
            Table::Outbox if !(inserted || updated) => return Ok(()),
            Table::Outbox => {}
        }
        let map = table_map(rows.table_id()).ok_or_else(|| {
            corrupt_event(std::io::Error::other("a rows event without its table map"))
        })?;
        let columns = &self.source.columns;
        if map.columns_count() as usize != columns.count {
            return Err(Error::config(format!(
                "the binary log has rows of `{}` with {} columns where the table now has {}: \
                 its layout changed while the relay ran; restart the relay",
                self.source.table,
                map.columns_count(),
                columns.count
            )));
        }
        for row in rows.rows(map) {
            let (before, after) = row.map_err(corrupt_event)?;
            let Some(after) = after else { continue };
            let after = Image::new(after, columns);
            if inserted {
                self.foreign = true;
                match after.number(columns.state) {
                    Some(PENDING) => {
                        let id = after.id(columns)?;
                        emit(readable(after, id, columns, PartialKind::Inserted));
                    }
                    Some(_) => {}
                    // Not in the image: the row is read from the table.
                    None => emit(Change::Partial {
                        id: after.id(columns)?,
                        kind: PartialKind::Inserted,
                    }),
                }
                continue;
            }
            let before = before.map(|b| Image::new(b, columns));
            let was = before.as_ref().and_then(|b| b.number(columns.state));
            let now = after.number(columns.state);
            let revived = match (was, now) {
                (Some(DEAD), Some(PENDING)) => Some(PartialKind::Replayed),
                (Some(DEAD), Some(DISCARDED)) => Some(PartialKind::Discarded),
                // A before image without the state (MINIMAL): only a replay makes a row
                // pending with no attempt counted, only a discard makes it discarded.
                (None, Some(PENDING)) if after.number(columns.attempts) == Some(0) => {
                    Some(PartialKind::Replayed)
                }
                (None, Some(DISCARDED)) => Some(PartialKind::Discarded),
                _ => None,
            };
            match revived {
                Some(kind) => {
                    self.foreign = true;
                    let id = before.as_ref().unwrap_or(&after).id(columns)?;
                    emit(readable(after, id, columns, kind));
                }
                None if was == Some(DEAD) => {}
                // A rows event holds the rows of one statement, and a statement that
                // revives dead rows (`outbox replay`, `outbox discard`, the admin API)
                // touches dead rows only: an event that starts with any other row (most
                // often the relay's own marks coming back) is not decoded further.
                None => break,
            }
        }
        Ok(())
    }
}

/// The server setting behind a compressed event of type `event_type`: MySQL's compressed
/// transactions and MariaDB's compressed rows events, which the `mysql` crate does not
/// read here. `None` for any other event.
fn compressed(event_type: u8) -> Option<&'static str> {
    if event_type == MYSQL_TRANSACTION_PAYLOAD_EVENT {
        Some("binlog_transaction_compression")
    } else if MARIADB_COMPRESSED_ROWS.contains(&event_type) {
        Some("log_bin_compress")
    } else {
        None
    }
}

/// A binary log file's name as a rotate event gives it, read as `base` (the name of the
/// file the reader started in, up to its number) and the number after it: the rotate event
/// the server sends first may carry its checksum after the name.
fn file_name(base: &str, name: &str) -> String {
    let Some(number) = name.strip_prefix(base) else {
        return name.to_string();
    };
    let digits = number.bytes().take_while(u8::is_ascii_digit).count();
    name[..base.len() + digits].to_string()
}

fn corrupt_event(e: std::io::Error) -> Error {
    Error::Database(mysql::Error::IoError(e))
}

/// A row image of the outbox table, read by the table's column numbers whether it holds
/// every column or only some: a session that logs `binlog_row_image` MINIMAL or NOBLOB
/// leaves columns out, and the row then holds the others only.
struct Image {
    row: BinlogRow,
    /// For each of the table's columns, where it is in the row, if it is there.
    at: Vec<Option<usize>>,
}

impl Image {
    fn new(row: BinlogRow, columns: &Columns) -> Image {
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

    fn peek(&self, column: usize) -> Option<&BinlogValue<'_>> {
        let index = self.at.get(column).copied().flatten()?;
        self.row.as_ref(index)
    }

    /// The value of `column`, taken out of the image; `None` when the image lacks it or
    /// holds what cannot be read as a value (JSON the decoder cannot convert, say).
    fn take(&mut self, column: usize) -> Option<Value> {
        let index = self.at.get(column).copied().flatten()?;
        match self.row.take(index)? {
            BinlogValue::Value(value) => Some(value),
            other => Value::try_from(other).ok(),
        }
    }

    /// An integer column's value, if the image holds it.
    fn number(&self, column: usize) -> Option<i64> {
        match self.peek(column)? {
            BinlogValue::Value(v) => mysql::from_value_opt::<i64>(v.clone()).ok(),
            _ => None,
        }
    }

    /// The row's id. An insert's image holds it, and an update's before image: an
    /// update's after image may not (MINIMAL).
    fn id(&self, columns: &Columns) -> Result<u64> {
        match self.peek(columns.id) {
            Some(BinlogValue::Value(v)) => mysql::from_value_opt(v.clone())
                .map_err(|e| corrupt_event(std::io::Error::other(e.to_string()))),
            _ => Err(corrupt_event(std::io::Error::other(
                "an outbox row without its id in the binary log",
            ))),
        }
    }

    /// The topic and key, where both are what they should be.
    fn topic_and_key(&self, columns: &Columns) -> Option<(String, Vec<u8>)> {
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
fn readable(mut image: Image, id: u64, columns: &Columns, kind: PartialKind) -> Change {
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
fn record(image: &mut Image, id: u64, columns: &Columns) -> Result<Option<Record>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_end_with_their_number() {
        let base = "mysql-bin.";
        assert_eq!(file_name(base, "mysql-bin.000001"), "mysql-bin.000001");
        assert_eq!(
            file_name(base, "mysql-bin.000002\u{fffd}\u{fffd}"),
            "mysql-bin.000002"
        );
        assert_eq!(
            file_name(base, "mysql-bin.000003\u{1}.9"),
            "mysql-bin.000003"
        );
        assert_eq!(
            file_name("log.v2.", "log.v2.001000\u{7f}12"),
            "log.v2.001000"
        );
    }

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
