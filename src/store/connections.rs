//! A few pooled connections the store keeps between calls.
//!
//! Taking a connection from a `mysql::Pool` pings it, and giving it back resets it,
//! which also drops its prepared statements: four round trips around every statement.
//! The dispatcher's workers run the same few statements all the time, so the store
//! keeps its connections instead, with their statement caches.

use std::time::Duration;

use mysql::{Pool, PooledConn};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Connections kept at most: one per dispatcher thread that uses the database (relay,
/// settler, lock checker, cleaner), and one spare.
const MAX_IDLE: usize = 5;
/// How long a worker waits for a free connection when the pool is exhausted.
pub(crate) const POOL_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct Connections {
    pool: Pool,
    idle: Mutex<Vec<PooledConn>>,
}

impl Connections {
    pub fn new(pool: Pool) -> Connections {
        Connections {
            pool,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `work` on a kept connection, or a new one from the pool. A connection that
    /// failed is given back to the pool, which discards it if it is broken. When a kept
    /// connection turns out to be dead (the server restarted, or closed it as idle),
    /// `work` runs once more on a new one: every caller's work is a whole transaction or
    /// one statement, so running it again is safe.
    pub fn with<T>(&self, mut work: impl FnMut(&mut PooledConn) -> Result<T>) -> Result<T> {
        let kept = self.idle.lock().pop();
        let was_kept = kept.is_some();
        let mut conn = match kept {
            Some(conn) => conn,
            None => self.take()?,
        };
        match work(&mut conn) {
            Ok(value) => {
                self.keep(conn);
                Ok(value)
            }
            Err(e) if was_kept && is_connection_lost(&e) => {
                drop(conn);
                let mut conn = self.take()?;
                let value = work(&mut conn)?;
                self.keep(conn);
                Ok(value)
            }
            Err(e) => Err(e),
        }
    }

    /// A connection from the pool, waiting at most [`POOL_WAIT`]: a worker never blocks
    /// for good on a pool the application has exhausted.
    fn take(&self) -> Result<PooledConn> {
        match self.pool.try_get_conn(POOL_WAIT) {
            Ok(conn) => Ok(conn),
            Err(mysql::Error::DriverError(mysql::DriverError::Timeout)) => {
                Err(Error::PoolExhausted { waited: POOL_WAIT })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn keep(&self, conn: PooledConn) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

/// True for errors that mean the connection itself is gone: a broken socket, or the
/// server saying it closed the session (MariaDB 1927 "connection killed", MySQL 4031
/// "disconnected for inactivity").
fn is_connection_lost(error: &Error) -> bool {
    match error {
        Error::Database(
            mysql::Error::IoError(_) | mysql::Error::CodecError(_) | mysql::Error::DriverError(_),
        ) => true,
        Error::Database(mysql::Error::MySqlError(e)) => matches!(e.code, 1927 | 4031),
        _ => false,
    }
}
