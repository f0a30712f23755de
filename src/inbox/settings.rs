//! How an inbox consumer retries, gives up and keeps its table.

use std::time::Duration;

use crate::error::{Error, Result};

/// Largest accepted `batch_size`.
pub const MAX_INBOX_BATCH: usize = 10_000;

/// The inbox consumer's settings. Build from [`Default`] and change what you need:
///
/// ```
/// let settings = outbox::inbox::InboxSettings {
///     max_attempts: 3,
///     ..Default::default()
/// };
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxSettings {
    /// Most records applied in one transaction: those already received when the first
    /// arrives, up to this many. One commit for many records is what makes a consumer
    /// fast; when the handler fails on one of them, the transaction is rolled back and
    /// the records are applied again, the failed one alone (so a handler may run again
    /// for a record whose first run was rolled back). 1 gives a transaction per record.
    /// Defaults to 100.
    pub batch_size: usize,
    /// Times the handler is called for one record before the record goes to the dead
    /// table and its partition moves on. Defaults to 5.
    pub max_attempts: u32,
    /// Least wait before a record whose handler failed is tried again; each further
    /// failure doubles it (with jitter), up to `backoff_max`. Defaults to 100 ms.
    pub backoff_min: Duration,
    /// Longest wait between two attempts. The consumer does not poll Kafka while it
    /// waits, so the sum of the waits must stay well under the consumer's
    /// `max.poll.interval.ms` (5 min by default), or the group takes its partitions away.
    /// Defaults to 5 s.
    pub backoff_max: Duration,
    /// How long a processed message id is kept: a duplicate that arrives later is applied
    /// again. Make it longer than any redelivery can come late (a consumer down that
    /// long, a replayed outbox). Defaults to 7 days.
    pub retention: Duration,
    /// How often the cleaner deletes processed ids past `retention`. Defaults to 60 s.
    pub cleanup_interval: Duration,
    /// Most ids the cleaner deletes in one statement. Defaults to 1,000.
    pub cleanup_batch_size: usize,
    /// How often the consumer looks for dead records an operator asked to replay
    /// ([`Inbox::replay`](super::Inbox::replay)). Defaults to 5 s.
    pub replay_interval: Duration,
    /// Longest wait for a record in one poll of Kafka; the stop signal is seen between
    /// polls. Defaults to 100 ms.
    pub poll_timeout: Duration,
}

impl Default for InboxSettings {
    fn default() -> Self {
        InboxSettings {
            batch_size: 100,
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 60 * 60),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch_size: 1_000,
            replay_interval: Duration::from_secs(5),
            poll_timeout: Duration::from_millis(100),
        }
    }
}

impl InboxSettings {
    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first setting refused: a zero duration, count or
    /// batch size, `backoff_min` above `backoff_max`, or a duration over 100 years.
    pub fn validate(&self) -> Result<()> {
        let longest = crate::DispatcherSettings::MAX_DURATION;
        for (name, value) in [
            ("backoff_min", self.backoff_min),
            ("backoff_max", self.backoff_max),
            ("retention", self.retention),
            ("cleanup_interval", self.cleanup_interval),
            ("replay_interval", self.replay_interval),
            ("poll_timeout", self.poll_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::config(format!("{name} must be greater than zero")));
            }
            if value > longest {
                return Err(Error::config(format!("{name} must be at most 100 years")));
            }
        }
        if self.max_attempts == 0 {
            return Err(Error::config("max_attempts must be at least 1"));
        }
        if self.batch_size == 0 || self.batch_size > MAX_INBOX_BATCH {
            return Err(Error::config(format!(
                "batch_size must be 1 to {MAX_INBOX_BATCH}"
            )));
        }
        if self.cleanup_batch_size == 0 {
            return Err(Error::config("cleanup_batch_size must be at least 1"));
        }
        if self.backoff_min > self.backoff_max {
            return Err(Error::config(format!(
                "backoff_min ({:?}) is above backoff_max ({:?})",
                self.backoff_min, self.backoff_max
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_work() {
        assert!(InboxSettings::default().validate().is_ok());
        let bad = [
            InboxSettings {
                max_attempts: 0,
                ..Default::default()
            },
            InboxSettings {
                retention: Duration::ZERO,
                ..Default::default()
            },
            InboxSettings {
                backoff_min: Duration::from_secs(10),
                backoff_max: Duration::from_secs(1),
                ..Default::default()
            },
            InboxSettings {
                cleanup_batch_size: 0,
                ..Default::default()
            },
            InboxSettings {
                batch_size: 0,
                ..Default::default()
            },
        ];
        for settings in bad {
            assert!(
                matches!(settings.validate(), Err(Error::Config(_))),
                "{settings:?}"
            );
        }
    }
}

/// Which partitions a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Every partition of these topics, shared with the other members of the Kafka
    /// consumer group named after the consumer. Offsets are committed to Kafka, only for
    /// records whose transaction committed, and when a partition is taken away, for
    /// everything handled before.
    Group(Vec<String>),
    /// These partitions (topic and partition number), with no consumer group: for
    /// brokers or deployments without group coordination. The next offset of each is kept
    /// in MySQL (`inbox_offsets`), written in the transaction of the record before it; a
    /// partition with none saved is read from its beginning.
    Partitions(Vec<(String, i32)>),
    /// Every partition of these topics, as [`Partitions`](Assignment::Partitions): found in
    /// the cluster's metadata when the consumer starts (a partition added later is read
    /// after a restart).
    Topics(Vec<String>),
}
