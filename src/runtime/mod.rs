//! The thread runtime the polling relay, the binlog relay and the inbox consumer share:
//! worker threads spawned under one stop signal, their errors and health, and the handle
//! that stops and joins them.

pub(crate) mod backoff;
mod health;
pub(crate) mod purge;
pub(crate) mod signal;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

pub use self::health::{Health, HealthProbe, WorkerHealth};
use self::signal::{panic_text, Shared, Signals, ERROR_CAPACITY, STOP_RETRY};
use crate::error::{Error, Result, Worker};
use crate::handoff::Handoff;

/// A running dispatcher. [`stop`](DispatcherHandle::stop) it, or drop it, to stop and
/// join its threads.
pub struct DispatcherHandle {
    /// What runs, for the logs: a dispatcher, a binlog relay, an inbox consumer.
    kind: &'static str,
    owner: String,
    stop: Option<Sender<()>>,
    waker: Waker,
    errors: Receiver<Error>,
    threads: Vec<(Worker, JoinHandle<()>)>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DispatcherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherHandle")
            .field("owner", &self.owner)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl DispatcherHandle {
    /// Errors from the workers, as they happen: database errors, failed publishes, a
    /// worker's panic. Workers never block on this channel: when it is full
    /// (1,024 errors) newer errors are only logged.
    pub fn errors(&self) -> &Receiver<Error> {
        &self.errors
    }

    /// True until the dispatcher is stopped or one of its workers dies. A worker that
    /// panicked is reported on [`errors`](DispatcherHandle::errors) and by
    /// [`stop`](DispatcherHandle::stop); when it is the relay, its publisher or its
    /// settler, the relay claims nothing more and releases the rows it held, so the
    /// dispatcher should be stopped and started again (`outbox relay` exits with 1).
    pub fn is_running(&self) -> bool {
        self.stop.is_some()
            && self.shared.panicked().is_none()
            && self.threads.iter().all(|(_, thread)| !thread.is_finished())
    }

    /// The lease owner: the instance id and a random suffix. `MySqlStore` writes it to
    /// `locked_by` as one of [`MySqlStore::leases_of`](crate::MySqlStore::leases_of).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Makes the relay look for messages now instead of at its next `process_interval`.
    /// Call it after committing a transaction that added messages.
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Each worker's health: whether its thread runs and when it last finished a round
    /// without error, and the last error any worker reported. For a service's own health
    /// endpoint; [`Health::is_alive`] is what a liveness check asks.
    pub fn health(&self) -> Health {
        self.health_probe().health()
    }

    /// A cloneable reader of [`health`](DispatcherHandle::health) for other threads, such
    /// as a health endpoint's.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            shared: self.shared.clone(),
        }
    }

    /// A cloneable [`Waker`] for other threads of the application.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Makes the wakers handed out from now on carry `handoff`.
    pub(crate) fn set_handoff(&mut self, handoff: Arc<Handoff>) {
        self.waker.handoff = Some(handoff);
    }

    /// Runs until `stop` gives a value (or is dropped) or a worker dies, then stops as
    /// [`stop`](DispatcherHandle::stop) does: what a process that is only a relay does
    /// with its main thread. Returns the value `stop` gave, if any. Errors that arrive
    /// meanwhile are taken off [`errors`](DispatcherHandle::errors) (they were logged as
    /// they happened).
    ///
    /// # Errors
    ///
    /// [`Error::WorkerPanicked`] when a worker died, or as
    /// [`stop`](DispatcherHandle::stop).
    pub fn run_until<T>(&mut self, stop: &Receiver<T>) -> Result<Option<T>> {
        let checks = crossbeam_channel::tick(Duration::from_millis(200));
        let given = loop {
            crossbeam_channel::select! {
                recv(stop) -> given => break given.ok(),
                recv(self.errors) -> error => match error {
                    Ok(Error::WorkerPanicked(..)) | Err(_) => break None,
                    Ok(_) => {}
                },
                recv(checks) -> _ => if !self.is_running() { break None },
            }
        };
        self.stop()?;
        Ok(given)
    }

    /// Gives the stop signal and joins the threads. The batch being published is settled
    /// first: its publish finishes (when the broker is down this takes up to its delivery
    /// timeout) and its rows are marked, a mark that fails on a database error being
    /// tried again for up to 10 s; batches claimed but not yet published are released
    /// untried. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerPanicked`] for the first worker that panicked while the dispatcher
    /// ran, or whose thread could not be joined.
    pub fn stop(&mut self) -> Result<()> {
        self.signal_stop(None);
        self.join(None)
    }

    /// As [`stop`](DispatcherHandle::stop), within `timeout`: marks that fail are tried
    /// again only until then, and if a thread is still running then (a publish waiting
    /// for an unreachable broker), it returns [`Error::StopTimedOut`]; the threads end by
    /// themselves, and a later `stop` (or dropping the handle) waits for them.
    ///
    /// # Errors
    ///
    /// [`Error::StopTimedOut`], or as [`stop`](DispatcherHandle::stop).
    pub fn stop_timeout(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now().checked_add(timeout);
        self.signal_stop(deadline);
        self.join(deadline.map(|d| (d, timeout)))
    }

    /// Gives the stop signal, once, with the deadline for the writes after it (by
    /// default [`STOP_RETRY`] from now).
    fn signal_stop(&mut self, deadline: Option<Instant>) {
        if let Some(sender) = self.stop.take() {
            let now = Instant::now();
            let deadline = deadline.or_else(|| now.checked_add(STOP_RETRY));
            self.shared.set_stop_deadline(deadline.unwrap_or(now));
            drop(sender);
        }
    }

    /// Joins the threads, waiting at most until `deadline` when there is one.
    fn join(&mut self, deadline: Option<(Instant, Duration)>) -> Result<()> {
        if let Some((deadline, waited)) = deadline {
            while self.threads.iter().any(|(_, t)| !t.is_finished()) {
                if Instant::now() >= deadline {
                    return Err(Error::StopTimedOut { waited });
                }
                Signals::wait(Duration::from_millis(5));
            }
        }
        if self.threads.is_empty() {
            return Ok(());
        }
        let mut result = match self.shared.panicked() {
            Some((worker, text)) => Err(Error::WorkerPanicked(worker, text)),
            None => Ok(()),
        };
        for (worker, thread) in self.threads.drain(..) {
            if thread.join().is_err() && result.is_ok() {
                result = Err(Error::WorkerPanicked(
                    worker,
                    "thread could not be joined".into(),
                ));
            }
        }
        if result.is_ok() {
            log::info!("{} {} stopped", self.kind, self.owner);
        }
        result
    }

    /// A handle with no thread yet for the `kind` of worker named `owner`, the workers'
    /// end of its signals, and the wake-up channel's receiving end.
    pub(crate) fn prepare(
        kind: &'static str,
        owner: String,
    ) -> (DispatcherHandle, Signals, Wakeups) {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (errors_tx, errors_rx) = bounded(ERROR_CAPACITY);
        let (wake_tx, wake_rx) = bounded(1);
        let shared = Arc::new(Shared::default());
        let signals = Signals::new(stop_rx, errors_tx, shared.clone());
        let asked = Arc::new(AtomicBool::new(false));
        let wakeups = Wakeups {
            channel: wake_rx,
            asked: asked.clone(),
        };
        let handle = DispatcherHandle {
            kind,
            owner,
            stop: Some(stop_tx),
            waker: Waker {
                wake: wake_tx,
                asked,
                handoff: None,
            },
            errors: errors_rx,
            threads: Vec::with_capacity(5),
            shared,
        };
        (handle, signals, wakeups)
    }

    /// Whether every thread was joined.
    #[cfg(test)]
    pub(crate) fn joined(&self) -> bool {
        self.threads.is_empty()
    }

    /// Names the threads that live inside the relay's thread, for its health.
    pub(crate) fn relay_threads(&self, workers: &[Worker]) {
        self.shared.set_inner(workers);
    }

    pub(crate) fn spawn(
        &mut self,
        worker: Worker,
        signals: &Signals,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        let signals = signals.clone();
        self.shared.set_running(worker, true);
        let spawned = thread::Builder::new()
            .name(format!("outbox-{worker}"))
            .spawn(move || {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
                    signals.panicked(worker, panic_text(&*panic));
                }
                signals.ended(worker);
            });
        match spawned {
            Ok(thread) => {
                self.threads.push((worker, thread));
                Ok(())
            }
            Err(e) => {
                self.shared.set_running(worker, false);
                let _ = self.stop();
                Err(Error::Thread(e))
            }
        }
    }
}

impl Drop for DispatcherHandle {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        if let Err(e) = self.stop() {
            log::error!("stopping {} {}: {e}", self.kind, self.owner);
        }
    }
}

/// Wakes a dispatcher's relay from any thread; see [`DispatcherHandle::wake`]. Given to
/// [`Outbox::with_waker`](crate::Outbox::with_waker), it also carries the dispatcher's
/// hand-off: see [`DispatcherSettings::hand_off`](crate::DispatcherSettings::hand_off).
#[derive(Debug, Clone)]
pub struct Waker {
    wake: Sender<()>,
    /// Set by [`wake`](Waker::wake): the relay is asked to claim, not only to take what
    /// commits handed over.
    asked: Arc<AtomicBool>,
    handoff: Option<Arc<Handoff>>,
}

impl Waker {
    /// Makes the relay look for messages now. Never blocks.
    pub fn wake(&self) {
        self.asked.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
    }

    /// The dispatcher's hand-off, when it takes one.
    pub(crate) fn handoff(&self) -> Option<&Handoff> {
        self.handoff.as_deref()
    }

    /// Tells the relay that a commit handed rows over. Never blocks.
    pub(crate) fn handed(&self) {
        let _ = self.wake.try_send(());
    }
}

/// What wakes a relay: the channel, and whether a wake-up asked for a claim.
pub(crate) struct Wakeups {
    pub channel: Receiver<()>,
    asked: Arc<AtomicBool>,
}

impl Wakeups {
    /// Whether a wake-up since the last call asked for a claim.
    pub fn asked(&self) -> bool {
        self.asked.swap(false, Ordering::AcqRel)
    }
}
