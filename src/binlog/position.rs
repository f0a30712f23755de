//! Where the binlog relay stands, kept in `outbox_binlog_position` (`sql/binlog_position.sql`).

use mysql::prelude::Queryable;

use crate::error::Result;

/// The table of positions, one row per outbox table.
pub const POSITION_TABLE: &str = "outbox_binlog_position";
const SCHEMA: &str = include_str!("../../sql/binlog_position.sql");

/// A place in the server's binary log: a file and a byte offset in it. Reading from it
/// gives the events after the last one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The binary log file, as `SHOW BINARY LOGS` names it.
    pub file: String,
    /// The offset of the next event in that file.
    pub offset: u64,
}

impl Position {
    /// Whether this position is at or after `other`: in a later file (numbered by its
    /// extension, as the server names them), or in the same one at or after its offset.
    pub(crate) fn reached(&self, other: &Position) -> bool {
        let number = |file: &str| {
            file.rsplit_once('.')
                .and_then(|(_, n)| n.parse::<u64>().ok())
        };
        match (number(&self.file), number(&other.file)) {
            (Some(mine), Some(theirs)) if mine != theirs => mine > theirs,
            _ => self.file == other.file && self.offset >= other.offset,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.offset)
    }
}

/// Creates the table of positions if it does not exist.
pub(crate) fn migrate(conn: &mut impl Queryable) -> Result<()> {
    Ok(conn.query_drop(SCHEMA)?)
}

/// The position saved for `table`, if any, and the server id of the server it is on.
pub(crate) fn load(conn: &mut impl Queryable, table: &str) -> Result<Option<(Position, u32)>> {
    let row: Option<(String, u64, u32)> = conn.exec_first(
        format!("SELECT file, position, server_id FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
        (table,),
    )?;
    Ok(row.map(|(file, offset, server)| (Position { file, offset }, server)))
}

/// Writes `table`'s row of the table of positions through `conn` without moving its
/// position (a row written for the first time holds `at` on no server, server id 0,
/// which is no position to resume from): a commit after everything before `at` in the
/// binary log, which the server makes visible only once those commits are.
pub(crate) fn touch(
    conn: &mut impl Queryable,
    table: &str,
    at: &Position,
    relay: &str,
) -> Result<()> {
    conn.exec_drop(
        format!(
            "INSERT INTO `{POSITION_TABLE}` (outbox_table, file, position, server_id, gtid, relay, \
             saved_on) VALUES (?, ?, ?, 0, NULL, ?, UTC_TIMESTAMP(6)) \
             ON DUPLICATE KEY UPDATE relay = VALUES(relay), saved_on = VALUES(saved_on)"
        ),
        (table, &at.file, at.offset, relay),
    )?;
    Ok(())
}

/// Saves `at` as `table`'s position on this server (`@@server_id`), by `relay`, with the
/// last transaction's GTID.
pub(crate) fn save(
    conn: &mut impl Queryable,
    table: &str,
    at: &Position,
    gtid: Option<&str>,
    relay: &str,
) -> Result<()> {
    conn.exec_drop(
        format!(
            "INSERT INTO `{POSITION_TABLE}` (outbox_table, file, position, server_id, gtid, relay, \
             saved_on) VALUES (?, ?, ?, @@server_id, ?, ?, UTC_TIMESTAMP(6)) \
             ON DUPLICATE KEY UPDATE file = VALUES(file), position = VALUES(position), \
             server_id = VALUES(server_id), gtid = VALUES(gtid), relay = VALUES(relay), \
             saved_on = VALUES(saved_on)"
        ),
        (table, &at.file, at.offset, gtid, relay),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Position;

    fn at(file: &str, offset: u64) -> Position {
        Position {
            file: file.into(),
            offset,
        }
    }

    #[test]
    fn a_position_is_reached_by_itself_later_offsets_and_later_files() {
        let p = at("log.000009", 500);
        assert!(p.reached(&p));
        assert!(at("log.000009", 501).reached(&p));
        assert!(!at("log.000009", 499).reached(&p));
        assert!(
            at("log.000010", 4).reached(&p),
            "numbered, not compared as text"
        );
        assert!(at("log.1000000", 4).reached(&at("log.999999", 900)));
        assert!(!at("log.000008", 9_999).reached(&p));
    }
}
