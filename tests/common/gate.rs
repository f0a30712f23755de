//! A broker behind a gate, for tests that must act while a publish is under way.

use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use outbox::{HealthProbe, Record, Worker};

/// The real broker behind a gate: each publish sends the row ids of its batch on
/// `entered`, then waits for the test's go (or panics, when told to) before it publishes.
/// Batches after the first `open_after` go through without waiting.
pub struct GatedBroker {
    inner: outbox::KafkaBroker,
    entered: Sender<Vec<u64>>,
    go: Receiver<()>,
    panic: bool,
    /// Publishes that pass without the gate, before the gate closes.
    open_for: usize,
}

/// A gated broker; the test's ends of the gate: the batches that entered, and the go.
pub fn gated(panic: bool) -> (GatedBroker, Receiver<Vec<u64>>, Sender<()>) {
    gated_after(panic, 0)
}

/// As [`gated`], with the first `open_for` publishes passing without waiting.
pub fn gated_after(panic: bool, open_for: usize) -> (GatedBroker, Receiver<Vec<u64>>, Sender<()>) {
    let (entered_tx, entered_rx) = bounded(100);
    let (go_tx, go_rx) = bounded(100);
    let broker = GatedBroker {
        inner: super::broker(),
        entered: entered_tx,
        go: go_rx,
        panic,
        open_for,
    };
    (broker, entered_rx, go_tx)
}

impl outbox::Broker for GatedBroker {
    fn publish(&mut self, records: &[Record]) -> Vec<outbox::Result<()>> {
        if self.open_for > 0 {
            self.open_for -= 1;
            return self.inner.publish(records);
        }
        let _ = self.entered.send(records.iter().map(|r| r.id).collect());
        if self.panic {
            panic!("injected publisher panic");
        }
        let _ = self.go.recv();
        self.inner.publish(records)
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}

/// Whether the dispatcher seen through `probe` was given the stop signal: its lock
/// checker, which ends at the signal and waits on nothing else, has ended. The relay
/// goes on settling its batch in flight after that.
pub fn stop_signalled(probe: &HealthProbe) -> bool {
    probe
        .health()
        .workers
        .iter()
        .any(|w| w.worker == Worker::LockChecker && !w.alive)
}

/// The tests' broker, taking `pause` more over each publish: a relay that always has
/// more to read than it can send.
pub struct SlowBroker {
    pub inner: outbox::KafkaBroker,
    pub pause: Duration,
}

impl outbox::Broker for SlowBroker {
    fn publish(&mut self, records: &[outbox::Record]) -> Vec<outbox::Result<()>> {
        std::thread::sleep(self.pause);
        self.inner.publish(records)
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}
