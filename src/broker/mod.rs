//! Where messages go: the broker seam, and the Kafka implementation.

mod kafka;
mod properties;
mod reports;
#[cfg(feature = "opentelemetry")]
mod spans;

use std::time::Duration;

pub use self::kafka::KafkaBroker;
pub(crate) use self::properties::{resolves, secret_values};
pub use self::properties::{ALLOW_WEAK_DELIVERY, RECORD_TIMESTAMP, STRICT_KEY_ORDER};
pub(crate) use self::reports::{forward_log, redact};
use crate::error::Result;
use crate::record::Record;

/// A message broker the dispatcher publishes to.
///
/// The relay calls [`publish`](Broker::publish) from one thread, one batch at a time.
pub trait Broker: Send + 'static {
    /// Publishes every record and waits for the outcome of each: the result at index `i`
    /// is the outcome of `records[i]`. `Ok` means the broker acknowledged that record
    /// durably; only then is its row marked delivered.
    ///
    /// Records come in id order, and a batch may hold a run of several records of one
    /// topic and key: publish those in that order (Kafka keeps the order of a key within
    /// its partition), and once one of them fails, fail the later ones of that key
    /// without sending them. Records of different keys may go out in any order, or all
    /// at once. A record not sent at all should be reported as
    /// [`Error::NotSent`](crate::Error::NotSent): its row is then released without
    /// counting an attempt.
    ///
    /// Must return within [`delivery_timeout`](Broker::delivery_timeout) (a little more
    /// is tolerated), and must return exactly one result per record; a missing result
    /// counts as a failure.
    fn publish(&mut self, records: &[Record]) -> Vec<Result<()>>;

    /// The longest [`publish`](Broker::publish) may take. The dispatcher refuses a
    /// `max_lock_duration` that does not leave room for it.
    fn delivery_timeout(&self) -> Duration;
}
