//! An application that holds outbox rows locked past the server's lock wait timeout:
//! the dispatchers' statements that wait on them time out, are reported as retryable and
//! tried again; nothing is lost or sent twice.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::private_db::PrivateDatabase;
use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Error, Message, MySqlStore};

#[test]
fn lock_wait_timeouts_from_an_application_holding_outbox_rows_are_retried_never_fatal() {
    // A private server whose lock waits time out after 1 s. Meanwhile an application
    // thread keeps locking the oldest pending rows (leased ones included) for 1.5 s at a
    // time, writers keep adding, and two dispatchers drain: their claims skip the rows
    // and hold back those keys, and marks that meet the locks wait and time out. So that
    // one surely does, the application also locks the first batch one dispatcher
    // publishes, before its mark.
    let mut database = PrivateDatabase::new();
    database.start();
    let pool = mysql::Pool::new(database.url().as_str()).unwrap();
    let store = MySqlStore::with_table(pool.clone(), "outbox").unwrap();
    store.migrate().unwrap();
    let topic = unique("lock_wait");
    let outbox = outbox::Outbox::new(&store);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let meddler = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut tx) = pool.start_transaction(TxOpts::default()) else {
                    continue;
                };
                let rows: Vec<u64> = tx
                    .query("SELECT id FROM outbox WHERE state = 0 ORDER BY id LIMIT 20 FOR UPDATE")
                    .unwrap_or_default();
                if rows.is_empty() {
                    // Drained for now: look again soon, so as not to miss the next rows.
                    let _ = tx.rollback();
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                held += rows.len();
                std::thread::sleep(Duration::from_millis(1_500));
                let _ = tx.rollback();
                std::thread::sleep(Duration::from_millis(500));
            }
            held
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for round in 0..25 {
                    // Spread the writes over a few seconds, so that the application's
                    // locks meet rows in flight, however fast the dispatchers drain.
                    std::thread::sleep(Duration::from_millis(100));
                    let batch: Vec<Message> = (0..20)
                        .map(|i| {
                            Message::new(&topic, format!("w{w}:{round}:{i}"))
                                .with_key(format!("w{w}-{}", i % 10))
                        })
                        .collect();
                    loop {
                        let mut tx = pool.start_transaction(TxOpts::default()).unwrap();
                        match outbox
                            .add_all(&mut tx, &batch)
                            .and_then(|ids| Ok(tx.commit().map(|_| ids)?))
                        {
                            Ok(new) => {
                                ids.extend(new.into_iter().map(|id| id.hyphenated().to_string()));
                                break;
                            }
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => panic!("writer {w}: {e}"),
                        }
                    }
                }
                ids
            })
        })
        .collect();
    let settings = outbox::DispatcherSettings {
        batch_size: 20,
        ..fast_settings()
    };
    let locked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let locking = LockAfterFirstPublish {
        inner: broker(),
        pool: pool.clone(),
        done: false,
        locked: locked.clone(),
    };
    let mut handles =
        vec![
            outbox::Dispatcher::new(store.clone(), locking, settings.clone(), "lw0")
                .unwrap()
                .start()
                .unwrap(),
        ];
    // The second dispatcher starts once the first has published a batch and the
    // application locked it: otherwise the second may take every row, and the first
    // never publish.
    assert!(
        wait_for(Duration::from_secs(60), || locked
            .load(std::sync::atomic::Ordering::SeqCst)),
        "the application locked the first batch published"
    );
    handles.push(
        outbox::Dispatcher::new(store.clone(), broker(), settings.clone(), "lw1")
            .unwrap()
            .start()
            .unwrap(),
    );

    let ids: HashSet<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 2_000);
    let got = consume(
        &topic,
        2_000,
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        meddler.join().unwrap() > 0,
        "the application did hold outbox rows"
    );
    let counts = id_counts(&got);
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        ids,
        "nothing lost"
    );
    assert!(counts.values().all(|&n| n == 1), "nothing twice");

    let errors: Vec<Error> = handles
        .iter()
        .flat_map(|h| h.errors().try_iter().collect::<Vec<_>>())
        .collect();
    let lock_waits: Vec<&Error> = errors
        .iter()
        .filter(|e| matches!(e, Error::Database(mysql::Error::MySqlError(m)) if m.code == 1205))
        .collect();
    assert!(
        !lock_waits.is_empty(),
        "lock wait timeouts were reported: {errors:?}"
    );
    assert!(lock_waits.iter().all(|e| e.is_retryable()));
    drop(handles);
}

/// A Kafka broker after whose first successful publish an application locks the batch's
/// rows (`FOR UPDATE`, for 4 s) before the publish returns: the dispatcher's mark of
/// that batch then waits on the lock, past a 1 s lock wait timeout, even when it starts
/// late (the settler still marking a batch the application held up before).
struct LockAfterFirstPublish {
    inner: outbox::KafkaBroker,
    pool: mysql::Pool,
    done: bool,
    /// Set once the batch is locked.
    locked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl outbox::Broker for LockAfterFirstPublish {
    fn publish(&mut self, records: &[outbox::Record]) -> Vec<outbox::Result<()>> {
        let outcomes = self.inner.publish(records);
        if self.done || records.is_empty() || outcomes.iter().any(|o| o.is_err()) {
            return outcomes;
        }
        self.done = true;
        let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
        let (locked_tx, locked_rx) = crossbeam_channel::bounded(1);
        let pool = self.pool.clone();
        let locked = self.locked.clone();
        std::thread::spawn(move || {
            // The application's other thread may hold some of these rows (up to 1.5 s):
            // a lock wait that times out fails the statement, and is tried again until
            // every row is locked. (`query_drop` would let such a failure pass unseen:
            // the error comes in the middle of the rows.)
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let tx = loop {
                let mut tx = pool.start_transaction(TxOpts::default()).unwrap();
                let rows: mysql::Result<Vec<u64>> = tx.query(format!(
                    "SELECT id FROM outbox WHERE id IN ({}) FOR UPDATE",
                    ids.join(", ")
                ));
                match rows {
                    Ok(rows) if rows.len() == ids.len() => break tx,
                    other => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the application locks the batch: {other:?}"
                        );
                        let _ = tx.rollback();
                    }
                }
            };
            locked.store(true, std::sync::atomic::Ordering::SeqCst);
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(4_000));
            tx.rollback().unwrap();
        });
        locked_rx.recv().unwrap();
        outcomes
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}
