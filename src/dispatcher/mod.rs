//! The dispatcher: the polling relay, which claims committed messages from the table and
//! publishes them, with the workers that keep the table (lock checker, cleaner, gauges).

mod batch;
mod flow;
pub(crate) mod maintenance;
pub(crate) mod relay;
mod renew;
mod settle;
mod take;
#[cfg(test)]
mod testing;

use std::sync::Arc;

use self::relay::Relay;
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};
use crate::handoff::Handoff;
use crate::metrics::Meter;
use crate::runtime::DispatcherHandle;
use crate::settings::DispatcherSettings;
use crate::store::Store;

/// Longest instance id; the lease owner adds a random suffix to it.
pub const MAX_INSTANCE_ID_LEN: usize = 80;

/// Relays committed messages from a [`Store`] to a [`Broker`] on five OS threads:
///
/// - **relay** (`outbox-relay`): claims up to `batch_size` rows; drains back to back
///   while it finds work, then polls again within a millisecond, and less often while
///   it finds nothing, down to once per `process_interval`, unless woken;
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
        let (mut handle, signals, wakeups) =
            DispatcherHandle::prepare("dispatcher", self.owner.clone());
        handle.relay_threads(&[Worker::Publisher, Worker::Settler]);
        let handoff = self
            .settings
            .hand_off
            .then(|| self.store.hand_off_table())
            .flatten()
            .map(|table| Arc::new(Handoff::new(&table)));
        if let Some(handoff) = &handoff {
            // Live once `start` returns: the first commits after it are handed over.
            handoff.start(self.store.hand_off_lease(&self.owner));
            handle.set_handoff(handoff.clone());
        }
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
            handoff,
        };
        let broker = self.broker;
        handle.spawn(Worker::Relay, &signals, move || relay.run(broker, wakeups))?;
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

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Duration;

    use crossbeam_channel::bounded;

    use super::testing::{FakeBroker, FakeStore};
    use super::*;
    use crate::message::Message;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<DispatcherHandle>();
        assert_send_sync::<crate::Waker>();
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
    /// A dispatcher on `store` with a broker that takes everything.
    fn start(store: &Arc<FakeStore>, settings: DispatcherSettings) -> DispatcherHandle {
        Dispatcher::new(
            store.clone(),
            FakeBroker::failing_payloads([]),
            settings,
            "t",
        )
        .unwrap()
        .start()
        .unwrap()
    }

    fn run_until_delivered(
        store: &Arc<FakeStore>,
        settings: DispatcherSettings,
        n: usize,
    ) -> DispatcherHandle {
        let handle = start(store, settings);
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
        assert!(handle.joined());
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
    fn woken_at_every_commit_the_relay_claims_at_most_once_per_linger() {
        let store = Arc::new(FakeStore::with([]));
        let linger = Duration::from_millis(100);
        let settings = DispatcherSettings {
            process_interval: Duration::from_secs(10),
            linger,
            ..Default::default()
        };
        let mut handle = start(&store, settings);
        let waker = handle.waker();
        thread::sleep(Duration::from_millis(50));
        let before = store.claims();
        let started = std::time::Instant::now();
        let messages = 100;
        for i in 0..messages {
            store.add(Message::new("t", format!("{i}")));
            waker.wake();
            thread::sleep(Duration::from_millis(5));
        }
        let streamed = started.elapsed();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.delivered_ids().len() < messages && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let delivered = store.delivered_ids().len();
        let claims = store.claims() - before;
        handle.stop().unwrap();
        assert_eq!(delivered, messages);
        // One claim per linger while the stream lasts, and the last ones after it.
        let most = (streamed.as_millis() / linger.as_millis()) as u64 + 3;
        assert!(
            claims <= most,
            "{claims} claims for {messages} wake-ups in {streamed:?}: more than one per {linger:?}"
        );
        assert!(
            claims >= 3,
            "{claims} claims: the stream was not relayed as it came"
        );
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
        assert_eq!(
            store.empty_claims(),
            0,
            "claims that found nothing while messages were left behind the one in flight"
        );
    }
}
