//! A few pooled connections the store keeps between calls.
//!
//! Taking a connection from a `mysql::Pool` pings it, and giving it back resets it,
//! which also drops its prepared statements: four round trips around every statement.
//! The dispatcher's workers run the same few statements all the time, so the store
//! keeps its connections instead, with their statement caches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
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
    idle: Mutex<Vec<Kept>>,
    /// The `wait_timeout` in seconds given to every connection taken (0: the server's).
    idle_limit: AtomicU64,
}

impl Connections {
    pub fn new(pool: Pool) -> Connections {
        Connections {
            pool,
            idle: Mutex::new(Vec::new()),
            idle_limit: AtomicU64::new(0),
        }
    }

    /// Has the server end every connection taken from now on once it has received
    /// nothing for `limit` (at least a second; the shortest of all limits asked for), so
    /// that a transaction left open by a cut link holds its locks no longer than that.
    pub fn end_idle_after(&self, limit: Duration) {
        let seconds = limit.as_secs_f64().ceil().max(1.0) as u64;
        let _ = self
            .idle_limit
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now == 0 || seconds < now).then_some(seconds)
            });
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
        let limit = self.idle_limit.load(Ordering::SeqCst);
        let kept = self.idle.lock().pop().filter(|kept| kept.fits(limit));
        let was_kept = kept.is_some();
        let mut kept = match kept {
            Some(kept) => kept,
            None => self.take(limit)?,
        };
        match work(&mut kept.conn) {
            Ok(value) => {
                self.keep(kept);
                Ok(value)
            }
            Err(e) if was_kept && is_connection_lost(&e) => {
                drop(kept);
                let mut kept = self.take(limit)?;
                let value = work(&mut kept.conn)?;
                self.keep(kept);
                Ok(value)
            }
            Err(e) => Err(e),
        }
    }

    /// A connection from the pool, waiting at most [`POOL_WAIT`]: a worker never blocks
    /// for good on a pool the application has exhausted. With an idle `limit`, the
    /// connection carries it as its `wait_timeout`, and is reset when given back, so
    /// that the application's connections keep the server's.
    fn take(&self, limit: u64) -> Result<Kept> {
        let mut conn = match self.pool.try_get_conn(POOL_WAIT) {
            Ok(conn) => conn,
            Err(mysql::Error::DriverError(mysql::DriverError::Timeout)) => {
                return Err(Error::PoolExhausted { waited: POOL_WAIT })
            }
            Err(e) => return Err(e.into()),
        };
        if limit > 0 {
            conn.reset_connection(true);
            conn.query_drop(format!("SET SESSION wait_timeout = {limit}"))?;
        }
        Ok(Kept {
            conn,
            limit,
            since: Instant::now(),
        })
    }

    fn keep(&self, mut kept: Kept) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            kept.since = Instant::now();
            idle.push(kept);
        }
    }
}

/// A connection the store keeps, with the idle limit it carries.
struct Kept {
    conn: PooledConn,
    /// Its `wait_timeout` as set by the store (0: the server's).
    limit: u64,
    /// When it was last given back.
    since: Instant,
}

impl Kept {
    /// True if it carries the idle `limit` asked for now, and has been idle for less
    /// than half of it: well before the server would end it.
    fn fits(&self, limit: u64) -> bool {
        self.limit == limit && (limit == 0 || self.since.elapsed() < Duration::from_secs(limit) / 2)
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
