//! What the binlog relay needs from the server, checked before it starts, and where the
//! server's binary log stands.

use mysql::prelude::Queryable;

use super::Position;
use crate::error::{Error, Result};

/// The server the relay reads, as found by [`check`].
#[derive(Debug, Clone)]
pub(crate) struct Server {
    /// MariaDB (whose binlog has events of its own) rather than MySQL.
    pub mariadb: bool,
    /// The database the outbox table is in.
    pub database: String,
    /// The server's `server_id`, which a saved position belongs to.
    pub server_id: u32,
}

/// Checks every setting and privilege a binlog reader needs; [`Error::Config`] naming the
/// first one missing and how to set it.
pub(crate) fn check(conn: &mut impl Queryable) -> Result<Server> {
    let (version, database): (String, Option<String>) = conn
        .query_first("SELECT VERSION(), DATABASE()")?
        .unwrap_or_default();
    let database = database.ok_or_else(|| {
        Error::config(
            "the database URL names no database: the binlog relay needs one (mysql://…/db)",
        )
    })?;
    let mariadb = version.contains("MariaDB");
    let (log_bin, format, image, server_id): (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<u32>,
    ) = conn
        .query_first(
            "SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image, \
             @@GLOBAL.server_id",
        )?
        .unwrap_or_default();
    if !matches!(log_bin.as_deref(), Some("1" | "ON")) {
        return Err(Error::config(
            "log_bin is OFF: the server writes no binary log. Start it with --log-bin \
             (log_bin = mysql-bin under [mysqld] in its configuration) and restart it",
        ));
    }
    if !format
        .as_deref()
        .is_some_and(|f| f.eq_ignore_ascii_case("ROW"))
    {
        return Err(Error::config(format!(
            "binlog_format is {}, not ROW: the binlog relay reads rows, which only ROW logs \
             for every statement. Run SET GLOBAL binlog_format = 'ROW' and set \
             binlog_format = ROW under [mysqld] so that it survives a restart",
            format.as_deref().unwrap_or("unset")
        )));
    }
    if !image
        .as_deref()
        .is_some_and(|i| i.eq_ignore_ascii_case("FULL"))
    {
        return Err(Error::config(format!(
            "binlog_row_image is {}, not FULL: the relay would read every row again from \
             the table, a query each, as it does for a session that sets it for itself. Run \
             SET GLOBAL binlog_row_image = 'FULL' and set binlog_row_image = FULL under \
             [mysqld]",
            image.as_deref().unwrap_or("unset")
        )));
    }
    // MySQL compresses whole transactions, MariaDB single events: neither is read here.
    let compression = if mariadb {
        "log_bin_compress"
    } else {
        "binlog_transaction_compression"
    };
    let compressed: Option<String> = conn
        .query_first(format!("SELECT @@GLOBAL.{compression}"))
        .unwrap_or(None);
    if matches!(compressed.as_deref(), Some("1" | "ON")) {
        return Err(Error::config(format!(
            "{compression} is ON: the binlog relay does not read compressed binary logs. \
             Run SET GLOBAL {compression} = OFF and set {compression} = OFF under [mysqld]"
        )));
    }
    if !mariadb {
        // MariaDB always makes commits visible in the order of its binary log.
        let ordered: Option<String> = conn
            .query_first("SELECT @@GLOBAL.binlog_order_commits")
            .unwrap_or(None);
        if matches!(ordered.as_deref(), Some("0" | "OFF")) {
            return Err(Error::config(
                "binlog_order_commits is OFF: transactions may then become visible in another \
                 order than the binary log's, and a relay catching up from the table could miss \
                 one the log holds before where it starts. Run SET GLOBAL binlog_order_commits \
                 = ON and set binlog_order_commits = ON under [mysqld]",
            ));
        }
    }
    check_grants(conn)?;
    Ok(Server {
        mariadb,
        database,
        server_id: server_id.unwrap_or(0),
    })
}

/// REPLICATION SLAVE (to read the binlog) and REPLICATION CLIENT (to ask where it
/// stands; MariaDB 10.5+ calls it BINLOG MONITOR), directly or through ALL PRIVILEGES.
/// Grants that come through a role are not followed: then only the second is checked,
/// by asking.
fn check_grants(conn: &mut impl Queryable) -> Result<()> {
    let grants: Vec<String> = conn.query("SHOW GRANTS FOR CURRENT_USER()")?;
    let (user, roles) = grants.iter().fold((false, false), |(all, role), grant| {
        let upper = grant.to_ascii_uppercase();
        (
            all || (upper.contains("ON *.*")
                && (upper.contains("ALL PRIVILEGES") || upper.contains("REPLICATION SLAVE"))),
            role || !upper.contains(" ON "),
        )
    });
    let fix = |privilege: &str| {
        Error::config(format!(
            "the database user lacks {privilege}: the binlog relay reads the binary log as a \
             replica does. Run GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO the \
             relay's user"
        ))
    };
    if !user && !roles {
        return Err(fix("REPLICATION SLAVE"));
    }
    match conn.query_drop("SHOW BINARY LOGS") {
        Err(mysql::Error::MySqlError(e)) if e.code == 1227 => {
            Err(fix("REPLICATION CLIENT (BINLOG MONITOR on MariaDB)"))
        }
        other => Ok(other?),
    }
}

/// Where the server's binary log ends now: the position a reader starting now begins at.
pub(crate) fn current(conn: &mut impl Queryable) -> Result<Position> {
    // MySQL 8.4 renamed the statement; MariaDB and older MySQL know the first name.
    let row: Option<mysql::Row> = match conn.query_first("SHOW MASTER STATUS") {
        Err(mysql::Error::MySqlError(e)) if e.code == 1064 => {
            conn.query_first("SHOW BINARY LOG STATUS")?
        }
        other => other?,
    };
    let row = row.ok_or_else(|| Error::config("SHOW MASTER STATUS is empty: log_bin is OFF"))?;
    let file: Option<String> = row.get(0);
    let offset: Option<u64> = row.get(1);
    match (file, offset) {
        (Some(file), Some(offset)) => Ok(Position { file, offset }),
        _ => Err(Error::config(
            "SHOW MASTER STATUS gave no file and position",
        )),
    }
}

/// The binary log files the server still has, oldest first.
pub(crate) fn files(conn: &mut impl Queryable) -> Result<Vec<String>> {
    let rows: Vec<mysql::Row> = conn.query("SHOW BINARY LOGS")?;
    Ok(rows.into_iter().filter_map(|row| row.get(0)).collect())
}
