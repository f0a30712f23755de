//! The relay's settler: every row of a published batch marked by its own outcome, a mark
//! that fails on a database error tried again until the lease would have expired.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::record::Record;
use crate::runtime::backoff::backoff;
use crate::runtime::signal::Signals;
use crate::store::{Failure, Store};

use super::batch::Batch;
use super::relay::{Relay, Round};

/// Longest pause between two tries of a mark that failed on a database error.
const MARK_RETRY_MAX: Duration = Duration::from_secs(1);

impl<S: Store> Relay<S> {
    /// Marks every row of a published batch by its own outcome.
    pub(super) fn settle(&self, batch: Batch) -> Result<Round> {
        let lease_ends = self.proven(batch.lease) + self.settings.max_lock_duration;
        let records = &batch.records;
        if batch.published.is_none() {
            let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
            let released = self.retry_until(
                lease_ends,
                |store, lease| store.release(lease, &ids),
                batch.lease,
            )?;
            log::debug!("{released} rows released unpublished at stop");
            return Ok(Round {
                claimed: records.len(),
                released: records.len(),
                ..Round::default()
            });
        }
        let published = batch.published.unwrap_or(batch.claimed);
        // Settle each key's run in order: after a message fails, the later ones of its key
        // wait behind it. Those the broker did not send are released without an attempt;
        // one it acknowledged anyway is in Kafka already and is marked delivered.
        let mut delivered = Vec::with_capacity(records.len());
        let mut delivered_records = Vec::with_capacity(records.len());
        let mut failed_records = Vec::new();
        let mut failures = Vec::new();
        let mut released = Vec::new();
        let mut failed_keys = HashSet::new();
        let mut first_error = None;
        for (record, outcome) in records.iter().zip(batch.outcomes) {
            let key = record.message.order_key();
            let behind_failure = key.is_some_and(|k| failed_keys.contains(&k));
            match outcome {
                Ok(()) => {
                    if behind_failure {
                        log::error!(
                            "message {} was acknowledged after an earlier message of its key failed: \
                             that key's order is broken in Kafka",
                            record.message_id
                        );
                    }
                    delivered.push(record.id);
                    delivered_records.push(record);
                }
                Err(_) if behind_failure => released.push(record.id),
                Err(Error::NotSent(_)) => {
                    released.push(record.id);
                    failed_keys.extend(key);
                }
                Err(e) => {
                    failures.push(self.failure(record, &e));
                    failed_records.push(record);
                    failed_keys.extend(key);
                    first_error.get_or_insert(e);
                }
            }
        }

        let round = Round {
            claimed: records.len(),
            delivered: delivered.len(),
            failed: failures.len(),
            released: released.len(),
        };
        if let Some(e) = first_error {
            log::warn!(
                "{} of {} messages failed to publish; first error: {e}",
                round.failed,
                round.claimed
            );
            self.signals.report(e);
        }
        let lease = batch.lease;
        let marking = Instant::now();
        let marked = self.retry_until(
            lease_ends,
            |store, lease| store.mark_delivered(lease, &delivered),
            lease,
        )?;
        let failed = self.retry_until(
            lease_ends,
            |store, lease| store.mark_failed(lease, &failures),
            lease,
        )?;
        let unlocked = self.retry_until(
            lease_ends,
            |store, lease| store.release(lease, &released),
            lease,
        )?;
        self.meter.stage("publish", published - batch.claimed);
        self.meter.stage("mark", marking.elapsed());
        let acknowledged = SystemTime::now()
            .checked_sub(published.elapsed())
            .unwrap_or_else(SystemTime::now);
        let dead_records = failed_records
            .iter()
            .zip(&failures)
            .filter(|(_, failure)| failure.dead)
            .map(|(record, _)| *record);
        self.meter.settled(
            delivered_records.iter().copied(),
            acknowledged,
            failed_records.iter().copied(),
            dead_records,
        );
        let settled = marked + failed + unlocked;
        let lost = round.claimed as u64 - settled.min(round.claimed as u64);
        if lost > 0 {
            log::warn!(
                "{lost} rows were no longer held by {}'s lease {lease} when marked (it expired and \
                 they were taken over); they may be published twice",
                self.owner
            );
        }
        log::debug!(
            "round: {} claimed in {:?}, published in {:?} ({} delivered, {} failed, {} released), \
             marked in {:?}",
            round.claimed,
            batch.claimed - batch.started,
            published - batch.claimed,
            round.delivered,
            round.failed,
            round.released,
            published.elapsed()
        );
        Ok(round)
    }

    /// The failed attempt of `record`: one more attempt, a backoff, dead at `max_attempts`.
    pub(super) fn failure(&self, record: &Record, error: &Error) -> Failure {
        let attempts = record.attempts.saturating_add(1);
        let dead = self
            .settings
            .max_attempts
            .is_some_and(|max| attempts >= max);
        let retry_in = backoff(
            attempts,
            self.settings.backoff_min,
            self.settings.backoff_max,
        );
        if dead {
            log::error!(
                "message {} (row {}) is dead after {attempts} attempts: {error}",
                record.message_id,
                record.id
            );
        } else {
            log::debug!(
                "message {} (row {}) failed, attempt {attempts}, retry in {retry_in:?}: {error}",
                record.message_id,
                record.id
            );
        }
        Failure {
            id: record.id,
            error: error.to_string(),
            retry_in,
            dead,
        }
    }

    /// Runs a mark of the rows under `lease` until it succeeds. A database error is
    /// reported and the mark tried again, with growing pauses, until the lease would have
    /// expired anyway, or, once the stop signal came, until the stop's deadline: giving up
    /// earlier would only leave the rows to be published twice.
    pub(super) fn retry_until(
        &self,
        lease_ends: Instant,
        mark: impl Fn(&S, u64) -> Result<u64>,
        lease: u64,
    ) -> Result<u64> {
        let mut pause = Duration::from_millis(50);
        loop {
            match mark(&self.store, lease) {
                Ok(n) => return Ok(n),
                Err(e) if Instant::now() + pause < self.signals.retry_until(lease_ends) => {
                    self.signals.report(e);
                    if self.signals.stopped() {
                        Signals::wait(pause);
                    } else {
                        self.signals.pause(pause);
                    }
                    pause = (pause * 2).min(MARK_RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
