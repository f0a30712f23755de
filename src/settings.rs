//! How often the dispatcher's workers run and what they allow.

use std::time::Duration;

use crate::error::{Error, Result};

/// Largest accepted `batch_size`.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// Most batches the relay holds claimed at once (one claimed ahead, one publishing, one
/// being marked): a lease must outlast that many delivery timeouts.
pub(crate) const PIPELINE_DEPTH: u32 = 3;

/// The dispatcher's settings. Build from [`Default`] and change what you need:
///
/// ```
/// use std::time::Duration;
/// let settings = outbox::DispatcherSettings {
///     batch_size: 200,
///     max_attempts: Some(10),
///     ..Default::default()
/// };
/// assert_eq!(settings.process_interval, Duration::from_secs(1));
/// ```
///
/// [`Dispatcher::new`](crate::Dispatcher::new) checks them and refuses invalid
/// combinations with [`Error::Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatcherSettings {
    /// How often the relay polls for new messages while it finds none and is not woken.
    /// After a poll that found rows it polls again within a millisecond, then doubles the
    /// wait after each poll that finds none, up to this. Defaults to 1 s.
    pub process_interval: Duration,
    /// How long new messages may gather before the relay claims again after a claim that
    /// did not fill its batch (and after a poll that found rows): under a stream of
    /// commits, woken at each or not, the relay claims at most once per `linger`, each
    /// claim taking what gathered, instead of a message or two per claim. Zero claims at
    /// once. At most [`MAX_LINGER`](Self::MAX_LINGER). Defaults to 10 ms.
    pub linger: Duration,
    /// How often the lock checker looks for expired leases. Defaults to 30 s.
    pub lock_check_interval: Duration,
    /// How often the cleaner deletes rows past their retention. Defaults to 60 s.
    pub cleanup_interval: Duration,
    /// How long a claimed row's lease lasts before the lock checker releases it for
    /// another dispatcher: how soon the rows of a dispatcher that died or was cut off
    /// from the database are taken over. The relay renews the leases of the batches it
    /// holds four times per this long, and starts no publish of a batch whose lease it
    /// could not renew for three quarters of it (a relay cut off from the database stops
    /// publishing before its rows could be taken over; a publish begun before may still
    /// finish). The dispatcher's sessions are ended by the database once idle this long
    /// ([`Store::end_idle_sessions_after`](crate::Store::end_idle_sessions_after)), so a
    /// transaction a cut link left open holds its rows no longer. At least
    /// [`MIN_LEASE`](Self::MIN_LEASE). Defaults to 30 s.
    pub max_lock_duration: Duration,
    /// How long delivered rows are kept before the cleaner deletes them, and rows an
    /// operator discarded (counted from the discard). Pending rows are never deleted.
    /// Defaults to 24 h.
    pub retention: Duration,
    /// How long dead rows are kept; `None` keeps them until an operator acts.
    /// Defaults to `None`.
    pub dead_retention: Option<Duration>,
    /// Failed sends after which a message is dead (state 2) and no longer tried; `None`
    /// retries forever. Defaults to `None`.
    pub max_attempts: Option<u32>,
    /// Whether a dead message holds back the later messages of its topic and key
    /// (`true`), or lets them go on (`false`: order holds among delivered messages, with
    /// a gap where the dead one was). Defaults to `false`.
    pub dead_blocks_key: bool,
    /// Most messages claimed and published in one round. Defaults to 500.
    pub batch_size: usize,
    /// Most rows the cleaner deletes in one statement. Defaults to 1,000.
    pub cleanup_batch_size: usize,
    /// Least wait before a failed message is tried again. The first retry waits between
    /// this and twice this, drawn at random; each further failure doubles the range, up
    /// to `backoff_max`. Defaults to 1 s.
    pub backoff_min: Duration,
    /// Longest wait between retries; waits near it are drawn from its upper half.
    /// Defaults to 5 min.
    pub backoff_max: Duration,
    /// How often a worker reads the table's pending and dead messages, lag and leases
    /// into the gauges of [`metrics`](crate::metrics); `None` runs no such worker.
    /// Defaults to `None`.
    pub gauge_interval: Option<Duration>,
    /// Whether the transactions of an [`Outbox`](crate::Outbox) given this dispatcher's
    /// [`waker`](crate::DispatcherHandle::waker), on its table, hand their messages to it
    /// at commit: [`OutboxTransaction`](crate::OutboxTransaction) writes them already
    /// leased to the dispatcher, which publishes them with no claim (a read by message
    /// id instead of a claim's reads and writes; `outbox_rows_handed_total` counts them).
    /// A message whose key has an older message pending that this dispatcher does not
    /// hold goes the usual way, so each key keeps its order; so do delayed messages and
    /// those of [`Outbox::add`](crate::Outbox::add) on a transaction of the caller's. If
    /// the process dies, their leases expire as any other (`max_lock_duration`). It
    /// saves the database most of the dispatcher's statements (in the web example, 0.12
    /// per request instead of 0.43) for a few milliseconds of latency (one take in flight
    /// at a time); on a machine the service shares with its database and broker it gave
    /// no more throughput. Defaults to `false`; the store must support it
    /// ([`MySqlStore`](crate::MySqlStore) does).
    pub hand_off: bool,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        DispatcherSettings {
            process_interval: Duration::from_secs(1),
            linger: Duration::from_millis(10),
            lock_check_interval: Duration::from_secs(30),
            cleanup_interval: Duration::from_secs(60),
            max_lock_duration: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 60 * 60),
            dead_retention: None,
            max_attempts: None,
            dead_blocks_key: false,
            batch_size: 500,
            cleanup_batch_size: 1_000,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            gauge_interval: None,
            hand_off: false,
        }
    }
}

impl DispatcherSettings {
    /// Room for claiming and marking that a lease once had to leave beyond the relay's
    /// delivery timeouts. No longer required (leases in flight are renewed); kept for
    /// the code that computes with it.
    pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

    /// Longest duration accepted anywhere (100 years): the database computes with them.
    pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

    /// The longest `linger`.
    pub const MAX_LINGER: Duration = Duration::from_secs(1);

    /// The shortest `max_lock_duration`.
    pub const MIN_LEASE: Duration = Duration::from_secs(2);

    /// Checks every field and the combinations. The broker's delivery timeout no longer
    /// bounds the lease (the relay renews the leases of what it is sending): it is taken
    /// for the callers that pass it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first setting refused.
    pub fn validate(&self, _delivery_timeout: Duration) -> Result<()> {
        let durations = [
            ("process_interval", self.process_interval),
            ("lock_check_interval", self.lock_check_interval),
            ("cleanup_interval", self.cleanup_interval),
            ("max_lock_duration", self.max_lock_duration),
            ("retention", self.retention),
            ("backoff_min", self.backoff_min),
            ("backoff_max", self.backoff_max),
        ];
        let dead = self.dead_retention.map(|d| ("dead_retention", d));
        let gauges = self.gauge_interval.map(|d| ("gauge_interval", d));
        for (name, value) in durations.into_iter().chain(dead).chain(gauges) {
            if value.is_zero() {
                return Err(Error::config(format!("{name} must be greater than zero")));
            }
            if value > Self::MAX_DURATION {
                return Err(Error::config(format!("{name} is longer than 100 years")));
            }
        }
        if self.max_attempts == Some(0) {
            return Err(Error::config(
                "max_attempts must be at least 1 (or None for no limit)",
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(Error::config(format!(
                "batch_size must be 1 to {MAX_BATCH_SIZE}"
            )));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.cleanup_batch_size) {
            return Err(Error::config(format!(
                "cleanup_batch_size must be 1 to {MAX_BATCH_SIZE}"
            )));
        }
        if self.linger > Self::MAX_LINGER {
            return Err(Error::config(format!(
                "linger ({:?}) must be at most {:?}: it delays every message of a stream",
                self.linger,
                Self::MAX_LINGER
            )));
        }
        if self.backoff_min > self.backoff_max {
            return Err(Error::config("backoff_min must not exceed backoff_max"));
        }
        if self.max_lock_duration < Self::MIN_LEASE {
            return Err(Error::config(format!(
                "max_lock_duration ({:?}) must be at least {:?}: the relay renews the leases \
                 of the batches it is sending four times per max_lock_duration",
                self.max_lock_duration,
                Self::MIN_LEASE
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERY: Duration = Duration::from_secs(30);

    fn refused(settings: DispatcherSettings) -> String {
        refused_with(settings, DELIVERY)
    }

    fn refused_with(settings: DispatcherSettings, delivery: Duration) -> String {
        match settings.validate(delivery) {
            Err(Error::Config(reason)) => reason,
            other => panic!("expected Config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        DispatcherSettings::default().validate(DELIVERY).unwrap();
    }

    #[test]
    fn an_endless_delivery_timeout_no_longer_bounds_the_lease() {
        DispatcherSettings::default()
            .validate(Duration::MAX)
            .unwrap();
    }

    #[test]
    fn refuses_zero_durations_and_sizes() {
        let d = DispatcherSettings::default;
        assert!(refused(DispatcherSettings {
            process_interval: Duration::ZERO,
            ..d()
        })
        .contains("process_interval"));
        assert!(refused(DispatcherSettings {
            retention: Duration::ZERO,
            ..d()
        })
        .contains("retention"));
        assert!(refused(DispatcherSettings {
            dead_retention: Some(Duration::ZERO),
            ..d()
        })
        .contains("dead_retention"));
        assert!(refused(DispatcherSettings {
            batch_size: 0,
            ..d()
        })
        .contains("batch_size"));
        assert!(refused(DispatcherSettings {
            batch_size: MAX_BATCH_SIZE + 1,
            ..d()
        })
        .contains("batch_size"));
        assert!(refused(DispatcherSettings {
            cleanup_batch_size: 0,
            ..d()
        })
        .contains("cleanup_batch_size"));
        assert!(refused(DispatcherSettings {
            max_attempts: Some(0),
            ..d()
        })
        .contains("max_attempts"));
    }

    #[test]
    fn refuses_contradictions() {
        let d = DispatcherSettings::default;
        let inverted = DispatcherSettings {
            backoff_min: Duration::from_secs(10),
            backoff_max: Duration::from_secs(1),
            ..d()
        };
        assert!(refused(inverted).contains("backoff_min"));
        let short_lease = DispatcherSettings {
            max_lock_duration: Duration::from_millis(1_999),
            ..d()
        };
        assert!(refused(short_lease).contains("max_lock_duration"));
        let long_linger = DispatcherSettings {
            linger: DispatcherSettings::MAX_LINGER + Duration::from_millis(1),
            ..d()
        };
        assert!(refused(long_linger).contains("linger"));
        DispatcherSettings {
            linger: Duration::ZERO,
            ..d()
        }
        .validate(DELIVERY)
        .unwrap();
        // Shorter than the delivery timeout: the relay renews what it is sending.
        let renewed = DispatcherSettings {
            max_lock_duration: DispatcherSettings::MIN_LEASE,
            ..d()
        };
        renewed.validate(DELIVERY).unwrap();
        let huge = DispatcherSettings {
            retention: Duration::from_secs(u64::MAX),
            ..d()
        };
        assert!(refused(huge).contains("100 years"));
    }
}
