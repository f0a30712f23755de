//! A claimed batch on its way through publishing, and the lease it is published under.

use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::record::Record;

/// A claimed batch on its way through publishing.
pub(crate) struct Batch {
    pub records: Vec<Record>,
    /// The claim's lease.
    pub lease: u64,
    pub started: Instant,
    pub claimed: Instant,
    pub published: Option<Instant>,
    pub outcomes: Vec<Result<()>>,
    /// Taken from the hand-off rather than claimed.
    pub handed: bool,
}

impl Batch {
    /// Publishes the records; one outcome per record, whatever the broker returned. A
    /// batch whose lease was last proven (claimed or renewed) at `proven` is published
    /// only while the lease is sure to hold (fencing by time): a relay cut off from the
    /// database stops publishing before another dispatcher could take its rows over. A
    /// batch not published is released when settled.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] saying why, when the lease was not sure to hold.
    pub(super) fn publish(
        &mut self,
        broker: &mut impl Broker,
        proven: Instant,
        max_lock_duration: Duration,
    ) -> Result<()> {
        if !lease_holds(proven, max_lock_duration) {
            return Err(Error::Refused(format!(
                "a batch of {} messages was not published: its lease could not be renewed \
                 for {:?} (the database is out of reach, or the lease was taken over), and \
                 another dispatcher may take its rows over; it is released untried",
                self.records.len(),
                proven.elapsed()
            )));
        }
        log::debug!(
            "publishing a batch of {} under lease {}",
            self.records.len(),
            self.lease
        );
        let mut outcomes = broker.publish(&self.records);
        if outcomes.len() != self.records.len() {
            log::error!(
                "broker returned {} outcomes for {} records",
                outcomes.len(),
                self.records.len()
            );
            outcomes.resize_with(self.records.len(), || {
                Err(Error::Broker("the broker returned no outcome".into()))
            });
        }
        self.outcomes = outcomes;
        self.published = Some(Instant::now());
        Ok(())
    }
}

/// Whether a lease last proven (claimed, or renewed) at `proven` is sure to hold now:
/// the lock checkers take it over `max_lock_duration` after, by the database's clock;
/// the last quarter is the margin.
fn lease_holds(proven: Instant, max_lock_duration: Duration) -> bool {
    Instant::now() < proven + max_lock_duration - max_lock_duration / RENEWALS
}

/// How many times per `max_lock_duration` the leases of batches in flight are renewed.
pub(super) const RENEWALS: u32 = 4;

/// A lease the relay holds: its rows, and when it was last proven.
pub(crate) struct Lease {
    pub ids: Vec<u64>,
    /// When the statement that claimed or last renewed it was sent; `None` once a
    /// renewal found it no longer held (taken over).
    pub proven: Option<Instant>,
}
