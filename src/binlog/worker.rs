//! What every job of the binlog relay's worker shares: the worker itself, and what one
//! session keeps between changes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ahead::Ahead;
use super::fence::Fence;
use super::hold::Held;
use super::position::Position;
use super::schedule::Schedule;
use super::server::Server;
use super::BinlogSettings;
use crate::metrics::Meter;
use crate::record::Record;
use crate::runtime::signal::Signals;
use crate::settings::DispatcherSettings;
use crate::store::MySqlStore;

pub(super) use super::hold::Key;

/// The binlog relay's worker, on the thread that publishes: what every session needs.
pub(crate) struct Tail {
    pub opts: mysql::Opts,
    pub server: Server,
    pub store: Arc<MySqlStore>,
    pub settings: DispatcherSettings,
    pub binlog: BinlogSettings,
    pub owner: String,
    pub signals: Signals,
    pub meter: Meter,
}

/// What one session keeps between changes.
pub(super) struct Session {
    /// The settler's queue: every write goes through it, to the lock's connection.
    pub settler: crossbeam_channel::Sender<Settle>,
    /// Rows read and not yet published, in commit order.
    pub batch: Vec<Record>,
    /// The end of the last whole transaction read, and its GTID, not yet saved.
    pub commit: Option<(Position, Option<String>)>,
    /// Whether a transaction since the last save changed anything but the relay's own rows.
    pub foreign: bool,
    pub last_save: Instant,
    /// Rows up to this id may have been settled before this session read them (see
    /// `settled_high` in `start`): their state is read before they are sent.
    pub verify_below: u64,
    /// Keys held behind a dead message.
    pub blocked: HashSet<Key>,
    /// Rows a revive published before the binary log brought their events.
    pub ahead: Ahead,
    /// Rows held behind a failed publish, until their backoff ends.
    pub held: Held,
    /// Delayed rows not published yet, and the keys they hold back.
    pub schedule: Schedule,
    /// The database's clock ahead of this host's, in microseconds, read at the start.
    pub clock_offset: i64,
    /// The end of the last transaction read: where the next one starts.
    pub read_through: Position,
    /// Where the transaction of the batch's first row starts.
    pub batch_pin: Option<Position>,
    /// When the batch's first row was read from the log.
    pub batch_since: Instant,
    /// The safety net's last look.
    pub sweep: Sweep,
    /// Until when the session may publish: it holds the table's lock until then.
    pub fence: Arc<Fence>,
}

/// What the settler writes, in the order the tail sends it, on the connection that
/// holds the lock.
pub(super) enum Settle {
    /// Rows acknowledged by the broker, to mark delivered, and the position after the
    /// last whole transaction published, to save with them.
    Delivered {
        ids: Vec<u64>,
        commit: Option<(Position, Option<String>)>,
    },
    /// Failed sends: the attempt counted, the error, dead at `max_attempts`.
    Failed(Vec<(Record, String, bool)>),
    /// A position only other tables' transactions moved.
    Position(Position, Option<String>),
    /// Rows that are no message, to make dead with the reason.
    Bury(Vec<(u64, String)>),
}

/// What the sweep noted at its last look, waiting for the relay to read past `end`.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    /// When to look next.
    pub next: Option<Instant>,
    /// The rows noted, and where the binary log ended when they were.
    pub noted: Option<(Vec<u64>, Position)>,
}

impl Sweep {
    /// How long until the next look is due, from `now`.
    pub fn due_in(&self, now: Instant, every: Duration) -> Duration {
        match self.next {
            Some(next) => next.saturating_duration_since(now),
            None => every,
        }
    }
}
