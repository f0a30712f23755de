//! What every worker thread shares: the stop signal, the error channel, and what the
//! handle must know of them (a worker that died, how long a stop may take).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{after, select, Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;

use crate::error::{Error, Worker};

/// How many errors wait on the channel before newer ones are dropped (and only logged).
pub(crate) const ERROR_CAPACITY: usize = 1024;
/// How long, after the stop signal, a mark or release that fails on a database error is
/// tried again when the stop has no deadline of its own (the handle sets it).
pub(crate) const STOP_RETRY: Duration = Duration::from_secs(10);

/// A worker's end of the stop signal and of the error channel.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Disconnected when the handle drops its sender: the stop signal.
    pub stop: Receiver<()>,
    errors: Sender<Error>,
    shared: Arc<Shared>,
}

/// What the workers and the handle share.
#[derive(Default)]
pub(crate) struct Shared {
    /// The first worker that panicked, and its panic's text.
    panicked: Mutex<Option<(Worker, String)>>,
    /// Until when, after the stop signal, writes that fail are tried again.
    stop_deadline: Mutex<Option<Instant>>,
    /// When each worker last finished a round without error.
    successes: Mutex<HashMap<Worker, SystemTime>>,
    /// The last error reported, and when.
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// The worker threads started, in order, and whether each still runs.
    running: Mutex<Vec<(Worker, bool)>>,
    /// The threads that live inside the relay's thread, reported with it: the polling
    /// relay's publisher and settler, the binlog relay's reader and settler.
    inner: Mutex<Vec<Worker>>,
}

impl Shared {
    /// The first worker that panicked, if any.
    pub fn panicked(&self) -> Option<(Worker, String)> {
        self.panicked.lock().clone()
    }

    /// When `worker` last finished a round without error.
    pub fn last_success(&self, worker: Worker) -> Option<SystemTime> {
        self.successes.lock().get(&worker).copied()
    }

    /// Records that `worker`'s thread runs (`true`) or ended (`false`).
    pub fn set_running(&self, worker: Worker, running: bool) {
        let mut threads = self.running.lock();
        match threads.iter_mut().find(|(w, _)| *w == worker) {
            Some(entry) => entry.1 = running,
            None => threads.push((worker, running)),
        }
    }

    /// The worker threads started, and whether each still runs.
    pub fn running(&self) -> Vec<(Worker, bool)> {
        self.running.lock().clone()
    }

    /// The threads inside the relay's thread.
    pub fn inner(&self) -> Vec<Worker> {
        self.inner.lock().clone()
    }

    /// Sets the threads inside the relay's thread, which health reports with it.
    pub fn set_inner(&self, workers: &[Worker]) {
        *self.inner.lock() = workers.to_vec();
    }

    /// The last error reported by any worker, and when.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error.lock().clone()
    }

    /// Sets the deadline of the stop about to be signalled.
    pub fn set_stop_deadline(&self, deadline: Instant) {
        *self.stop_deadline.lock() = Some(deadline);
    }
}

impl Signals {
    pub fn new(stop: Receiver<()>, errors: Sender<Error>, shared: Arc<Shared>) -> Signals {
        Signals {
            stop,
            errors,
            shared,
        }
    }

    /// True once the stop signal was given.
    pub fn stopped(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// True once a worker of the relay died: the relay claims nothing more.
    pub fn failed(&self) -> bool {
        self.shared.panicked.lock().is_some()
    }

    /// The latest time a write that fails is worth trying again: `lease_ends` while
    /// running; after the stop signal, also no later than the stop's deadline.
    pub fn retry_until(&self, lease_ends: Instant) -> Instant {
        if !self.stopped() {
            return lease_ends;
        }
        match *self.shared.stop_deadline.lock() {
            Some(deadline) => lease_ends.min(deadline),
            None => lease_ends,
        }
    }

    /// Waits for `duration`, or less if the stop signal comes first.
    pub fn pause(&self, duration: Duration) {
        select! {
            recv(self.stop) -> _ => {},
            recv(after(duration)) -> _ => {},
        }
    }

    /// Waits for `duration`, stop signal or not.
    pub fn wait(duration: Duration) {
        let _ = after(duration).recv();
    }

    /// Records that `worker`'s thread ended.
    pub fn ended(&self, worker: Worker) {
        self.shared.set_running(worker, false);
    }

    /// Records that `worker` finished a round without error.
    pub fn succeeded(&self, worker: Worker) {
        self.shared
            .successes
            .lock()
            .insert(worker, SystemTime::now());
    }

    /// Logs `error` and puts it on the error channel without ever blocking: when nobody
    /// reads the channel and it is full, the error is only logged.
    pub fn report(&self, error: Error) {
        log::warn!("outbox: {error}");
        *self.shared.last_error.lock() = Some((SystemTime::now(), error.to_string()));
        match self.errors.try_send(error) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                log::debug!("outbox error channel is full; error dropped")
            }
        }
    }

    /// Records that `worker` panicked with `text`, logs it and reports it.
    pub fn panicked(&self, worker: Worker, text: String) {
        log::error!("outbox worker {worker} panicked: {text}");
        self.shared
            .panicked
            .lock()
            .get_or_insert_with(|| (worker, text.clone()));
        self.report(Error::WorkerPanicked(worker, text));
    }

    #[cfg(test)]
    pub fn for_test() -> (Signals, Receiver<Error>, Sender<()>) {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let (errors_tx, errors_rx) = crossbeam_channel::bounded(ERROR_CAPACITY);
        (
            Signals::new(stop_rx, errors_tx, Arc::default()),
            errors_rx,
            stop_tx,
        )
    }
}

/// The text of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}
