//! The outbox end to end, against the real MariaDB and the real broker.

mod common;

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use common::gate::{gated_after, stop_signalled};
use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Dispatcher, DispatcherSettings, Message, MySqlStore, Outbox, MESSAGE_ID_HEADER};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn committed_message_arrives_intact_and_row_ends_delivered() {
    let table = TestTable::new("commit");
    let topic = unique("commit");
    let outbox = Outbox::new(&table.store);
    let binary = vec![0u8, 1, 254, 255];
    let message = Message::new(&topic, "payload \u{2713}")
        .with_key("order-42")
        .with_header("event-type", "OrderCreated")
        .with_header("binary", binary.clone())
        .with_header("event-type", "repeated names keep their place");
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let id = outbox.add(&mut tx, &message).unwrap();
    tx.commit().unwrap();

    let handle = table.dispatch(broker(), fast_settings(), "commit");
    let got = consume(&topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(got.len(), 1, "exactly one record: {got:?}");
    let record = &got[0];
    assert_eq!(record.key.as_deref(), Some("order-42"));
    assert_eq!(record.payload, "payload \u{2713}".as_bytes());
    assert_eq!(
        record.headers,
        vec![
            ("event-type".to_string(), b"OrderCreated".to_vec()),
            ("binary".to_string(), binary),
            (
                "event-type".to_string(),
                b"repeated names keep their place".to_vec()
            ),
            (
                MESSAGE_ID_HEADER.to_string(),
                id.hyphenated().to_string().into_bytes()
            ),
        ]
    );
    assert!(
        wait_for(WAIT, || table.count(
            "state = 1 AND processed_on > created_on AND locked_by = 0"
        ) == 1),
        "the row ends delivered with processed_on set"
    );
    drop(handle);
}

#[test]
fn rolled_back_message_is_never_published() {
    let table = TestTable::new("rollback");
    let topic = unique("rollback");
    let outbox = Outbox::new(&table.store);
    let handle = table.dispatch(broker(), fast_settings(), "rollback");

    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    outbox
        .add(&mut tx, &Message::new(&topic, "rolled back"))
        .unwrap();
    tx.rollback().unwrap();
    {
        // A transaction dropped without commit rolls back too.
        let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
        outbox
            .add(&mut tx, &Message::new(&topic, "dropped"))
            .unwrap();
    }
    // Wait well past several process intervals, then commit a sentinel after them.
    thread::sleep(fast_settings().process_interval * 10);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    outbox
        .add(&mut tx, &Message::new(&topic, "committed"))
        .unwrap();
    tx.commit().unwrap();

    let got = consume(&topic, 1, WAIT, fast_settings().process_interval * 10);
    let payloads: Vec<_> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, vec![b"committed".to_vec()]);
    assert_eq!(table.count("1"), 1, "the rolled-back rows never existed");
    drop(handle);
}

#[test]
fn concurrent_dispatchers_publish_each_message_exactly_once() {
    const N: usize = 2_000;
    let table = TestTable::new("concurrent");
    let topic = unique("concurrent");
    // Half keyed (100 keys), half without a key.
    let messages: Vec<Message> = (0..N)
        .map(|i| {
            let m = Message::new(&topic, format!("m{i}"));
            if i % 2 == 0 {
                m.with_key(format!("k{}", i % 200))
            } else {
                m
            }
        })
        .collect();
    let ids = table.commit(&messages);

    let settings = DispatcherSettings {
        batch_size: 50,
        ..fast_settings()
    };
    let handles: Vec<_> = (0..3)
        .map(|i| table.dispatch(broker(), settings.clone(), &format!("d{i}")))
        .collect();
    let got = consume(&topic, N, Duration::from_secs(90), Duration::from_secs(2));
    let counts = id_counts(&got);
    let duplicates: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    assert!(duplicates.is_empty(), "published twice: {duplicates:?}");
    let expected: HashSet<String> = ids.into_iter().collect();
    let published: HashSet<String> = counts.into_keys().collect();
    let missing: Vec<&String> = expected.difference(&published).collect();
    assert!(
        missing.is_empty(),
        "{} of {N} never read; their rows (state, attempts, lease, error): {:?}",
        missing.len(),
        rows_of(&table, &missing)
    );
    assert_eq!(published, expected);
    assert!(wait_for(WAIT, || table.count("state = 1") == N as u64));
    drop(handles);
}

/// The state, attempts, lease and error of the rows of `ids` (hyphenated message ids).
fn rows_of(table: &TestTable, ids: &[&String]) -> Vec<(u8, u32, u64, Option<String>)> {
    let hex: Vec<String> = ids
        .iter()
        .map(|id| format!("UNHEX('{}')", id.replace('-', "")))
        .collect();
    table
        .conn()
        .query(format!(
            "SELECT state, number_of_attempts, locked_by, error FROM `{}` WHERE message_id IN ({})",
            table.name,
            hex.join(", ")
        ))
        .unwrap()
}

#[test]
fn unreachable_broker_makes_message_dead_after_max_attempts() {
    let table = TestTable::new("dead");
    let topic = unique("dead");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    outbox
        .add(&mut tx, &Message::new(&topic, "never arrives"))
        .unwrap();
    tx.commit().unwrap();

    let settings = DispatcherSettings {
        max_attempts: Some(2),
        ..fast_settings()
    };
    // Nothing listens on port 9: every delivery times out.
    let handle = table.dispatch(broker_at("127.0.0.1:9"), settings, "dead");
    assert!(
        wait_for(Duration::from_secs(60), || table.count("state = 2") == 1),
        "the row goes dead"
    );
    assert_eq!(
        table.count("state = 2 AND number_of_attempts = 2 AND error <> '' AND locked_by = 0"),
        1
    );
    assert!(
        handle.errors().try_iter().count() >= 1,
        "the failures were reported"
    );
    drop(handle);
}

#[test]
fn without_a_limit_message_waits_for_the_broker_and_is_then_delivered() {
    let table = TestTable::new("pending");
    let topic = unique("pending");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let id = outbox
        .add(&mut tx, &Message::new(&topic, "eventually"))
        .unwrap();
    tx.commit().unwrap();

    let mut down = table.dispatch(broker_at("127.0.0.1:9"), fast_settings(), "down");
    assert!(
        wait_for(Duration::from_secs(60), || table
            .count("number_of_attempts >= 2")
            == 1),
        "the message is retried"
    );
    down.stop().unwrap();
    assert_eq!(
        table.count("state = 0 AND locked_by = 0"),
        1,
        "still pending, lease released"
    );

    // The broker is back: a dispatcher that reaches it delivers the message.
    let up = table.dispatch(broker(), fast_settings(), "up");
    let got = consume(&topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id(), id.hyphenated().to_string());
    assert!(wait_for(WAIT, || table.count("state = 1") == 1));
    drop(up);
}

#[test]
fn lock_checker_releases_leases_of_a_dead_instance_only_when_expired() {
    let table = TestTable::new("locks");
    let topic = unique("locks");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let stale = outbox.add(&mut tx, &Message::new(&topic, "stale")).unwrap();
    let fresh = outbox.add(&mut tx, &Message::new(&topic, "fresh")).unwrap();
    tx.commit().unwrap();
    // Both rows claimed by an instance that died: one an hour ago, one just now.
    let dead = MySqlStore::leases_of("dead#1").start() + 7;
    table.exec(&format!("UPDATE {{t}} SET locked_by = {dead}, locked_on = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR WHERE payload = 'stale'"));
    table.exec(&format!(
        "UPDATE {{t}} SET locked_by = {dead}, locked_on = UTC_TIMESTAMP(6) WHERE payload = 'fresh'"
    ));

    let settings = DispatcherSettings {
        max_lock_duration: Duration::from_secs(60),
        ..fast_settings()
    };
    let handle = table.dispatch(broker(), settings, "locks");
    let got = consume(&topic, 1, WAIT, Duration::from_secs(1));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message_id(), stale.hyphenated().to_string());
    assert!(wait_for(WAIT, || table
        .count("state = 1 AND payload = 'stale'")
        == 1));
    assert_eq!(
        table.count(&format!(
            "state = 0 AND locked_by = {dead} AND payload = 'fresh'"
        )),
        1,
        "a lease younger than max_lock_duration ({fresh}) is left alone"
    );
    drop(handle);
}

#[test]
fn retention_deletes_old_delivered_rows_and_never_pending_ones() {
    let table = TestTable::new("retention");
    let topic = unique("retention");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let batch = |label: &str, n: usize| {
        (0..n)
            .map(|i| Message::new(&topic, format!("{label}{i}")))
            .collect::<Vec<_>>()
    };
    outbox
        .add_all(&mut tx, &batch("old-delivered", 25))
        .unwrap();
    outbox.add_all(&mut tx, &batch("new-delivered", 3)).unwrap();
    outbox.add_all(&mut tx, &batch("old-pending", 4)).unwrap();
    outbox.add_all(&mut tx, &batch("old-dead", 2)).unwrap();
    tx.commit().unwrap();
    table.exec(
        "UPDATE {t} SET state = 1, processed_on = UTC_TIMESTAMP(6) - INTERVAL 2 DAY, created_on = UTC_TIMESTAMP(6) - INTERVAL 3 DAY \
         WHERE payload LIKE 'old-delivered%'",
    );
    table.exec(
        "UPDATE {t} SET state = 1, processed_on = UTC_TIMESTAMP(6) WHERE payload LIKE 'new-delivered%'",
    );
    // Pending for a year, and not yet due: retention must not touch it, nor the relay.
    table.exec(
        "UPDATE {t} SET created_on = UTC_TIMESTAMP(6) - INTERVAL 1 YEAR, available_on = UTC_TIMESTAMP(6) + INTERVAL 1 DAY \
         WHERE payload LIKE 'old-pending%'",
    );
    table.exec("UPDATE {t} SET state = 2, processed_on = UTC_TIMESTAMP(6) - INTERVAL 2 DAY WHERE payload LIKE 'old-dead%'");

    let settings = DispatcherSettings {
        retention: Duration::from_secs(24 * 3600),
        cleanup_batch_size: 10, // 25 old rows: three chunks
        ..fast_settings()
    };
    let handle = table.dispatch(broker(), settings, "retention");
    assert!(wait_for(WAIT, || table
        .count("payload LIKE 'old-delivered%'")
        == 0));
    thread::sleep(fast_settings().cleanup_interval * 3);
    assert_eq!(table.count("payload LIKE 'new-delivered%'"), 3);
    assert_eq!(table.count("payload LIKE 'old-pending%' AND state = 0"), 4);
    assert_eq!(
        table.count("payload LIKE 'old-dead%'"),
        2,
        "dead rows are kept by default"
    );
    drop(handle);

    // With a dead retention set, old dead rows go too; pending ones still stay.
    let settings = DispatcherSettings {
        dead_retention: Some(Duration::from_secs(3600)),
        ..fast_settings()
    };
    let handle = table.dispatch(broker(), settings, "retention");
    assert!(wait_for(WAIT, || table.count("payload LIKE 'old-dead%'") == 0));
    assert_eq!(table.count("payload LIKE 'old-pending%' AND state = 0"), 4);
    drop(handle);
}

#[test]
fn an_outbox_with_a_waker_wakes_the_relay_when_its_transaction_commits() {
    let table = TestTable::new("waker");
    // After rows, the relay polls again a linger later, then twice as late at each poll
    // that finds nothing, up to two minutes.
    let settings = DispatcherSettings {
        process_interval: Duration::from_secs(120),
        linger: Duration::from_secs(1),
        ..fast_settings()
    };
    // The first message is there at start; once it is delivered the relay sleeps.
    let plain = Outbox::new(&table.store);
    let commit = |outbox: &Outbox, payload: &str| {
        let mut tx = outbox.start_transaction(TxOpts::default()).unwrap();
        tx.add(&Message::new("waker", payload)).unwrap();
        tx.commit().unwrap();
    };
    commit(&plain, "at start");
    let handle = table.dispatch(broker(), settings, "waker");
    // Woken while waiting, so that a first publish that failed is retried before the
    // next poll, two minutes away.
    assert!(wait_for(WAIT, || {
        handle.wake();
        table.count("state = 1") == 1
    }));
    // The claim after the delivery comes a linger later (1 s), then the polls at 2 and
    // 4 s find nothing: past the one at 4 s, the next is at 8 s.
    thread::sleep(Duration::from_millis(4_500));

    commit(&plain, "no waker");
    assert!(
        !wait_for(Duration::from_secs(2), || table.count("state = 1") > 1),
        "without a wake-up the relay waits for its next poll"
    );
    let waking = plain.clone().with_waker(handle.waker());
    commit(&waking, "with a waker");
    assert!(
        wait_for(WAIT, || table.count("state = 1") == 3),
        "the commit woke the relay, which took both"
    );
    drop(handle);
}

#[test]
fn stop_returns_promptly_joined_and_loses_nothing_in_flight() {
    const N: usize = 300;
    let table = TestTable::new("stop");
    let topic = unique("stop");
    let outbox = Outbox::new(&table.store);
    let settings = DispatcherSettings {
        batch_size: 20,
        ..fast_settings()
    };
    // Two batches go through; the third waits at the gate until the stop was given.
    let (gate, entered, go) = gated_after(false, 2);
    let handle = table.dispatch(gate, settings.clone(), "stop1");
    let owner = handle.owner().to_string();
    let mut ids = HashSet::new();
    for chunk in 0..10 {
        let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
        let batch: Vec<_> = (0..N / 10)
            .map(|i| Message::new(&topic, format!("{chunk}-{i}")))
            .collect();
        ids.extend(
            outbox
                .add_all(&mut tx, &batch)
                .unwrap()
                .into_iter()
                .map(|id| id.hyphenated().to_string()),
        );
        tx.commit().unwrap();
        handle.wake();
    }
    let in_flight = entered
        .recv_timeout(WAIT)
        .expect("a third batch is published");
    let in_flight_rows = in_flight.len() as u64;
    let in_flight = format!(
        "id IN ({})",
        in_flight
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(
        table.count(&format!("{in_flight} AND state = 0 AND locked_by <> 0")),
        in_flight_rows,
        "the batch is in flight: leased, not yet delivered"
    );

    // Stop while it is being published; it must come back well within the delivery
    // timeout once the publish returns.
    let probe = handle.health_probe();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stopper = thread::spawn(move || {
        let mut handle = handle;
        let result = handle.stop();
        let _ = done_tx.send(result.is_ok());
        handle
    });
    assert!(
        wait_for(WAIT, || stop_signalled(&probe)),
        "the stop was signalled"
    );
    go.send(()).unwrap();
    let stopped =
        done_rx.recv_timeout(Duration::from_millis(DELIVERY_TIMEOUT_MS) + Duration::from_secs(2));
    assert_eq!(stopped, Ok(true), "stop returned Ok in time");
    let handle = stopper.join().unwrap();
    assert!(
        format!("{handle:?}").contains("running: false"),
        "threads joined"
    );
    assert_eq!(
        table.count(&leased_by(&owner)),
        0,
        "the batch in flight was settled, no row left leased"
    );
    assert_eq!(
        table.count(&format!("{in_flight} AND state = 1")),
        in_flight_rows,
        "the batch in flight at the stop was published and marked"
    );
    let delivered_at_stop = table.count("state = 1");
    assert!(
        delivered_at_stop < N as u64,
        "the stop came mid-drain ({delivered_at_stop} delivered)"
    );
    assert_eq!(
        table.count("state = 0 AND number_of_attempts = 0"),
        N as u64 - delivered_at_stop,
        "the rest went back untried"
    );

    // A new dispatcher delivers the rest; every message arrives exactly once.
    let again = table.dispatch(broker(), settings, "stop2");
    let got = consume(&topic, N, Duration::from_secs(60), Duration::from_secs(1));
    let counts = id_counts(&got);
    assert!(counts.values().all(|&n| n == 1), "no duplicates");
    assert_eq!(counts.into_keys().collect::<HashSet<_>>(), ids);
    assert!(wait_for(WAIT, || table.count("state = 1") == N as u64));
    drop(again);
}

#[test]
fn rows_written_by_hand_with_corrupt_headers_go_dead_without_blocking_others() {
    let table = TestTable::new("corrupt");
    let topic = unique("corrupt");
    let outbox = Outbox::new(&table.store);
    let mut conn = table.conn();
    conn.query_drop(format!(
        "INSERT INTO `{}` (message_id, topic, headers, payload) VALUES (UNHEX(REPLACE(UUID(), '-', '')), '{topic}', '[1, 2]', 'bad')",
        table.name
    ))
    .unwrap();
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    outbox.add(&mut tx, &Message::new(&topic, "good")).unwrap();
    tx.commit().unwrap();

    let handle = table.dispatch(broker(), fast_settings(), "corrupt");
    let got = consume(&topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(
        got.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
        vec![b"good".to_vec()]
    );
    assert!(wait_for(WAIT, || table.count(
        "state = 2 AND payload = 'bad' AND error LIKE 'corrupt row%'"
    ) == 1));
    drop(handle);
}

#[test]
fn dispatcher_recovers_after_its_database_connections_are_killed() {
    let table = TestTable::new("killed");
    let topic = unique("killed");
    // The dispatcher connects as a user of its own, so that only its sessions are killed.
    let user = unique("outbox_kill");
    table.exec(&format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"));
    table.exec(&format!(
        "CREATE USER '{user}'@'localhost' IDENTIFIED BY 'pw'"
    ));
    table.exec(&format!("GRANT ALL ON *.* TO '{user}'@'%'"));
    table.exec(&format!("GRANT ALL ON *.* TO '{user}'@'localhost'"));
    let opts = mysql::Opts::from_url(&database_url()).unwrap();
    let opts = mysql::OptsBuilder::from_opts(opts)
        .user(Some(user.as_str()))
        .pass(Some("pw"));
    let dispatcher_pool = mysql::Pool::new(opts).unwrap();
    let store = outbox::MySqlStore::with_table(dispatcher_pool, &table.name).unwrap();
    let outbox = Outbox::new(&table.store);
    let add = |label: &str| {
        let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
        let batch: Vec<_> = (0..50)
            .map(|i| Message::new(&topic, format!("{label}{i}")))
            .collect();
        outbox.add_all(&mut tx, &batch).unwrap();
        tx.commit().unwrap();
    };

    let handle = Dispatcher::new(store, broker(), fast_settings(), "killed")
        .unwrap()
        .start()
        .unwrap();
    add("before");
    assert!(wait_for(WAIT, || table.count("state = 1") == 50));
    let mut conn = table.conn();
    let sessions: Vec<u64> = conn
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
            (&user,),
        )
        .unwrap();
    assert!(!sessions.is_empty(), "the dispatcher's sessions are open");
    for id in &sessions {
        let _ = conn.query_drop(format!("KILL CONNECTION {id}"));
    }
    add("after");
    assert!(
        wait_for(WAIT, || table.count("state = 1") == 100),
        "the workers reconnect through the pool and deliver what came after"
    );
    let got = consume(&topic, 100, WAIT, Duration::from_millis(500));
    assert_eq!(id_counts(&got).len(), 100);
    drop(handle);
    table.exec(&format!("DROP USER '{user}'@'%'"));
    table.exec(&format!("DROP USER '{user}'@'localhost'"));
}

#[test]
fn stop_with_the_broker_down_waits_for_one_publish_and_releases_the_rest_untried() {
    let table = TestTable::new("stop_down");
    let topic = unique("stop_down");
    let messages: Vec<Message> = (0..60)
        .map(|i| Message::new(&topic, format!("m{i}")))
        .collect();
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    Outbox::new(&table.store)
        .add_all(&mut tx, &messages)
        .unwrap();
    tx.commit().unwrap();
    let settings = DispatcherSettings {
        batch_size: 20,
        ..fast_settings()
    };
    // Nothing listens on port 9: a publish lasts until its messages time out.
    let mut handle = table.dispatch(broker_at("127.0.0.1:9"), settings, "stop_down");
    assert!(
        wait_for(Duration::from_secs(5), || table.count("locked_by <> 0")
            == 60),
        "three batches claimed: one publishing, two waiting"
    );
    handle.stop().unwrap();
    // Had the stop published the waiting batches too, their rows would count an attempt.
    assert_eq!(table.count("locked_by <> 0"), 0, "no lease left behind");
    assert_eq!(
        table.count("state = 0 AND number_of_attempts = 1"),
        20,
        "the batch being published failed and counts an attempt"
    );
    assert_eq!(
        table.count("state = 0 AND number_of_attempts = 0"),
        40,
        "the batches waiting were released untried"
    );
}
