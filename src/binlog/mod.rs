//! The binlog relay: publishes outbox rows as they commit, read from the server's own
//! binary log instead of polled from the table.
//!
//! A [`BinlogRelay`] reads the binary log as a replica does and publishes each pending row
//! inserted into the outbox table in commit order, the moment its transaction commits:
//! no polling query while nothing is committed, and one bulk mark per batch instead of
//! a claim and a mark. It needs a server with `log_bin` on, `binlog_format = ROW`,
//! `binlog_row_image = FULL` (a session that sets MINIMAL or NOBLOB for itself is
//! handled: each row it logs without every column is read from the table by its id,
//! which costs a query per row), its binary log uncompressed (MySQL's
//! `binlog_transaction_compression` and MariaDB's `log_bin_compress` off), and a user
//! with REPLICATION SLAVE and REPLICATION CLIENT;
//! [`BinlogRelay::start`] checks each and refuses with an [`Error::Config`] that says how
//! to fix it.
//!
//! - **One active relay per table.** The relay holds a named lock (`GET_LOCK`) on a
//!   connection of its own; others wait as standbys and take over when the server
//!   releases it, which it does when that connection dies. Every write of the relay (its
//!   marks and its position) goes through that connection, so a relay that lost the
//!   lock changes nothing.
//! - **Position.** After a batch is acknowledged by the broker, its rows are marked
//!   delivered; the position after the last whole transaction published is saved in
//!   `outbox_binlog_position` after those marks, in a write of its own, at most every
//!   second. A restart resumes from the saved position: the rows it reads again that
//!   were marked since are looked up and not sent again, so what is sent again is at
//!   most what was in flight.
//! - **No position, or one the server purged:** the relay first publishes what is
//!   pending with the polling relay's claim, then reads the binary log from a position
//!   taken before that catch-up began, skipping the rows the catch-up delivered.
//! - **Failures** hold back the failed message's own key only: its later messages wait
//!   behind it (in memory, and past a bound in the table, read back in order), and
//!   everything else goes on. It is tried again after its backoff; at `max_attempts` it
//!   is marked dead and its key goes on (with `dead_blocks_key` the key's later rows stay
//!   pending until an operator replays or discards the dead one, which the relay sees in
//!   the binary log). While a row is held, the saved position stays before it, so that a
//!   restart reads it again (and takes its attempts from the table).
//! - **Safety net.** A row still pending [`BinlogSettings::sweep_after`] after it was
//!   added, once the relay read the binary log past its commit, was passed over,
//!   whatever the cause: a sweep of the table publishes it, warns naming it, and counts
//!   it. Nothing stays pending for good because an event was missed.
//! - **Failover.** The server keeps the lock for [`BinlogSettings::lock_timeout`] after
//!   it last heard from the active relay, which pings it at a quarter of that; a relay
//!   cut off from the server publishes nothing once it could have lost the lock, and a
//!   standby takes over within about the timeout and [`BinlogSettings::lock_wait`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::binlog::{BinlogRelay, BinlogSettings};
//! use outbox::{DispatcherSettings, KafkaBroker};
//!
//! let database = mysql::Opts::from_url("mysql://relay:secret@127.0.0.1:3306/shop")?;
//! let broker = KafkaBroker::new("127.0.0.1:9092")?;
//! let relay = BinlogRelay::new(database, "outbox", broker, DispatcherSettings::default(),
//!     BinlogSettings::default(), "billing-1")?;
//! let mut handle = relay.start()?;
//! // ... errors arrive on handle.errors() ...
//! handle.stop()?;
//! # Ok(()) }
//! ```

mod ahead;
mod change;
mod delayed;
mod events;
mod fence;
mod follow;
mod hold;
mod image;
mod lock;
mod position;
mod publish;
mod revive;
mod schedule;
mod server;
mod settle;
mod start;
mod sweep;
mod tail;
mod worker;

use std::sync::Arc;
use std::time::Duration;

pub use self::position::{Position, POSITION_TABLE};
use crate::broker::Broker;
use crate::dispatcher::lease_owner;
use crate::error::{Error, Result, Worker};
use crate::metrics::Meter;
use crate::runtime::DispatcherHandle;
use crate::settings::DispatcherSettings;
use crate::store::MySqlStore;

/// How long a statement of the relay's pool may wait for the server, when the database
/// options set no read or write timeout of their own.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// What only the binlog relay needs; [`DispatcherSettings`] holds the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogSettings {
    /// The server id the relay reads the binary log under, as a replica would: unique
    /// among the server's replicas and readers. Defaults to a random id from
    /// 1,000,000,000 up.
    pub server_id: u32,
    /// How often the server sends a heartbeat when it has nothing to send; a reader that
    /// hears nothing for four of them reconnects. Defaults to 1 s.
    pub heartbeat: Duration,
    /// How long a standby waits on the lock before looking at the stop signal again.
    /// Defaults to 1 s.
    pub lock_wait: Duration,
    /// How long the server keeps the table's lock for an active relay it hears nothing
    /// from (its `wait_timeout` on the lock's connection, which the relay pings at a
    /// quarter of it): a relay cut off from the server, or on a host gone dark, is
    /// replaced by a standby within about this and `lock_wait`. It stops publishing a
    /// quarter of this before the server could let the lock go, and starts no publish
    /// after; one begun before may finish later (within the broker's delivery timeout).
    /// 2 s to 1 h; defaults to 10 s.
    pub lock_timeout: Duration,
    /// The safety net: a row still pending this long after it was added, and after the
    /// relay read the binary log past its commit, was passed over (whatever the cause):
    /// a sweep of the table, every this long while the relay is idle, publishes it with
    /// a warning naming it, and counts it in `outbox_binlog_rows_swept_total`. 1 s to
    /// 1 day; defaults to 30 s.
    pub sweep_after: Duration,
    /// How long a batch of a few rows waits, from its first row, for more before it is
    /// published. Zero (the default) publishes each commit as it is read, about a
    /// millisecond after it; under a stream of commits from a busy service, a few
    /// milliseconds here turn many small produce requests and marks into a few larger
    /// ones, which costs the broker and the database less, each message later by up to
    /// this. At most 1 s.
    pub linger: Duration,
}

impl Default for BinlogSettings {
    fn default() -> Self {
        let random = uuid::Uuid::now_v7().as_u128() as u32;
        BinlogSettings {
            server_id: 1_000_000_000 + random % 1_000_000_000,
            heartbeat: Duration::from_secs(1),
            lock_wait: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(10),
            sweep_after: Duration::from_secs(30),
            linger: Duration::ZERO,
        }
    }
}

impl BinlogSettings {
    fn validate(&self) -> Result<()> {
        if self.server_id == 0 {
            return Err(Error::config("server_id must not be 0"));
        }
        for (name, value) in [("heartbeat", self.heartbeat), ("lock_wait", self.lock_wait)] {
            if value < Duration::from_millis(1) || value > Duration::from_secs(3600) {
                return Err(Error::config(format!("{name} must be 1 ms to 1 h")));
            }
        }
        if self.lock_timeout < Duration::from_secs(2)
            || self.lock_timeout > Duration::from_secs(3600)
        {
            return Err(Error::config("lock_timeout must be 2 s to 1 h"));
        }
        if self.sweep_after < Duration::from_secs(1)
            || self.sweep_after > Duration::from_secs(24 * 3600)
        {
            return Err(Error::config("sweep_after must be 1 s to 1 day"));
        }
        if self.linger > Duration::from_secs(1) {
            return Err(Error::config("linger must be at most 1 s"));
        }
        Ok(())
    }
}

/// Relays an outbox table's rows to a broker from the server's binary log; see the
/// [module](self). Runs, like a [`Dispatcher`](crate::Dispatcher), the lock checker and
/// the cleaner beside it, and returns the same kind of handle.
pub struct BinlogRelay<B> {
    opts: mysql::Opts,
    store: MySqlStore,
    broker: B,
    settings: DispatcherSettings,
    binlog: BinlogSettings,
    owner: String,
}

impl<B: Broker> BinlogRelay<B> {
    /// A relay of `table` in the database `database` names, called `instance_id` (as a
    /// dispatcher's). Its pool's statements wait at most 60 s for the server when
    /// `database` sets no read or write timeout of its own.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for invalid settings, table name or instance id;
    /// [`Error::Database`] for a database URL the pool refuses.
    pub fn new(
        database: mysql::Opts,
        table: &str,
        broker: B,
        settings: DispatcherSettings,
        binlog: BinlogSettings,
        instance_id: &str,
    ) -> Result<BinlogRelay<B>> {
        settings.validate(broker.delivery_timeout())?;
        binlog.validate()?;
        let owner = lease_owner(instance_id)?;
        // A server cut off mid-statement fails the statement instead of holding a worker
        // (and the stop that joins it) for ever.
        let bounded = mysql::OptsBuilder::from_opts(database.clone())
            .read_timeout(
                database
                    .get_read_timeout()
                    .copied()
                    .or(Some(STATEMENT_TIMEOUT)),
            )
            .write_timeout(
                database
                    .get_write_timeout()
                    .copied()
                    .or(Some(STATEMENT_TIMEOUT)),
            );
        let store = MySqlStore::with_table(mysql::Pool::new(bounded)?, table)?;
        Ok(BinlogRelay {
            opts: database,
            store,
            broker,
            settings,
            binlog,
            owner,
        })
    }

    /// Checks the server's settings and the user's privileges, creates the position
    /// table if needed, and starts the relay's threads.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming a server setting or privilege missing; a database error
    /// when the server cannot be reached; [`Error::Thread`] if a thread is refused.
    pub fn start(self) -> Result<DispatcherHandle> {
        let mut conn = self.store.pool().get_conn()?;
        let server = server::check(&mut conn)?;
        position::migrate(&mut conn)?;
        drop(conn);
        let (mut handle, signals, _wake) =
            DispatcherHandle::prepare("binlog relay", self.owner.clone());
        handle.relay_threads(&[Worker::BinlogReader, Worker::Settler]);
        log::info!("binlog relay {} starting", self.owner);
        let store = Arc::new(self.store);
        let meter = Meter::new(&self.owner);
        let tail = worker::Tail {
            opts: self.opts,
            server,
            store: store.clone(),
            settings: self.settings.clone(),
            binlog: self.binlog,
            owner: self.owner,
            signals: signals.clone(),
            meter: meter.clone(),
        };
        let broker = self.broker;
        handle.spawn(Worker::Relay, &signals, move || tail.run(broker))?;
        handle.spawn_maintenance(store, &self.settings, &signals, &meter)?;
        Ok(handle)
    }
}
