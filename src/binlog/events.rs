//! The binlog reader: a connection of its own that asks the server for its binary log
//! from a position, as a replica does, and turns the events into the changes the relay
//! acts on: outbox rows inserted, dead rows revived, transactions ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mysql::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql::prelude::Queryable;
use mysql::{BinlogRequest, Conn, Opts, OptsBuilder};

use super::change::{Change, PartialKind};
use super::image::{corrupt_event, readable, Columns, Image};
use super::position::{Position, POSITION_TABLE};
use crate::error::{Error, Result, Worker};
use crate::runtime::signal::Signals;
use crate::store::sql::RowState;

/// MariaDB's own event types, which the `mysql` crate does not name.
const MARIADB_GTID_EVENT: u8 = 162;
/// MySQL's event that wraps a compressed transaction (`binlog_transaction_compression`).
const MYSQL_TRANSACTION_PAYLOAD_EVENT: u8 = 40;
/// MariaDB's compressed rows events (`log_bin_compress`), from the first to the last.
const MARIADB_COMPRESSED_ROWS: std::ops::RangeInclusive<u8> = 166..=171;
/// What a MariaDB replica says it understands: GTID events and annotations (4, "mine").
const MARIADB_CAPABILITY: u8 = 4;
/// The row states, as the binary log gives the `state` column.
const PENDING: i64 = RowState::Pending as i64;
const DEAD: i64 = RowState::Dead as i64;
const DISCARDED: i64 = RowState::Discarded as i64;
/// How often the reader records its success while events keep coming.
const SUCCESS_EVERY: Duration = Duration::from_millis(500);

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
}
