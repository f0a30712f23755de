//! Faults the outbox survives: an exhausted pool, a broker that goes away and comes back,
//! the database killed mid-drain, host clocks off by minutes. (Lock wait timeouts:
//! `lock_waits.rs`.)

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::private_db::PrivateDatabase;
use common::tansu::Tansu;
use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Error, Message, MySqlStore};

#[test]
fn exhausted_pool_is_reported_and_the_dispatcher_recovers_without_touching_app_transactions() {
    let table = TestTable::new("pool");
    let topic = unique("pool");
    // The dispatcher shares a two-connection pool with the application.
    let url = format!(
        "{}?pool_min=1&pool_max=2",
        database_url().split('?').next().unwrap()
    );
    let shared = mysql::Pool::new(url.as_str()).unwrap();
    let store = MySqlStore::with_table(shared.clone(), &table.name).unwrap();

    // The application holds both connections, each in a transaction of its own.
    let mut app_a = shared.start_transaction(TxOpts::default()).unwrap();
    let mut app_b = shared.start_transaction(TxOpts::default()).unwrap();
    app_a.query_drop(format!("INSERT INTO `{}` (message_id, topic, payload) VALUES (UNHEX(REPLACE(UUID(),'-','')), '{topic}', 'from app a')", table.name)).unwrap();
    app_b.query_drop(format!("INSERT INTO `{}` (message_id, topic, payload) VALUES (UNHEX(REPLACE(UUID(),'-','')), '{topic}', 'from app b')", table.name)).unwrap();

    let ids = table.commit(&[Message::new(&topic, "queued")]);
    let outbox_handle = outbox::Dispatcher::new(store, broker(), fast_settings(), "pool")
        .unwrap()
        .start()
        .unwrap();
    let reported = outbox_handle
        .errors()
        .recv_timeout(Duration::from_secs(20))
        .expect("the exhausted pool is reported");
    assert!(
        matches!(reported, Error::PoolExhausted { .. }),
        "{reported}"
    );
    assert!(reported.is_retryable());
    assert_eq!(
        table.count("state = 1"),
        0,
        "nothing delivered while it had no connection"
    );

    // The application's transactions are still its own: one commits, one rolls back.
    app_a.commit().unwrap();
    app_b.rollback().unwrap();
    assert_eq!(table.count("payload = 'from app a'"), 1);
    assert_eq!(table.count("payload = 'from app b'"), 0);

    let got = consume(
        &topic,
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    let read: HashSet<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(
        read,
        HashSet::from([b"queued".to_vec(), b"from app a".to_vec()])
    );
    assert_eq!(
        got.iter()
            .filter(|r| r.payload == b"queued")
            .map(|r| r.message_id())
            .collect::<Vec<_>>(),
        ids
    );
    drop(outbox_handle);
}

#[test]
fn broker_down_at_start_and_killed_mid_drain_loses_nothing_and_keeps_key_order() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Warn)
        .filter_module("outbox", log::LevelFilter::Debug)
        .try_init();
    let table = TestTable::new("outage");
    let topic = unique("outage");
    let mut kafka = Tansu::on_free_port().unwrap();
    let batch = |from: usize, n: usize| -> Vec<Message> {
        (from..from + n)
            .map(|i| {
                Message::new(&topic, format!("k{}:{i}", i % 20)).with_key(format!("k{}", i % 20))
            })
            .collect()
    };

    // Down before the dispatcher starts: messages wait and back off; errors are reported.
    table.commit(&batch(0, 100));
    let settings = outbox::DispatcherSettings {
        batch_size: 50,
        ..fast_settings()
    };
    let handle = table.dispatch(broker_at(kafka.address()), settings, "outage");
    assert!(
        wait_for(Duration::from_secs(30), || table
            .count("number_of_attempts >= 1")
            > 0),
        "sends are tried and fail"
    );
    assert!(
        handle.errors().try_iter().count() > 0,
        "the outage is reported"
    );
    assert_eq!(table.count("state = 0"), 100);

    // Up: everything goes.
    kafka.start().unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || table.count("state = 1") == 100),
        "delivered once it is up"
    );

    // Killed mid-drain, restarted empty (memory storage) a little later.
    table.commit(&batch(100, 3_000));
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        > 300));
    kafka.kill();
    // Let every batch sent before the kill settle: each row leased now keeps its lease
    // until its publish is over (at most a delivery timeout) and it is marked, delivered
    // if the dead broker acknowledged it. A batch claimed later is sent to no broker.
    let leased: Vec<(u64, u64)> = table
        .conn()
        .query(format!(
            "SELECT id, locked_by FROM `{}` WHERE locked_by <> 0",
            table.name
        ))
        .unwrap();
    let still_held = format!(
        "(id, locked_by) IN ({})",
        leased
            .iter()
            .map(|(id, lease)| format!("({id}, {lease})"))
            .chain(std::iter::once("(0, 0)".to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        wait_for(
            Duration::from_millis(DELIVERY_TIMEOUT_MS) + Duration::from_secs(60),
            || table.count(&still_held) == 0
        ),
        "the batches in flight at the kill were settled"
    );
    // What is still pending now can only reach Kafka through the restarted broker.
    let pending: HashSet<String> = table
        .conn()
        .query_map(
            format!(
                "SELECT HEX(message_id) FROM `{}` WHERE state = 0",
                table.name
            ),
            |hex: String| {
                outbox::uuid::Uuid::parse_str(&hex)
                    .unwrap()
                    .hyphenated()
                    .to_string()
            },
        )
        .unwrap()
        .into_iter()
        .collect();
    assert!(!pending.is_empty(), "killed mid-drain");
    let _ = handle.errors().try_iter().count();
    kafka.start().unwrap();
    assert!(
        wait_for(Duration::from_secs(120), || table.count("state = 1")
            == 3_100),
        "every message is delivered once the broker is back"
    );
    assert_eq!(table.count("state = 2"), 0);

    // The restarted broker holds every message that was pending when it came back, each
    // once, each key's in order. (Messages the first broker acknowledged died with its
    // memory storage; a real Kafka keeps them.)
    let got = consume_from(
        kafka.address(),
        &topic,
        pending.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let counts = id_counts(&got);
    assert!(
        pending.iter().all(|id| counts.contains_key(id)),
        "every pending message arrived"
    );
    assert!(counts.values().all(|&n| n == 1), "none twice");
    let mut last_of_key = std::collections::HashMap::new();
    for record in &got {
        let text = String::from_utf8(record.payload.clone()).unwrap();
        let (key, n) = text.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        if let Some(previous) = last_of_key.insert(key.to_string(), n) {
            assert!(previous < n, "{key}: {n} after {previous}");
        }
    }
    drop(handle);
}

#[test]
fn database_killed_mid_drain_recovers_and_marks_only_what_kafka_acknowledged() {
    let mut database = PrivateDatabase::new();
    database.start();
    let pool = mysql::Pool::new(database.url().as_str()).unwrap();
    let store = MySqlStore::with_table(pool.clone(), "outbox").unwrap();
    store.migrate().unwrap();
    let topic = unique("db_crash");
    let outbox = outbox::Outbox::new(&store);
    // Twenty keys, each with versions 1 to 150 in commit order.
    let messages: Vec<Message> = (0..3_000)
        .map(|i| {
            Message::new(&topic, format!("k{}:{}", i % 20, i / 20 + 1))
                .with_key(format!("k{}", i % 20))
        })
        .collect();
    let mut tx = pool.start_transaction(TxOpts::default()).unwrap();
    let ids: HashSet<String> = outbox
        .add_all(&mut tx, &messages)
        .unwrap()
        .into_iter()
        .map(|id| id.hyphenated().to_string())
        .collect();
    tx.commit().unwrap();
    let direct_url = database.url().split('?').next().unwrap().to_string();
    let count = |condition: &str| -> Option<u64> {
        let mut conn = mysql::Conn::new(direct_url.as_str()).ok()?;
        conn.query_first(format!("SELECT COUNT(*) FROM outbox WHERE {condition}"))
            .ok()?
    };

    // Small batches, so that the drain takes a while and the kill lands inside it.
    let settings = outbox::DispatcherSettings {
        batch_size: 10,
        ..fast_settings()
    };
    let handle = outbox::Dispatcher::new(store, broker(), settings, "db_crash")
        .unwrap()
        .start()
        .unwrap();
    assert!(wait_for(Duration::from_secs(30), || count("state = 1")
        .unwrap_or(0)
        > 300));
    database.kill(); // SIGKILL: no clean shutdown, InnoDB recovers on start
    assert!(
        wait_for(Duration::from_secs(10), || handle
            .errors()
            .try_iter()
            .count()
            > 0),
        "the lost database is reported"
    );
    database.start();
    let delivered_at_restart = count("state = 1").unwrap();
    assert!(
        delivered_at_restart < 3_000,
        "killed mid-drain ({delivered_at_restart} delivered)"
    );
    assert!(
        wait_for(Duration::from_secs(60), || count("state = 1")
            == Some(3_000)),
        "the workers reconnect and deliver everything"
    );

    // Every message arrived; a row is marked delivered only when Kafka has it; a message
    // whose mark the crash lost is sent again, replaying its key's suffix in order.
    let got = consume_ids(
        &topic,
        &ids,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let counts = id_counts(&got);
    assert_eq!(counts.keys().cloned().collect::<HashSet<_>>(), ids);
    let finals = (0..20).map(|k| (format!("k{k}"), 150)).collect();
    assert_commit_order(&versions_read(&got), &finals, true);
    drop(handle);
}

#[test]
fn dispatchers_whose_host_clocks_are_off_by_minutes_neither_steal_nor_stall() {
    // Two relay processes, one with its clock 15 minutes behind and one 15 minutes ahead,
    // both checking leases every 100 ms with a 10 s lease. Were any lease or backoff
    // decision made on the host's clock, the one ahead would take the other's leases as
    // long expired and publish their messages again, and the one behind would take
    // fresh backoffs as far in the future.
    //
    // Only the wall clock is off, and everywhere in the process, as on a host whose
    // clock is wrong. libfaketime shifts the monotonic clock too unless told not to, and
    // then every timed wait (futexes and condition variables wait by the real monotonic
    // clock) waits for ever. And librdkafka waits through glibc's C11 cnd_timedwait,
    // which libfaketime does not see: its deadline comes from the faked wall clock and is
    // waited for by the real one, so a clock set ahead delays each of its timers by the
    // whole offset. A small preloaded shim sends that wait through the pthread function
    // libfaketime translates (tests/support/cnd_timedwait.c).
    let table = TestTable::new("clock");
    let topic = unique("clock");
    // Lingering makes every batch hold its leases for a while; 400 keys let both relays
    // claim at once (a batch holds back only the later rows of its own keys). Each
    // record's timestamp is its relay's clock when it published, so the records say which
    // relay sent them and that its clock was off.
    let properties = ",linger.ms=100,outbox.record.timestamp=publish";
    const SKEW: i64 = 15 * 60 * 1_000;
    let shim = cnd_timedwait_shim();
    let skewed_relay = |instance: &str, offset: &str| {
        let faketime = ["faketime", "--exclude-monotonic", "-f", offset];
        let mut command = relay_command(&table.name, instance, properties, &faketime);
        command
            .env("LD_PRELOAD", &shim)
            .stdin(std::process::Stdio::piped());
        start_relay(command)
    };
    let mut behind = Reaped(skewed_relay("behind", "-15m").0);
    let mut ahead = Reaped(skewed_relay("ahead", "+15m").0);
    let committed_at = now_millis();
    let ids: HashSet<String> = table
        .commit(
            &(0..2_000)
                .map(|i| {
                    Message::new(&topic, format!("k{}:{i}", i % 400))
                        .with_key(format!("k{}", i % 400))
                })
                .collect::<Vec<_>>(),
        )
        .into_iter()
        .collect();

    let got = consume(
        &topic,
        2_000,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let published_by = now_millis();
    let counts = id_counts(&got);
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        ids,
        "everything arrived"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "no lease was taken over: nothing twice"
    );
    // Every record was stamped by a clock 15 minutes off, and both relays published.
    let (mut by_behind, mut by_ahead) = (0, 0);
    for record in &got {
        let stamp = record.timestamp.expect("a timestamp");
        if (committed_at - SKEW..=published_by - SKEW).contains(&stamp) {
            by_behind += 1;
        } else if (committed_at + SKEW..=published_by + SKEW).contains(&stamp) {
            by_ahead += 1;
        } else {
            panic!("a record stamped {stamp}, by neither skewed clock");
        }
    }
    assert!(
        by_behind > 0 && by_ahead > 0,
        "both relays published: {by_behind} behind, {by_ahead} ahead"
    );
    assert!(wait_for(Duration::from_secs(10), || table
        .count("state = 1")
        == 2_000));
    for Reaped(relay) in [&mut behind, &mut ahead] {
        drop(relay.stdin.take());
        assert!(relay.wait().unwrap().success());
    }
}

/// The shim of tests/support/cnd_timedwait.c, built with the C compiler (`CC`, or `cc`)
/// into the build's directory; its path.
fn cnd_timedwait_shim() -> std::path::PathBuf {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/cnd_timedwait.c");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let library = dir.join(format!("{}.so", unique("cnd_timedwait")));
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("{compiler} runs: {e}"));
    assert!(built.success(), "{compiler} builds {source}");
    library
}

/// Milliseconds since 1970 by this process's clock.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
