//! The table's named lock: one active binlog relay per table, the others wait as
//! standbys on the same lock.

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

use super::fence::Fence;
use super::worker::Tail;
use crate::error::Result;
use crate::store::sql::fnv1a;

impl Tail {
    fn lock_name(&self) -> String {
        let name = format!(
            "outbox-binlog:{}.{}",
            self.server.database,
            self.store.table()
        );
        if name.len() <= 64 {
            return name;
        }
        // A hash that is the same from every relay, whatever its build.
        let digest = fnv1a(name.as_bytes());
        format!("outbox-binlog:{digest:016x}")
    }

    /// A connection of its own that holds the table's named lock, and the fence of that
    /// lock; `None` on the stop signal. A standby waits here.
    pub(super) fn acquire(&self) -> Result<Option<(Conn, Fence)>> {
        let timeout = self.binlog.lock_timeout;
        // A server gone quiet fails a statement, a connection attempt included, instead
        // of holding the relay for ever: a GET_LOCK waits `lock_wait` on the server.
        let answer_within = timeout.max(self.binlog.lock_wait + Duration::from_secs(5));
        let opts = OptsBuilder::from_opts(self.opts.clone())
            .tcp_keepalive_time_ms(Some(10_000))
            .tcp_connect_timeout(Some(timeout))
            .read_timeout(Some(answer_within))
            .write_timeout(Some(answer_within));
        let mut conn = Conn::new(opts)?;
        // The lock lives as long as this connection, and the server closes it after this
        // long without a statement: the active relay pings it well within (see `fence`),
        // and a relay cut off from the server loses the lock after this long.
        let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        conn.query_drop(format!("SET SESSION wait_timeout = {seconds}"))?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")?;
        // The relay's own writes need no more in the binary log than each row's key and
        // what changed: in full, every mark would log its row's payload twice, for the
        // server to write and send and the reader to read back and skip. The reader needs
        // full images only of inserts and of other sessions' updates.
        if let Err(e) = conn.query_drop("SET SESSION binlog_row_image = 'MINIMAL'") {
            log::info!(
                "binlog relay {}: its marks are logged in full rows, as the user may not \
                 set binlog_row_image for its session ({e})",
                self.owner
            );
        }
        let name = self.lock_name();
        let wait = self.binlog.lock_wait.as_secs_f64();
        let mut told = false;
        loop {
            let sent = Instant::now();
            let got: Option<Option<i64>> =
                conn.exec_first("SELECT GET_LOCK(?, ?)", (&name, wait))?;
            if got.flatten() == Some(1) {
                log::info!(
                    "binlog relay {} is the active relay of {} (it stops publishing when it \
                     has not heard from the server for {:?})",
                    self.owner,
                    name,
                    timeout - timeout / 4
                );
                return Ok(Some((conn, Fence::new(timeout, sent))));
            }
            if !told {
                log::info!(
                    "binlog relay {} waits as a standby: another holds {name}",
                    self.owner
                );
                told = true;
            }
            if self.signals.stopped() {
                return Ok(None);
            }
        }
    }
}

/// A statement that does nothing, on the lock's connection: the server hears from the
/// relay, and its answer proves the lock is still held.
pub(super) fn ping(lock: &mut Conn) -> Result<()> {
    Ok(lock.query_drop("DO 1")?)
}
