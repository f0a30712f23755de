//! A dispatcher's life: a worker that dies stops the relay and releases its leases,
//! and a stop settles what Kafka acknowledged even when marking it fails at first.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gate::{gated, stop_signalled};
use common::*;
use outbox::{Claim, Error, Failure, Message, MySqlStore, Store, Worker};

/// The real store, with marks that fail (a lost connection) or panic when told to.
struct FlakyStore {
    inner: MySqlStore,
    failing_marks: AtomicU32,
    panicking_mark: AtomicBool,
}

impl FlakyStore {
    fn new(table: &TestTable) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner: table.store.clone(),
            failing_marks: AtomicU32::new(0),
            panicking_mark: AtomicBool::new(false),
        })
    }
}

impl Store for FlakyStore {
    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> outbox::Result<Claim> {
        self.inner.claim(owner, limit, dead_blocks_key)
    }

    fn mark_delivered(&self, lease: u64, ids: &[u64]) -> outbox::Result<u64> {
        if self.panicking_mark.swap(false, Ordering::SeqCst) {
            panic!("injected settler panic");
        }
        let failing = self
            .failing_marks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected");
            return Err(Error::Database(mysql::Error::IoError(io)));
        }
        self.inner.mark_delivered(lease, ids)
    }

    fn mark_failed(&self, lease: u64, failures: &[Failure]) -> outbox::Result<u64> {
        self.inner.mark_failed(lease, failures)
    }

    fn release(&self, lease: u64, ids: &[u64]) -> outbox::Result<u64> {
        self.inner.release(lease, ids)
    }

    fn renew(&self, lease: u64, ids: &[u64]) -> outbox::Result<u64> {
        self.inner.renew(lease, ids)
    }

    fn release_expired(&self, older_than: Duration) -> outbox::Result<u64> {
        self.inner.release_expired(older_than)
    }

    fn purge_delivered(&self, older_than: Duration, limit: usize) -> outbox::Result<u64> {
        self.inner.purge_delivered(older_than, limit)
    }

    fn purge_dead(&self, older_than: Duration, limit: usize) -> outbox::Result<u64> {
        self.inner.purge_dead(older_than, limit)
    }
}

/// The first `WorkerPanicked` on `handle`'s error channel within 10 s.
fn panicked_worker(handle: &outbox::DispatcherHandle) -> (Worker, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(error) = handle.errors().recv_deadline(deadline) {
        if let Error::WorkerPanicked(worker, text) = error {
            return (worker, text);
        }
    }
    panic!("no worker panic was reported");
}

/// After a worker died: the relay is not running, holds no lease, and claims nothing
/// more; its stop reports the panic.
fn assert_died_cleanly(table: &TestTable, mut handle: outbox::DispatcherHandle, worker: Worker) {
    assert!(
        wait_for(Duration::from_secs(5), || !handle.is_running()),
        "the handle shows the dispatcher is not running"
    );
    assert!(
        wait_for(Duration::from_secs(5), || table.count("locked_by <> 0")
            == 0),
        "every lease the relay held was released"
    );
    // Twenty polls later, still nothing leased: the relay claims no more.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(table.count("locked_by <> 0"), 0, "no claim after the death");
    match handle.stop() {
        Err(Error::WorkerPanicked(w, _)) => assert_eq!(w, worker),
        other => panic!("stop reports the panic, got {other:?}"),
    }
    assert!(handle.stop().is_ok(), "a second stop does nothing");
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(unique("life"), format!("m{i}")).with_key(format!("k{}", i % 4)))
        .collect()
}

#[test]
fn a_publisher_that_panics_stops_the_relay_and_releases_every_lease() {
    let table = TestTable::new("publisher_dies");
    table.commit(&messages(40));
    let (broker, entered, _go) = gated(true);
    let settings = outbox::DispatcherSettings {
        batch_size: 5,
        ..fast_settings()
    };
    let handle = table.dispatch(broker, settings, "publisher-dies");
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let (worker, text) = panicked_worker(&handle);
    assert_eq!(worker, Worker::Publisher);
    assert!(text.contains("injected publisher panic"), "{text}");
    assert_died_cleanly(&table, handle, Worker::Publisher);
    assert_eq!(table.count("state = 0"), 40, "nothing was lost or marked");
}

#[test]
fn a_settler_that_panics_stops_the_relay_and_releases_every_lease() {
    let table = TestTable::new("settler_dies");
    table.commit(&messages(40));
    let store = FlakyStore::new(&table);
    store.panicking_mark.store(true, Ordering::SeqCst);
    let (broker, _entered, go) = gated(false);
    for _ in 0..100 {
        go.send(()).unwrap();
    }
    let settings = outbox::DispatcherSettings {
        batch_size: 5,
        ..fast_settings()
    };
    let handle = outbox::Dispatcher::new(store, broker, settings, "settler-dies")
        .unwrap()
        .start()
        .unwrap();
    let (worker, text) = panicked_worker(&handle);
    assert_eq!(worker, Worker::Settler);
    assert!(text.contains("injected settler panic"), "{text}");
    assert_died_cleanly(&table, handle, Worker::Settler);
    assert_eq!(
        table.count("state = 0"),
        40,
        "the batch being marked went back to pending, to be published again"
    );
}

#[test]
fn marks_that_fail_during_stop_are_tried_again_not_dropped() {
    let table = TestTable::new("stop_marks");
    table.commit(&messages(5));
    let store = FlakyStore::new(&table);
    let (broker, entered, go) = gated(false);
    let mut handle = outbox::Dispatcher::new(store.clone(), broker, fast_settings(), "stop-marks")
        .unwrap()
        .start()
        .unwrap();
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(table.count("locked_by <> 0"), 5, "the batch is in flight");
    // The stop comes while the batch is being published (the gate opens only once the
    // stop was signalled); its first two marks fail.
    store.failing_marks.store(2, Ordering::SeqCst);
    let probe = handle.health_probe();
    let opener = std::thread::spawn(move || {
        let signalled = wait_for(Duration::from_secs(10), || stop_signalled(&probe));
        go.send(()).unwrap();
        signalled
    });
    handle.stop().unwrap();
    assert!(
        opener.join().unwrap(),
        "the stop was signalled before the publish returned"
    );
    assert_eq!(store.failing_marks.load(Ordering::SeqCst), 0, "both failed");
    assert_eq!(
        table.count("state = 1 AND locked_by = 0"),
        5,
        "what Kafka acknowledged was marked, not left to be sent again"
    );
    let reported = handle
        .errors()
        .try_iter()
        .filter(|e| matches!(e, Error::Database(_)))
        .count();
    assert_eq!(reported, 2, "each failed mark was reported");
}

#[test]
fn a_stop_with_a_deadline_returns_by_it_and_a_later_stop_joins() {
    let table = TestTable::new("stop_deadline");
    table.commit(&messages(5));
    let (broker, entered, go) = gated(false);
    let mut handle = table.dispatch(broker, fast_settings(), "stop-deadline");
    entered.recv_timeout(Duration::from_secs(10)).unwrap();

    // The publish in flight waits for the gate: the threads cannot end by the deadline.
    let started = Instant::now();
    let stopped = handle.stop_timeout(Duration::from_millis(500));
    assert!(
        matches!(stopped, Err(Error::StopTimedOut { .. })),
        "{stopped:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it returned by its deadline"
    );

    go.send(()).unwrap();
    handle.stop().unwrap();
    assert!(!handle.is_running());
    assert_eq!(
        table.count("state = 1 AND locked_by = 0"),
        5,
        "the publish in flight was settled after all"
    );
}
