//! The crate's one error type.

use std::fmt;

/// What can go wrong in the outbox.
///
/// Source errors are kept: walk [`std::error::Error::source`] for the driver's own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message was refused by [`Message::validate`](crate::Message::validate); nothing
    /// was written.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// Settings, a table name or an instance id were refused at construction.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The database refused a statement or the connection was lost.
    #[error("database error: {0}")]
    Database(#[from] mysql::Error),

    /// No connection came free in the pool in time: the application may be holding them
    /// all. The worker tries again at its next tick.
    #[error("no database connection came free in the pool within {waited:?}")]
    PoolExhausted {
        /// How long the worker waited.
        waited: std::time::Duration,
    },

    /// A row in the outbox table could not be decoded (for example, headers edited by hand).
    #[error("row {id} of the outbox table is corrupt: {reason}")]
    CorruptRow {
        /// The row's `id` column.
        id: u64,
        /// What was wrong with it.
        reason: String,
    },

    /// Kafka refused a message, or could not be reached before the delivery timeout.
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// The broker did not send a record at all: an earlier failure in its batch held it
    /// back (one of its key, or one that stopped the producer). Its row is released
    /// without counting an attempt.
    #[error("not sent: {0}")]
    NotSent(String),

    /// A custom [`Broker`](crate::Broker) failed.
    #[error("broker error: {0}")]
    Broker(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A value could not be encoded as JSON.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),

    /// An [`OutboxTransaction`](crate::OutboxTransaction) was committed after writing some
    /// of its messages had failed (the failed `add` returned that error): it was rolled
    /// back instead, so that no message added before is silently missing.
    #[error("transaction rolled back at commit: writing its messages had failed")]
    RolledBack,

    /// An [`Admin`](crate::admin::Admin) operation named messages that are not in the
    /// table, or not in the state it works on; nothing was changed.
    #[error("refused: {0}")]
    Refused(String),

    /// An inbox consumer's handler failed on a record (or panicked); the record is tried
    /// again, and goes to the dead table after `max_attempts`.
    #[error("handler failed: {0}")]
    Handler(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A dispatcher thread could not be started.
    #[error("could not start a dispatcher thread: {0}")]
    Thread(#[source] std::io::Error),

    /// A dispatcher thread panicked; the dispatcher should be stopped and restarted. A
    /// relay whose publisher or settler died claims nothing more and releases its leases.
    #[error("dispatcher worker {0} panicked: {1}")]
    WorkerPanicked(Worker, String),

    /// [`DispatcherHandle::stop_timeout`](crate::DispatcherHandle::stop_timeout) returned
    /// before every thread had ended; they end by themselves, and a later `stop` joins them.
    #[error("the dispatcher's threads had not ended after {waited:?}")]
    StopTimedOut {
        /// How long the stop waited.
        waited: std::time::Duration,
    },
}

impl Error {
    /// True when trying the same call again later may succeed (a lost connection, a
    /// deadlock, an unreachable broker); false for bad input and bad settings.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_database(e),
            Error::Kafka(_)
            | Error::NotSent(_)
            | Error::Broker(_)
            | Error::Handler(_)
            | Error::PoolExhausted { .. }
            | Error::Thread(_)
            | Error::StopTimedOut { .. }
            | Error::WorkerPanicked(..) => true,
            Error::InvalidMessage(_)
            | Error::Config(_)
            | Error::CorruptRow { .. }
            | Error::RolledBack
            | Error::Refused(_)
            | Error::Json(_) => false,
        }
    }

    pub(crate) fn config(reason: impl Into<String>) -> Error {
        Error::Config(reason.into())
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Error {
        Error::InvalidMessage(reason.into())
    }
}

/// Server errors that pass: too many connections (1040), server shutting down (1053),
/// lock wait timeout (1205), deadlock (1213), query interrupted (1317), connection
/// killed (1927), disconnected for inactivity (4031).
const TRANSIENT_SERVER_ERRORS: [u16; 7] = [1040, 1053, 1205, 1213, 1317, 1927, 4031];

/// Whether a database error passes: a lost connection, or one of
/// [`TRANSIENT_SERVER_ERRORS`].
pub(crate) fn is_transient_database(error: &mysql::Error) -> bool {
    match error {
        mysql::Error::MySqlError(e) => TRANSIENT_SERVER_ERRORS.contains(&e.code),
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) | mysql::Error::DriverError(_) => {
            true
        }
        _ => false,
    }
}

/// The dispatcher's worker threads, as named in errors and thread names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Worker {
    /// Claims messages, and drives the publisher and the settler.
    Relay,
    /// Publishes the relay's batches to the broker.
    Publisher,
    /// Marks each published row by its delivery outcome.
    Settler,
    /// Releases leases older than `max_lock_duration`.
    LockChecker,
    /// Deletes delivered (and, if set, dead) rows past their retention; for an inbox,
    /// processed ids past theirs.
    Cleaner,
    /// Refreshes the gauges of the table's backlog, when `gauge_interval` is set.
    Gauges,
    /// Reads the server's binary log for the [`BinlogRelay`](crate::binlog::BinlogRelay).
    BinlogReader,
    /// Handles the records of an [`InboxConsumer`](crate::inbox::InboxConsumer).
    Consumer,
}

impl fmt::Display for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Worker::Relay => "relay",
            Worker::Publisher => "publisher",
            Worker::Settler => "settler",
            Worker::LockChecker => "lock-checker",
            Worker::Cleaner => "cleaner",
            Worker::Gauges => "gauges",
            Worker::BinlogReader => "binlog-reader",
            Worker::Consumer => "consumer",
        })
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_not_retryable_but_lost_connections_are() {
        assert!(!Error::invalid("x").is_retryable());
        assert!(!Error::config("x").is_retryable());
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(Error::Database(mysql::Error::IoError(io)).is_retryable());
    }

    #[test]
    fn source_is_kept() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let err = Error::Database(mysql::Error::IoError(io));
        assert!(err.source().is_some());
    }
}
