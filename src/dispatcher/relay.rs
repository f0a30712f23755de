//! The relay worker: claim a batch, publish it, mark each row by its own outcome.
//!
//! While the relay drains, the three steps run on three threads, each on its own batch:
//! the relay's thread claims, `outbox-publisher` publishes, and `outbox-settler` marks
//! the rows by their outcomes, batch after batch in the order they were claimed. At most
//! [`IN_FLIGHT`] batches are claimed and not yet settled at any time.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{after, bounded, select, tick, Receiver, Sender};
use parking_lot::Mutex;

use super::backoff::backoff;
use super::signal::{panic_text, Signals};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::metrics::Meter;
use crate::record::Record;
use crate::settings::{DispatcherSettings, PIPELINE_DEPTH};
use crate::store::{Failure, Store};

/// Longest pause between two tries of a mark that failed on a database error.
const MARK_RETRY_MAX: Duration = Duration::from_secs(1);
/// Most batches claimed and not yet settled: one being claimed ahead, one publishing,
/// one being marked. Leases are validated against it.
pub(crate) const IN_FLIGHT: usize = PIPELINE_DEPTH as usize;

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Round {
    pub claimed: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Not tried: an earlier message of their key failed in the same round.
    pub released: usize,
}

/// A claimed batch on its way through publishing.
pub(crate) struct Batch {
    records: Vec<Record>,
    /// The claim's lease.
    lease: u64,
    started: Instant,
    claimed: Instant,
    published: Option<Instant>,
    outcomes: Vec<Result<()>>,
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
    fn publish(
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
const RENEWALS: u32 = 4;

/// A lease the relay holds: its rows, and when it was last proven.
pub(crate) struct Lease {
    pub ids: Vec<u64>,
    /// When the statement that claimed or last renewed it was sent; `None` once a
    /// renewal found it no longer held (taken over).
    pub proven: Option<Instant>,
}

/// The relay's database side; the broker is handed to [`Relay::run`] or [`Relay::round`].
pub(crate) struct Relay<S> {
    pub store: Arc<S>,
    pub settings: DispatcherSettings,
    pub owner: String,
    pub signals: Signals,
    /// Every lease claimed and not yet settled: renewed while it is, released if a
    /// worker dies with it.
    pub held: Mutex<HashMap<u64, Lease>>,
    /// Where its counts and timings go.
    pub meter: Meter,
}

impl<S: Store> Relay<S> {
    /// Drains at once, then again on every wake-up and every `process_interval`, until
    /// the stop signal, or until the publisher or the settler died. Then releases every
    /// lease still held. A panic of the relay's own thread goes on up, after that.
    pub fn run(self, broker: impl Broker, wake: Receiver<()>) {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.pipeline(broker, wake)));
        self.release_held();
        if let Err(panic) = outcome {
            resume_unwind(panic);
        }
    }

    fn pipeline(&self, mut broker: impl Broker, wake: Receiver<()>) {
        let ticks = tick(self.settings.process_interval);
        let (to_publish, batches) = bounded::<Batch>(IN_FLIGHT);
        let (to_settle, published) = bounded::<Batch>(IN_FLIGHT);
        let (to_relay, settled) = bounded::<()>(IN_FLIGHT);
        let relay = self;
        let max_lock = self.settings.max_lock_duration;
        thread::scope(|scope| {
            let publisher = thread::Builder::new()
                .name("outbox-publisher".into())
                .spawn_scoped(scope, move || {
                    for mut batch in batches {
                        // After the stop signal, batches still waiting go back untried:
                        // stopping waits for one publish at most, even with the broker down.
                        if !relay.signals.stopped() {
                            let proven = relay.proven(batch.lease);
                            let published = catch_unwind(AssertUnwindSafe(|| {
                                batch.publish(&mut broker, proven, max_lock)
                            }));
                            match published {
                                Ok(Ok(())) => relay.signals.succeeded(Worker::Publisher),
                                Ok(Err(fenced)) => relay.signals.report(fenced),
                                Err(panic) => {
                                    relay
                                        .signals
                                        .panicked(Worker::Publisher, panic_text(&*panic));
                                    return;
                                }
                            }
                        }
                        if to_settle.send(batch).is_err() {
                            return;
                        }
                    }
                });
            let settler = publisher.and_then(|_| {
                thread::Builder::new()
                    .name("outbox-settler".into())
                    .spawn_scoped(scope, move || {
                        for batch in published {
                            let lease = batch.lease;
                            match catch_unwind(AssertUnwindSafe(|| relay.settle(batch))) {
                                Ok(Ok(_)) => relay.signals.succeeded(Worker::Settler),
                                Ok(Err(e)) => relay.signals.report(e),
                                Err(panic) => {
                                    relay.signals.panicked(Worker::Settler, panic_text(&*panic));
                                    return;
                                }
                            }
                            relay.held.lock().remove(&lease);
                            if to_relay.send(()).is_err() {
                                return;
                            }
                        }
                    })
            });
            if let Err(e) = settler {
                relay.signals.report(Error::Thread(e));
                return;
            }
            // Renews the leases in flight until the pipeline is done (a stop included:
            // the publish in flight is then still settled).
            let (done, pipeline_done) = bounded::<()>(0);
            let renewer = thread::Builder::new()
                .name("outbox-renewer".into())
                .spawn_scoped(scope, move || {
                    if let Err(panic) =
                        catch_unwind(AssertUnwindSafe(|| relay.renew(&pipeline_done)))
                    {
                        relay.signals.panicked(Worker::Relay, panic_text(&*panic));
                    }
                });
            if let Err(e) = renewer {
                relay.signals.report(Error::Thread(e));
                return;
            }
            let mut in_flight = 0;
            loop {
                relay.drain(&to_publish, &settled, &wake, &mut in_flight);
                if relay.signals.failed() {
                    break;
                }
                select! {
                    recv(relay.signals.stop) -> _ => break,
                    recv(wake) -> _ => {},
                    recv(ticks) -> _ => {},
                }
                if relay.signals.stopped() || relay.signals.failed() {
                    break;
                }
            }
            // Let what is in flight be published and settled before the threads end.
            drop(to_publish);
            while in_flight > 0 && settled.recv().is_ok() {
                in_flight -= 1;
            }
            drop(done);
        });
    }

    /// Claims batches back to back while they find work, up to [`IN_FLIGHT`] ahead of
    /// their settling, and claims again as each is settled (its deliveries may let the
    /// next messages of their keys through) or on a wake-up (new messages). Returns when a
    /// claim finds nothing and nothing is in flight, or on the stop signal.
    fn drain(
        &self,
        to_publish: &Sender<Batch>,
        settled: &Receiver<()>,
        wake: &Receiver<()>,
        in_flight: &mut usize,
    ) {
        // False after a claim that left nothing it could take: the next one waits until a
        // batch is settled, or the application says it committed more.
        let mut claim_now = true;
        loop {
            while settled.try_recv().is_ok() {
                *in_flight -= 1;
                claim_now = true;
            }
            if self.signals.stopped() || self.signals.failed() {
                return;
            }
            if *in_flight < IN_FLIGHT && claim_now {
                match self.claim() {
                    Ok(Some((batch, more))) => {
                        if to_publish.send(batch).is_err() {
                            return;
                        }
                        *in_flight += 1;
                        claim_now = more;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => self.signals.report(e),
                }
            }
            if *in_flight == 0 {
                return;
            }
            select! {
                recv(settled) -> done => match done {
                    Ok(()) => {
                        *in_flight -= 1;
                        claim_now = true;
                    }
                    Err(_) => return,
                },
                recv(wake) -> _ => claim_now = true,
                recv(self.signals.stop) -> _ => return,
            }
        }
    }

    /// Claims one batch, publishes it and settles every row, all on this thread.
    pub fn round(&mut self, broker: &mut impl Broker) -> Result<Round> {
        match self.claim()? {
            Some((mut batch, _)) => {
                let proven = self.proven(batch.lease);
                if let Err(fenced) = batch.publish(broker, proven, self.settings.max_lock_duration)
                {
                    self.signals.report(fenced);
                }
                self.settle(batch)
            }
            None => Ok(Round::default()),
        }
    }

    /// Claims a batch; with it, whether claiming again at once would find more.
    fn claim(&self) -> Result<Option<(Batch, bool)>> {
        let started = Instant::now();
        let claim = self.store.claim(
            &self.owner,
            self.settings.batch_size,
            self.settings.dead_blocks_key,
        )?;
        self.signals.succeeded(Worker::Relay);
        if claim.records.is_empty() {
            return Ok(None);
        }
        self.meter.claimed(claim.records.len(), started.elapsed());
        let ids = claim.records.iter().map(|r| r.id).collect();
        let lease = Lease {
            ids,
            proven: Some(started),
        };
        self.held.lock().insert(claim.lease, lease);
        let batch = Batch {
            lease: claim.lease,
            records: claim.records,
            started,
            claimed: Instant::now(),
            published: None,
            outcomes: Vec::new(),
        };
        Ok(Some((batch, claim.more)))
    }

    /// Marks every row of a published batch by its own outcome.
    fn settle(&self, batch: Batch) -> Result<Round> {
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
    fn failure(&self, record: &Record, error: &Error) -> Failure {
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
    fn retry_until(
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

    /// When `lease` was last proven: claimed or renewed. Long ago when a renewal found it
    /// taken over, or when it is not held.
    fn proven(&self, lease: u64) -> Instant {
        let long_ago = || {
            let now = Instant::now();
            now.checked_sub(self.settings.max_lock_duration)
                .unwrap_or(now)
        };
        match self.held.lock().get(&lease) {
            Some(Lease {
                proven: Some(at), ..
            }) => *at,
            _ => long_ago(),
        }
    }

    /// Renews the leases in flight, [`RENEWALS`] times per `max_lock_duration`, until
    /// `done` closes. A lease a renewal finds no longer held (its rows taken over) is
    /// published no more.
    fn renew(&self, done: &Receiver<()>) {
        let every = self.settings.max_lock_duration / RENEWALS;
        loop {
            select! {
                recv(done) -> _ => return,
                recv(after(every)) -> _ => {},
            }
            let due: Vec<(u64, Vec<u64>)> = self
                .held
                .lock()
                .iter()
                .filter(|(_, lease)| lease.proven.is_some_and(|at| at.elapsed() >= every))
                .map(|(lease, held)| (*lease, held.ids.clone()))
                .collect();
            for (lease, ids) in due {
                let sent = Instant::now();
                match self.store.renew(lease, &ids) {
                    Ok(held) => {
                        if let Some(entry) = self.held.lock().get_mut(&lease) {
                            entry.proven = if held > 0 { Some(sent) } else { None };
                        }
                    }
                    Err(e) => self.signals.report(e),
                }
            }
        }
    }

    /// Releases the rows of every lease still held: batches a dead worker dropped, or
    /// that were never settled. Each release is tried again as a mark is.
    fn release_held(&self) {
        let held = std::mem::take(&mut *self.held.lock());
        for (lease, Lease { ids, .. }) in held {
            let lease_ends = Instant::now() + self.settings.max_lock_duration;
            match self.retry_until(lease_ends, |store, lease| store.release(lease, &ids), lease) {
                Ok(n) => log::warn!("released {n} rows a stopped relay still held"),
                Err(e) => self.signals.report(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::testing::{FakeBroker, FakeStore};
    use crate::message::Message;
    use crossbeam_channel::Sender;

    fn relay(
        store: Arc<FakeStore>,
        broker: FakeBroker,
        settings: DispatcherSettings,
    ) -> (TestRelay, Receiver<Error>, Sender<()>) {
        let (signals, errors, stop) = Signals::for_test();
        let relay = Relay {
            store,
            settings,
            owner: "me".into(),
            signals,
            held: Mutex::default(),
            meter: Meter::new("me"),
        };
        (TestRelay { relay, broker }, errors, stop)
    }

    /// A relay with its broker, driven one round at a time on the test's thread.
    struct TestRelay {
        relay: Relay<FakeStore>,
        broker: FakeBroker,
    }

    impl TestRelay {
        fn round(&mut self) -> Result<Round> {
            self.relay.round(&mut self.broker)
        }
    }

    fn settings() -> DispatcherSettings {
        DispatcherSettings {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            ..Default::default()
        }
    }

    #[test]
    fn one_failure_does_not_stop_the_rest_of_the_batch() {
        let store = Arc::new(FakeStore::with(
            (0..5).map(|i| Message::new("t", format!("m{i}"))),
        ));
        let broker = FakeBroker::failing_payloads(["m2"]);
        let (mut relay, errors, _stop) = relay(store.clone(), broker, settings());
        let round = relay.round().unwrap();
        assert_eq!(
            round,
            Round {
                claimed: 5,
                delivered: 4,
                failed: 1,
                released: 0
            }
        );
        assert_eq!(store.delivered_ids(), vec![1, 2, 4, 5]);
        let failed = store.row(3);
        assert_eq!(
            (failed.attempts, failed.dead, failed.lease != 0),
            (1, false, false)
        );
        assert!(failed.error.contains("refused m2"), "{}", failed.error);
        assert!(
            errors.try_recv().is_ok(),
            "the failure is reported on the error channel"
        );
    }

    #[test]
    fn reaching_max_attempts_makes_a_message_dead() {
        let store = Arc::new(FakeStore::with([Message::new("t", "poison")]));
        let broker = FakeBroker::failing_payloads(["poison"]);
        let (mut relay, _errors, _stop) = relay(
            store.clone(),
            broker,
            DispatcherSettings {
                max_attempts: Some(2),
                ..settings()
            },
        );
        relay.round().unwrap();
        assert!(!store.row(1).dead);
        store.make_available();
        relay.round().unwrap();
        let row = store.row(1);
        assert_eq!((row.attempts, row.dead), (2, true));
    }

    #[test]
    fn a_database_error_on_claim_is_returned_not_panicked() {
        let store = Arc::new(FakeStore::with([Message::new("t", "m")]));
        store.fail_next_claims(1);
        let (mut relay, _errors, _stop) =
            relay(store.clone(), FakeBroker::failing_payloads([]), settings());
        assert!(relay.round().is_err());
        assert_eq!(
            relay.round().unwrap().delivered,
            1,
            "the next round recovers"
        );
    }

    #[test]
    fn a_failed_mark_is_retried_so_the_row_is_not_published_twice() {
        let store = Arc::new(FakeStore::with([Message::new("t", "m")]));
        store.fail_next_marks(2);
        let broker = FakeBroker::failing_payloads([]);
        let (mut relay, errors, _stop) = relay(store.clone(), broker, settings());
        assert_eq!(relay.round().unwrap().delivered, 1);
        assert_eq!(store.delivered_ids(), vec![1]);
        assert_eq!(errors.try_iter().count(), 2, "each failed mark is reported");
    }

    #[test]
    fn a_run_of_one_key_stops_at_its_first_failure_and_later_ones_wait_untried() {
        let messages = ["a", "b", "c"].map(|p| Message::new("t", p).with_key("k"));
        let store = Arc::new(FakeStore::with(messages));
        let (mut relay, _errors, _stop) = relay(
            store.clone(),
            FakeBroker::failing_payloads(["b", "c"]),
            settings(),
        );
        let round = relay.round().unwrap();
        assert_eq!(
            round,
            Round {
                claimed: 3,
                delivered: 1,
                failed: 1,
                released: 1
            }
        );
        assert_eq!(store.delivered_ids(), vec![1]);
        let (b, c) = (store.row(2), store.row(3));
        assert_eq!(
            (b.attempts, b.lease != 0),
            (1, false),
            "the failure counts an attempt"
        );
        assert_eq!(
            (c.attempts, c.lease != 0, c.error.as_str()),
            (0, false, ""),
            "the one behind it was not tried"
        );
    }

    #[test]
    fn a_batch_never_published_is_released_without_an_attempt() {
        let store = Arc::new(FakeStore::with(["a", "b"].map(|p| Message::new("t", p))));
        let (relay, _errors, _stop) =
            relay(store.clone(), FakeBroker::failing_payloads([]), settings());
        let (batch, _) = relay.relay.claim().unwrap().expect("a batch");
        assert_eq!(
            relay.relay.settle(batch).unwrap(),
            Round {
                claimed: 2,
                released: 2,
                ..Round::default()
            }
        );
        for id in [1, 2] {
            let row = store.row(id);
            assert_eq!((row.attempts, row.lease != 0, row.dead), (0, false, false));
        }
        assert!(store.delivered_ids().is_empty());
    }

    #[test]
    fn a_record_not_sent_is_released_without_an_attempt() {
        let store = Arc::new(FakeStore::with(["a", "b"].map(|p| Message::new("t", p))));
        let (relay, _errors, _stop) =
            relay(store.clone(), FakeBroker::failing_payloads([]), settings());
        let (mut batch, _) = relay.relay.claim().unwrap().expect("a batch");
        batch.outcomes = vec![Ok(()), Err(Error::NotSent("purged".into()))];
        batch.published = Some(Instant::now());
        let round = relay.relay.settle(batch).unwrap();
        assert_eq!((round.delivered, round.failed, round.released), (1, 0, 1));
        let b = store.row(2);
        assert_eq!((b.attempts, b.lease, b.error.as_str()), (0, 0, ""));
    }

    #[test]
    fn other_keys_in_the_batch_go_on_when_one_key_fails() {
        let messages = [("k", "bad"), ("j", "j1"), ("k", "k2"), ("j", "j2")]
            .map(|(key, p)| Message::new("t", p).with_key(key));
        let store = Arc::new(FakeStore::with(messages));
        let (mut relay, _errors, _stop) = relay(
            store.clone(),
            FakeBroker::failing_payloads(["bad"]),
            settings(),
        );
        let round = relay.round().unwrap();
        assert_eq!(
            round,
            Round {
                claimed: 4,
                delivered: 3,
                failed: 1,
                released: 0
            }
        );
        assert_eq!(
            store.delivered_ids(),
            vec![2, 3, 4],
            "k2 was acknowledged, so it counts as delivered"
        );
    }
}
