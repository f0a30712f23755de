//! The dispatcher: worker threads that relay committed messages to the broker.

pub(crate) mod backoff;
mod health;
pub(crate) mod maintenance;
pub(crate) mod relay;
pub(crate) mod signal;
#[cfg(test)]
mod testing;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

pub use self::health::{Health, HealthProbe, WorkerHealth};
use self::relay::Relay;
use self::signal::{panic_text, Shared, Signals, ERROR_CAPACITY, STOP_RETRY};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::metrics::Meter;
use crate::settings::DispatcherSettings;
use crate::store::Store;

/// Longest instance id; the lease owner adds a random suffix to it.
pub const MAX_INSTANCE_ID_LEN: usize = 80;

/// Relays committed messages from a [`Store`] to a [`Broker`] on five OS threads:
///
/// - **relay** (`outbox-relay`): claims up to `batch_size` rows; drains back to back
///   while it finds work, then waits for the next `process_interval` or a wake-up;
/// - **publisher** (`outbox-publisher`, the relay's): publishes one batch while the relay
///   claims the next;
/// - **settler** (`outbox-settler`, the relay's): marks each row of a published batch by
///   its own delivery report, batch after batch in claim order;
/// - **lock checker** (`outbox-lock-checker`): releases leases older than
///   `max_lock_duration`, left by a dispatcher that died;
/// - **cleaner** (`outbox-cleaner`): deletes delivered rows past `retention`.
///
/// Any number of dispatchers, in one process or many, can share a table.
///
/// ```no_run
/// # fn main() -> outbox::Result<()> {
/// use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, MySqlStore};
///
/// let store = MySqlStore::new(mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?);
/// let broker = KafkaBroker::new("127.0.0.1:9092")?;
/// let mut handle = Dispatcher::new(store, broker, DispatcherSettings::default(), "billing-1")?.start()?;
/// // ... the application runs; errors arrive on handle.errors() ...
/// handle.stop()?;
/// # Ok(()) }
/// ```
pub struct Dispatcher<S, B> {
    store: S,
    broker: B,
    settings: DispatcherSettings,
    owner: String,
}

impl<S: Store, B: Broker> Dispatcher<S, B> {
    /// A dispatcher named `instance_id` (1 to 80 characters, no control characters; it
    /// is the lease owner with a random suffix, so restarts and duplicates of the same
    /// name never share leases).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for invalid settings (see [`DispatcherSettings::validate`]), a
    /// `max_lock_duration` too short for the broker's delivery timeout, or a bad instance id.
    pub fn new(
        store: S,
        broker: B,
        settings: DispatcherSettings,
        instance_id: &str,
    ) -> Result<Dispatcher<S, B>> {
        settings.validate(broker.delivery_timeout())?;
        let owner = lease_owner(instance_id)?;
        Ok(Dispatcher {
            store,
            broker,
            settings,
            owner,
        })
    }

    /// Checks the store ([`Store::check`]), has it end sessions idle longer than a
    /// lease ([`Store::end_idle_sessions_after`]), spawns the worker threads and returns
    /// their handle.
    ///
    /// # Errors
    ///
    /// What [`Store::check`] refuses for good (for `MySqlStore`: [`Error::Config`] for a
    /// server that would refuse every claim, such as `binlog_format = STATEMENT`), before
    /// any thread starts; a check that could not reach the database is only logged, and
    /// the workers go on as through any outage. [`Error::Thread`] if the system refuses a
    /// thread, and then no thread is left running.
    pub fn start(self) -> Result<DispatcherHandle> {
        match self.store.check() {
            Err(e) if e.is_retryable() => {
                log::warn!("dispatcher {}: could not check the store: {e}", self.owner)
            }
            checked => checked?,
        }
        self.store
            .end_idle_sessions_after(self.settings.max_lock_duration);
        let (mut handle, signals, wake_rx) =
            DispatcherHandle::prepare("dispatcher", self.owner.clone());
        handle.relay_threads(&[Worker::Publisher, Worker::Settler]);
        let store = Arc::new(self.store);
        log::info!("dispatcher {} starting", self.owner);
        let meter = Meter::new(&self.owner);
        let relay = Relay {
            store: store.clone(),
            settings: self.settings.clone(),
            owner: self.owner,
            signals: signals.clone(),
            held: Default::default(),
            meter: meter.clone(),
        };
        let broker = self.broker;
        handle.spawn(Worker::Relay, &signals, move || relay.run(broker, wake_rx))?;
        handle.spawn_maintenance(store, &self.settings, &signals, &meter)?;
        Ok(handle)
    }
}

/// The lease owner of a dispatcher named `instance_id`: the name and a random suffix.
///
/// # Errors
///
/// [`Error::Config`] for a name that is empty, longer than [`MAX_INSTANCE_ID_LEN`] or
/// holds control characters.
pub(crate) fn lease_owner(instance_id: &str) -> Result<String> {
    if instance_id.is_empty()
        || instance_id.chars().count() > MAX_INSTANCE_ID_LEN
        || instance_id.chars().any(char::is_control)
    {
        return Err(Error::config(format!(
            "instance id {instance_id:?} must be 1 to {MAX_INSTANCE_ID_LEN} characters with no control characters"
        )));
    }
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    Ok(format!("{instance_id}#{}", &suffix[suffix.len() - 8..]))
}

/// A running dispatcher. [`stop`](DispatcherHandle::stop) it, or drop it, to stop and
/// join its threads.
pub struct DispatcherHandle {
    /// What runs, for the logs: a dispatcher, a binlog relay, an inbox consumer.
    kind: &'static str,
    owner: String,
    stop: Option<Sender<()>>,
    wake: Sender<()>,
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
        let _ = self.wake.try_send(());
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
        Waker(self.wake.clone())
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
    ) -> (DispatcherHandle, Signals, Receiver<()>) {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (errors_tx, errors_rx) = bounded(ERROR_CAPACITY);
        let (wake_tx, wake_rx) = bounded(1);
        let shared = Arc::new(Shared::default());
        let signals = Signals::new(stop_rx, errors_tx, shared.clone());
        let handle = DispatcherHandle {
            kind,
            owner,
            stop: Some(stop_tx),
            wake: wake_tx,
            errors: errors_rx,
            threads: Vec::with_capacity(5),
            shared,
        };
        (handle, signals, wake_rx)
    }

    /// Names the threads that live inside the relay's thread, for its health.
    pub(crate) fn relay_threads(&self, workers: &[Worker]) {
        self.shared.set_inner(workers);
    }

    /// Spawns the workers that keep the table: the lock checker, the cleaner and, when
    /// `gauge_interval` is set, the gauges.
    pub(crate) fn spawn_maintenance<S: Store>(
        &mut self,
        store: Arc<S>,
        settings: &DispatcherSettings,
        signals: &Signals,
        meter: &Meter,
    ) -> Result<()> {
        let (s, settings_, sig, m) = (
            store.clone(),
            settings.clone(),
            signals.clone(),
            meter.clone(),
        );
        self.spawn(Worker::LockChecker, signals, move || {
            maintenance::run_lock_checker(s, settings_, sig, m)
        })?;
        let (s, settings_, sig, m) = (
            store.clone(),
            settings.clone(),
            signals.clone(),
            meter.clone(),
        );
        self.spawn(Worker::Cleaner, signals, move || {
            maintenance::run_cleaner(s, settings_, sig, m)
        })?;
        if let Some(interval) = settings.gauge_interval {
            let (sig, m) = (signals.clone(), meter.clone());
            self.spawn(Worker::Gauges, signals, move || {
                maintenance::run_gauges(store, interval, sig, m)
            })?;
        }
        Ok(())
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

/// Wakes a dispatcher's relay from any thread; see [`DispatcherHandle::wake`].
#[derive(Debug, Clone)]
pub struct Waker(Sender<()>);

impl Waker {
    /// Makes the relay look for messages now. Never blocks.
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::testing::{FakeBroker, FakeStore};
    use super::*;
    use crate::message::Message;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<DispatcherHandle>();
        assert_send_sync::<Waker>();
        assert_send_sync::<crate::MySqlStore>();
        assert_send_sync::<crate::Outbox>();
        assert_send_sync::<crate::Error>();
    }

    #[test]
    fn refuses_bad_instance_ids() {
        for id in ["", "a\nb", &"x".repeat(MAX_INSTANCE_ID_LEN + 1)] {
            let result = Dispatcher::new(
                FakeStore::default(),
                FakeBroker::failing_payloads([]),
                DispatcherSettings::default(),
                id,
            );
            assert!(matches!(result, Err(Error::Config(_))), "{id:?}");
        }
    }

    #[test]
    fn owners_differ_for_the_same_instance_id() {
        let a = Dispatcher::new(
            FakeStore::default(),
            FakeBroker::failing_payloads([]),
            DispatcherSettings::default(),
            "x",
        )
        .unwrap();
        let b = Dispatcher::new(
            FakeStore::default(),
            FakeBroker::failing_payloads([]),
            DispatcherSettings::default(),
            "x",
        )
        .unwrap();
        assert_ne!(a.owner, b.owner);
        assert!(a.owner.starts_with("x#"));
    }

    /// A started dispatcher on `store` and a broker that takes everything, once `n` rows
    /// are delivered (or 5 s have passed).
    fn run_until_delivered(
        store: &Arc<FakeStore>,
        settings: DispatcherSettings,
        n: usize,
    ) -> DispatcherHandle {
        let dispatcher = Dispatcher::new(
            store.clone(),
            FakeBroker::failing_payloads([]),
            settings,
            "t",
        )
        .unwrap();
        let handle = dispatcher.start().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.delivered_ids().len() < n && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        handle
    }

    #[test]
    fn delivers_everything_then_stops_joined() {
        let messages =
            (0..30).map(|i| Message::new("t", format!("{i}")).with_key(format!("k{}", i % 3)));
        let store = Arc::new(FakeStore::with(messages));
        let settings = DispatcherSettings {
            process_interval: Duration::from_millis(10),
            ..Default::default()
        };
        let mut handle = run_until_delivered(&store, settings, 30);
        handle.stop().unwrap();
        assert_eq!(store.delivered_ids(), (1..=30).collect::<Vec<_>>());
        assert!(handle.threads.is_empty());
        handle.stop().unwrap();
    }

    /// A broker whose publish panics.
    struct PanickingBroker;

    impl Broker for PanickingBroker {
        fn publish(&mut self, _records: &[crate::Record]) -> Vec<Result<()>> {
            panic!("injected");
        }

        fn delivery_timeout(&self) -> Duration {
            Duration::from_secs(1)
        }
    }

    #[test]
    fn run_until_returns_the_stop_request_or_the_death_of_a_worker() {
        let store = Arc::new(FakeStore::with([Message::new("t", "m")]));
        let settings = DispatcherSettings {
            process_interval: Duration::from_millis(10),
            ..Default::default()
        };
        let mut handle = Dispatcher::new(store.clone(), PanickingBroker, settings.clone(), "p")
            .unwrap()
            .start()
            .unwrap();
        match handle.run_until(&crossbeam_channel::never::<()>()) {
            Err(Error::WorkerPanicked(Worker::Publisher, text)) => assert_eq!(text, "injected"),
            other => panic!("a dead publisher ends the run: {other:?}"),
        }
        assert!(!handle.is_running());

        let mut handle = Dispatcher::new(store, FakeBroker::failing_payloads([]), settings, "q")
            .unwrap()
            .start()
            .unwrap();
        let (stop_tx, stop_rx) = bounded(1);
        stop_tx.send("SIGTERM").unwrap();
        assert_eq!(handle.run_until(&stop_rx).unwrap(), Some("SIGTERM"));
        assert!(!handle.is_running());
    }

    #[test]
    fn a_claim_that_left_nothing_to_take_waits_for_a_settle_not_a_rescan() {
        // One key, one message a batch: each claim leaves the next message behind the one
        // in flight, so claiming again before it is settled would find nothing.
        let messages = (0..30).map(|i| Message::new("t", format!("{i}")).with_key("k"));
        let store = Arc::new(FakeStore::with(messages));
        let settings = DispatcherSettings {
            batch_size: 1,
            process_interval: Duration::from_secs(10),
            ..Default::default()
        };
        let mut handle = run_until_delivered(&store, settings, 30);
        handle.stop().unwrap();
        assert_eq!(store.delivered_ids().len(), 30);
        assert!(
            store.empty_claims() <= 1,
            "{} claims found nothing; only the last one should",
            store.empty_claims()
        );
    }
}
