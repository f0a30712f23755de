//! What the binlog reader hands the relay: one change after another, in the order of the
//! binary log.

use std::time::SystemTime;

use super::position::Position;
use crate::record::Record;

/// One thing the relay acts on, in the order of the binary log.
#[derive(Debug)]
pub(crate) enum Change {
    /// A pending row inserted into the outbox table.
    Inserted(Record),
    /// A pending row inserted as a delayed message, due at `due` (the database's clock):
    /// published from the table then, and its key (`key`, if it has one) waits for it.
    Scheduled {
        id: u64,
        key: Option<(String, Vec<u8>)>,
        due: SystemTime,
    },
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
