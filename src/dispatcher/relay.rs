//! The relay worker: claim a batch, publish it, mark each row by its own outcome.
//!
//! While the relay drains, the three steps run on three threads, each on its own batch:
//! the relay's thread claims, `outbox-publisher` publishes, and `outbox-settler` marks
//! the rows by their outcomes, batch after batch in the order they were claimed. At most
//! [`IN_FLIGHT`] batches are claimed and not yet settled at any time.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, select, Receiver, Sender};
use parking_lot::Mutex;

use super::batch::{Batch, Lease};
use super::flow::{Flow, Pace, Settled};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::handoff::Handoff;
use crate::metrics::Meter;
use crate::runtime::signal::{panic_text, Signals};
use crate::runtime::Wakeups;
use crate::settings::{DispatcherSettings, PIPELINE_DEPTH};
use crate::store::{Claim, Store};

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
    /// Where commits in this process hand rows over, when it takes them
    /// ([`DispatcherSettings::hand_off`]).
    pub handoff: Option<Arc<Handoff>>,
}

impl<S: Store> Relay<S> {
    /// Drains at once, then again on every wake-up and at the [`Pace`] of its polls,
    /// until the stop signal, or until the publisher or the settler died. Then releases every
    /// lease still held. A panic of the relay's own thread goes on up, after that.
    pub fn run(self, broker: impl Broker, wakeups: Wakeups) {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.pipeline(broker, &wakeups)));
        self.release_handed();
        self.release_held();
        if let Err(panic) = outcome {
            resume_unwind(panic);
        }
    }

    fn pipeline(&self, mut broker: impl Broker, wakeups: &Wakeups) {
        let wake = &wakeups.channel;
        let mut pace = Pace::new(self.settings.process_interval, self.settings.linger);
        let mut flow = Flow::default();
        let (to_publish, batches) = bounded::<Batch>(IN_FLIGHT);
        let (to_settle, published) = bounded::<Batch>(IN_FLIGHT);
        let (to_relay, settled) = bounded::<Settled>(IN_FLIGHT);
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
                            let mut done = Settled {
                                handed: batch.handed,
                                untidy: true,
                            };
                            match catch_unwind(AssertUnwindSafe(|| relay.settle(batch))) {
                                Ok(Ok(round)) => {
                                    relay.signals.succeeded(Worker::Settler);
                                    done.untidy = round.failed + round.released > 0;
                                }
                                Ok(Err(e)) => relay.signals.report(e),
                                Err(panic) => {
                                    relay.signals.panicked(Worker::Settler, panic_text(&*panic));
                                    return;
                                }
                            }
                            relay.held.lock().remove(&lease);
                            if to_relay.send(done).is_err() {
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
            // The first drain claims; later ones when a poll is due or a wake-up asked.
            let mut claim = true;
            loop {
                let found = relay.drain(&to_publish, &settled, wakeups, claim, &mut flow);
                if relay.signals.failed() {
                    break;
                }
                select! {
                    recv(relay.signals.stop) -> _ => break,
                    recv(wake) -> _ => claim = wakeups.asked(),
                    recv(after(pace.next(found))) -> _ => claim = true,
                }
                if relay.signals.stopped() || relay.signals.failed() {
                    break;
                }
            }
            // Let what is in flight be published and settled before the threads end.
            drop(to_publish);
            while flow.in_flight > 0 && settled.recv().is_ok() {
                flow.in_flight -= 1;
            }
            drop(done);
        });
    }

    /// Claims batches back to back while they find work, up to [`IN_FLIGHT`] ahead of
    /// their settling, and claims again as each is settled (its deliveries may let the
    /// next messages of their keys through) or on a wake-up that asks it; meanwhile takes
    /// what commits handed over, one take in flight at a time. Returns when nothing is in
    /// flight and a claim found nothing (or none was asked), or on the stop signal; true
    /// if some claim found rows. A claim after one that did not fill its batch, and a take
    /// after a take, wait for `linger` after it, so that a stream of commits is taken a
    /// few at a time.
    fn drain(
        &self,
        to_publish: &Sender<Batch>,
        settled: &Receiver<Settled>,
        wakeups: &Wakeups,
        claim: bool,
        flow: &mut Flow,
    ) -> bool {
        let mut found = false;
        flow.claim_now = claim;
        flow.take_now = true;
        loop {
            while let Ok(done) = settled.try_recv() {
                flow.settled(done);
            }
            if self.signals.stopped() || self.signals.failed() {
                return found;
            }
            if self.take_is_due(flow) {
                let wait = flow.takes.wait(self.settings.linger);
                if !wait.is_zero() {
                    if !self.pause(settled, wait, flow) {
                        return found;
                    }
                    continue;
                }
                if !self.take_into(to_publish, flow) {
                    return found;
                }
                continue;
            }
            if flow.in_flight < IN_FLIGHT && flow.claim_now {
                let wait = flow.claims.wait(self.settings.linger);
                if !wait.is_zero() {
                    // Wake-ups wait in their channel meanwhile: under a stream of
                    // commits, one per commit would only wake this thread to wait again.
                    if !self.pause(settled, wait, flow) {
                        return found;
                    }
                    continue;
                }
                flow.claims.last = Some(Instant::now());
                flow.claims.filled = false;
                if flow.in_flight == 0 {
                    // Rows left to the claims wait no longer behind rows in flight.
                    flow.refused = false;
                }
                match self.claim() {
                    Ok(Some((batch, more))) => {
                        if to_publish.send(batch).is_err() {
                            return found;
                        }
                        flow.in_flight += 1;
                        found = true;
                        flow.claim_now = more;
                        flow.claims.filled = more;
                        continue;
                    }
                    Ok(None) => flow.claim_now = false,
                    Err(e) => {
                        flow.claim_now = false;
                        self.signals.report(e);
                    }
                }
            }
            if flow.in_flight == 0 {
                return found;
            }
            select! {
                recv(settled) -> done => match done {
                    Ok(done) => flow.settled(done),
                    Err(_) => return found,
                },
                recv(wakeups.channel) -> _ => {
                    flow.claim_now |= wakeups.asked();
                    flow.take_now = true;
                }
                recv(self.signals.stop) -> _ => return found,
            }
        }
    }

    /// Waits `wait` for a linger to pass, taking settled batches meanwhile. False on the
    /// stop signal or when the settler is gone.
    fn pause(&self, settled: &Receiver<Settled>, wait: Duration, flow: &mut Flow) -> bool {
        select! {
            recv(settled) -> done => match done {
                Ok(done) => {
                    flow.settled(done);
                    true
                }
                Err(_) => false,
            },
            recv(self.signals.stop) -> _ => false,
            recv(after(wait)) -> _ => true,
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
        let more = claim.more;
        Ok(Some((self.hold(claim, started, started, false), more)))
    }

    /// Holds the lease of the rows `claim` took, proven at `proven`, until their batch
    /// is settled; and makes that batch, begun at `started`.
    pub(super) fn hold(
        &self,
        claim: Claim,
        proven: Instant,
        started: Instant,
        handed: bool,
    ) -> Batch {
        let lease = Lease {
            ids: claim.records.iter().map(|r| r.id).collect(),
            proven: Some(proven),
        };
        self.held.lock().insert(claim.lease, lease);
        Batch {
            lease: claim.lease,
            records: claim.records,
            started,
            claimed: Instant::now(),
            published: None,
            outcomes: Vec::new(),
            handed,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
            handoff: None,
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
