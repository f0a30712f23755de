//! The binlog relay, on a private MariaDB and a private MySQL with the binary log on, each
//! test on both (modules `on_mariadb` and `on_mysql`): every committed message
//! published and none rolled back, per-key order under concurrent writers, a relay killed
//! and restarted, a standby taking over, a rotated and purged binary log, and the server
//! settings it refuses to start without.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::gate::SlowBroker;
use common::logs::Logs;
use common::private_db::{PrivateDatabase, Server};
use common::proxy::{CloseOnDrop, Proxy};
use common::*;
use mysql::prelude::Queryable;
use outbox::binlog::{BinlogRelay, BinlogSettings, POSITION_TABLE};
use outbox::{DispatcherHandle, Error, MySqlStore, Outbox, Worker};

/// A private server that writes a row-based binary log.
fn binlog_database(server: Server) -> PrivateDatabase {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut db = PrivateDatabase::of(server);
    db.options = vec![
        "--log-bin=mysql-bin".into(),
        "--binlog-format=ROW".into(),
        "--server-id=1".into(),
    ];
    db.start();
    db
}

/// A private binlog server with a fresh outbox table and a topic of the test's own.
struct Fixture {
    /// The server, which stops when dropped.
    db: PrivateDatabase,
    url: String,
    pool: mysql::Pool,
    store: MySqlStore,
    table: String,
    topic: String,
}

fn fixture(server: Server, prefix: &str) -> Fixture {
    let db = binlog_database(server);
    let url = db.url();
    let (pool, store, table) = outbox_table(&url, prefix);
    Fixture {
        db,
        url,
        pool,
        store,
        table,
        topic: unique(prefix),
    }
}

/// A fresh outbox table on `url`'s server.
fn outbox_table(url: &str, prefix: &str) -> (mysql::Pool, MySqlStore, String) {
    let pool = mysql::Pool::new(url).unwrap();
    let name = unique(prefix);
    let store = MySqlStore::with_table(pool.clone(), &name).unwrap();
    store.migrate().unwrap();
    (pool, store, name)
}

fn start_relay(url: &str, table: &str, instance: &str) -> outbox::Result<DispatcherHandle> {
    BinlogRelay::new(
        mysql::Opts::from_url(url).unwrap(),
        table,
        broker(),
        fast_settings(),
        BinlogSettings::default(),
        instance,
    )?
    .start()
}

/// `outbox relay --source binlog` on the private server; what it logs (the outbox's
/// lines from `info` up, unless `RUST_LOG` says otherwise).
fn relay_process(url: &str, table: &str, instance: &str) -> (std::process::Child, String, Logs) {
    relay_process_with(url, table, instance, "", &[])
}

/// As [`relay_process`], with further Kafka `properties` (`,name=value...`) and `env`.
fn relay_process_with(
    url: &str,
    table: &str,
    instance: &str,
    properties: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, String, Logs) {
    let mut command = relay_command(table, instance, properties, &[]);
    command
        .env("OUTBOX_DATABASE_URL", url)
        .env("OUTBOX_SOURCE", "binlog")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,outbox=info".into()),
        )
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (mut child, owner) = common::start_relay(command);
    let logs = Logs::capture(child.stderr.take().unwrap(), instance);
    (child, owner, logs)
}

/// Waits until the relay of `table` saved a position: it follows the binary log.
fn wait_until_following(pool: &mysql::Pool, table: &str) {
    assert!(
        wait_for(Duration::from_secs(30), || count(
            pool,
            POSITION_TABLE,
            &format!("outbox_table = '{table}'")
        ) == 1),
        "the relay follows the binary log"
    );
}

/// Waits up to a minute until `n` rows of `table` are delivered; whether they were.
fn delivered(pool: &mysql::Pool, table: &str, n: u64) -> bool {
    wait_for(Duration::from_secs(60), || {
        count(pool, table, "state = 1") == n
    })
}

/// The payloads read, as text.
fn payloads(got: &[Consumed]) -> Vec<String> {
    got.iter()
        .map(|c| String::from_utf8_lossy(&c.payload).into_owned())
        .collect()
}

fn count(pool: &mysql::Pool, table: &str, condition: &str) -> u64 {
    pool.get_conn()
        .unwrap()
        .query_first(format!("SELECT COUNT(*) FROM `{table}` WHERE {condition}"))
        .unwrap()
        .unwrap_or(0)
}

/// Writers on `keys` aggregates, `per_key` transactions each of 1 to 3 events, every
/// fifth one rolled back; returns the ids of the committed messages.
fn write_concurrently(
    pool: &mysql::Pool,
    store: &MySqlStore,
    aggregates: &Arc<Aggregates>,
    topic: &str,
    writers: usize,
    keys: usize,
    per_key: usize,
) -> HashSet<String> {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (pool, store, aggregates, topic) = (
                pool.clone(),
                store.clone(),
                aggregates.clone(),
                topic.to_string(),
            );
            std::thread::spawn(move || {
                let outbox = Outbox::new(&store);
                let mut rng = Rng::new(w as u64 + 1);
                let mut committed = Vec::new();
                for round in 0..per_key * keys / writers {
                    let key = format!("k{}", rng.below(keys as u64));
                    let n = 1 + rng.below(3) as u32;
                    let commit = round % 5 != 4;
                    let ids = aggregates
                        .write(&pool, &outbox, &topic, &key, n, commit)
                        .unwrap();
                    if commit {
                        committed.extend(ids);
                    }
                }
                committed
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn every_committed_message_is_published_in_key_order_and_none_rolled_back(server: Server) {
    const KEYS: usize = 20;
    let f = fixture(server, "binlog");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let aggregates = Arc::new(Aggregates::new(pool, KEYS));
    let mut relay = start_relay(url, table, "binlog-order").unwrap();
    wait_until_following(pool, table);

    let committed = write_concurrently(pool, store, &aggregates, topic, 4, KEYS, 15);
    let got = consume(
        topic,
        committed.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert_eq!(
        read, committed,
        "exactly the committed messages, none rolled back"
    );
    assert_eq!(got.len(), committed.len(), "each once");
    assert_commit_order(&versions_read(&got), &aggregates.versions(pool), false);
    assert!(
        wait_for(Duration::from_secs(10), || count(pool, table, "state = 0")
            == 0),
        "every row published is marked delivered"
    );
    let saved: Option<(String, u64)> = pool
        .get_conn()
        .unwrap()
        .exec_first(
            format!("SELECT file, position FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
            (&table,),
        )
        .unwrap();
    let (file, offset) = saved.expect("the position is saved");
    assert!(
        file.starts_with("mysql-bin.") && offset > 4,
        "{file}:{offset}"
    );
    let errors: Vec<Error> = relay.errors().try_iter().collect();
    assert!(errors.is_empty(), "no error: {errors:?}");
    relay.stop().unwrap();
}

/// Where the server's binary log ends: its file and the offset in it.
fn log_end(pool: &mysql::Pool) -> (String, u64) {
    let mut conn = pool.get_conn().unwrap();
    // MySQL 8.4 renamed it.
    let row: mysql::Row = match conn.query_first("SHOW MASTER STATUS") {
        Ok(row) => row,
        Err(_) => conn.query_first("SHOW BINARY LOG STATUS").unwrap(),
    }
    .expect("the binary log is on");
    (row.get(0).unwrap(), row.get(1).unwrap())
}

fn the_relays_marks_log_no_payload(server: Server) {
    const N: usize = 100;
    const PAYLOAD: usize = 20_000;
    let f = fixture(server, "binlog_marks");
    let mut relay = start_relay(&f.url, &f.table, "binlog-marks").unwrap();
    wait_until_following(&f.pool, &f.table);
    relay.stop().unwrap();
    let messages: Vec<outbox::Message> = (0..N)
        .map(|i| outbox::Message::new(&f.topic, format!("{i:0>PAYLOAD$}")).with_key("k"))
        .collect();
    commit(&f.pool, &f.store, &messages);
    // No relay runs: the log ends after the inserts, and what it gains from here on is
    // the relay's own writing.
    let (file, before) = log_end(&f.pool);
    let mut relay = start_relay(&f.url, &f.table, "binlog-marks-again").unwrap();
    assert!(delivered(&f.pool, &f.table, N as u64), "all delivered");
    let saved = || -> Option<(String, u64)> {
        f.pool
            .get_conn()
            .unwrap()
            .exec_first(
                format!("SELECT file, position FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
                (&f.table,),
            )
            .unwrap()
    };
    // Its writes end with the position past the inserts.
    assert!(
        wait_for(Duration::from_secs(10), || saved()
            .is_some_and(|(at, offset)| at == file && offset >= before)),
        "the position past the inserts ({before}) is saved: {:?}",
        saved()
    );
    let (file_after, after) = log_end(&f.pool);
    assert_eq!(file_after, file, "no rotation meanwhile");
    let written = after - before;
    // In full rows, each mark would log its payload twice: 4 MB here.
    assert!(
        written < (N * PAYLOAD / 10) as u64,
        "the marks of {N} rows of {PAYLOAD} bytes wrote {written} bytes to the binary log"
    );
    let errors: Vec<Error> = relay.errors().try_iter().collect();
    assert!(errors.is_empty(), "no error: {errors:?}");
    relay.stop().unwrap();
}

fn every_field_comes_through_the_binary_log_as_written(server: Server) {
    let f = fixture(server, "binlog_fields");
    let mut relay = start_relay(&f.url, &f.table, "binlog-fields").unwrap();
    wait_until_following(&f.pool, &f.table);
    let key: Vec<u8> = vec![0, 159, 146, 150, 255];
    let payload: Vec<u8> = (0..=255).collect();
    let message = outbox::Message::new(&f.topic, payload.clone())
        .with_key(key.clone())
        .with_header("event-type", "OrderCreated")
        .with_header("bytes", vec![0u8, 255, 128])
        .with_header("unicode", "é ✓ \"quoted\"");
    let ids = commit(
        &f.pool,
        &f.store,
        &[message, outbox::Message::new(&f.topic, "")],
    );
    let mut got = consume(&f.topic, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(got.len(), 2);
    // Two partitions, likely: in the order written.
    got.sort_by_key(|record| ids.iter().position(|id| *id == record.message_id()));
    assert_eq!(got[0].message_id(), ids[0]);
    assert_eq!(got[0].key_bytes.as_deref(), Some(&key[..]));
    assert_eq!(got[0].payload, payload);
    let own: Vec<(String, Vec<u8>)> = got[0]
        .headers
        .iter()
        .filter(|(name, _)| name != outbox::MESSAGE_ID_HEADER)
        .cloned()
        .collect();
    assert_eq!(
        own,
        vec![
            ("event-type".to_string(), b"OrderCreated".to_vec()),
            ("bytes".to_string(), vec![0, 255, 128]),
            ("unicode".to_string(), "é ✓ \"quoted\"".as_bytes().to_vec()),
        ],
        "the headers, in order, byte for byte"
    );
    assert_eq!(got[1].message_id(), ids[1]);
    assert_eq!(
        (got[1].key_bytes.as_deref(), got[1].payload.len()),
        (None, 0)
    );
    // The record's timestamp is the row's created_on, in UTC.
    let created: i64 = f
        .pool
        .get_conn()
        .unwrap()
        .query_first(format!(
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', created_on) DIV 1000 FROM `{}` \
             ORDER BY id LIMIT 1",
            f.table
        ))
        .unwrap()
        .unwrap();
    assert_eq!(got[0].timestamp, Some(created));
    relay.stop().unwrap();
}

fn a_corrupt_row_is_made_dead_and_the_rest_go_on(server: Server) {
    let f = fixture(server, "binlog_corrupt");
    let mut relay = start_relay(&f.url, &f.table, "binlog-corrupt").unwrap();
    wait_until_following(&f.pool, &f.table);
    let outbox = Outbox::new(&f.store);
    let mut tx = f.pool.start_transaction(mysql::TxOpts::default()).unwrap();
    let message = |i: usize| outbox::Message::new(&f.topic, format!("m{i}")).with_key("k");
    outbox.add(&mut tx, &message(0)).unwrap();
    // Headers written by hand, not as the outbox writes them.
    insert_corrupt(&mut tx, &f.table, &f.topic, "k");
    outbox.add_all(&mut tx, &[message(1), message(2)]).unwrap();
    tx.commit().unwrap();
    // And after it, in a transaction of its own.
    commit(&f.pool, &f.store, &[message(3)]);

    assert!(delivered(&f.pool, &f.table, 4), "the others are delivered");
    assert!(
        wait_for(Duration::from_secs(10), || count(
            &f.pool,
            &f.table,
            "state = 2 AND error LIKE 'corrupt row: headers are not a JSON array%'"
        ) == 1),
        "the corrupt row is dead, with the reason"
    );
    let got = consume(&f.topic, 4, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(payloads(&got), ["m0", "m1", "m2", "m3"]);
    assert!(relay.is_running());
    relay.stop().unwrap();
}

/// Inserts, in `tx`, a pending row whose headers are no list of pairs, with key `key`.
fn insert_corrupt(tx: &mut mysql::Transaction<'_>, table: &str, topic: &str, key: &str) {
    tx.exec_drop(
        format!(
            "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload) \
             VALUES (UNHEX(REPLACE(UUID(), '-', '')), ?, ?, '{{\"not\": \"an array\"}}', 'x')"
        ),
        (topic, key),
    )
    .unwrap();
}

fn a_corrupt_row_holds_its_key_until_an_operator_discards_it(server: Server) {
    let f = fixture(server, "binlog_corrupt_key");
    let settings = outbox::DispatcherSettings {
        dead_blocks_key: true,
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        &f.table,
        broker(),
        settings,
        BinlogSettings::default(),
        "binlog-corrupt-key",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(&f.pool, &f.table);
    let outbox = Outbox::new(&f.store);
    let message =
        |key: &str, i: usize| outbox::Message::new(&f.topic, format!("{key}:{i}")).with_key(key);
    let mut tx = f.pool.start_transaction(mysql::TxOpts::default()).unwrap();
    outbox.add(&mut tx, &message("a", 1)).unwrap();
    insert_corrupt(&mut tx, &f.table, &f.topic, "a");
    outbox
        .add_all(&mut tx, &[message("a", 3), message("b", 1)])
        .unwrap();
    tx.commit().unwrap();
    assert!(delivered(&f.pool, &f.table, 2), "a:1 and b:1 go");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(&f.pool, &f.table, "state = 2"),
        1,
        "the corrupt row is dead"
    );
    assert_eq!(
        count(&f.pool, &f.table, "state = 0"),
        1,
        "a:3 waits behind the corrupt a:2"
    );

    let admin = outbox::admin::Admin::new(f.store.clone()).unwrap();
    let discarded = admin
        .discard(
            &outbox::admin::DeadFilter {
                topic: Some(f.topic.clone()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(discarded.len(), 1);
    assert!(
        delivered(&f.pool, &f.table, 3),
        "a:3 goes once the corrupt row is discarded"
    );
    let got = consume(&f.topic, 3, Duration::from_secs(30), Duration::from_secs(1));
    let mut payloads = payloads(&got);
    payloads.sort();
    assert_eq!(payloads, ["a:1", "a:3", "b:1"]);
    let a: Vec<&Consumed> = got
        .iter()
        .filter(|c| c.key.as_deref() == Some("a"))
        .collect();
    assert_eq!(a.len(), 2);
    assert!(a[0].offset < a[1].offset, "a:1 before a:3");
    relay.stop().unwrap();
}

/// The server's setting that compresses its binary log.
fn compression(server: Server) -> &'static str {
    match server {
        Server::MariaDb => "log_bin_compress",
        Server::MySql => "binlog_transaction_compression",
    }
}

fn a_log_compressed_while_the_relay_runs_stops_it_until_caught_up_from_the_table(server: Server) {
    let f = fixture(server, "binlog_compressed");
    let mut relay = start_relay(&f.url, &f.table, "binlog-compressed").unwrap();
    wait_until_following(&f.pool, &f.table);
    // Payloads past MariaDB's log_bin_compress_min_len (256 bytes), so that it compresses.
    let message = |i: usize| {
        outbox::Message::new(&f.topic, format!("m{i}:{}", "z".repeat(1_000))).with_key("k")
    };
    let mut ids = commit(&f.pool, &f.store, &(0..10).map(message).collect::<Vec<_>>());
    assert!(delivered(&f.pool, &f.table, 10));

    let setting = compression(server);
    let mut conn = mysql::Conn::new(f.url.as_str()).unwrap();
    conn.query_drop(format!("SET GLOBAL {setting} = ON"))
        .unwrap();
    // A connection opened after the change, which compresses.
    let mut writer = mysql::Conn::new(f.url.as_str()).unwrap();
    let mut tx = writer.start_transaction(mysql::TxOpts::default()).unwrap();
    let more: Vec<_> = (10..20).map(message).collect();
    ids.extend(
        Outbox::new(&f.store)
            .add_all(&mut tx, &more)
            .unwrap()
            .iter()
            .map(|id| id.hyphenated().to_string()),
    );
    tx.commit().unwrap();
    let error = relay
        .errors()
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay reports the compressed event");
    assert!(
        matches!(&error, Error::Config(why) if why.contains(setting) && why.contains("DELETE FROM")),
        "{error:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count(&f.pool, &f.table, "state = 0"),
        10,
        "nothing after the compressed event is skipped over"
    );

    // The operator's way out, as the error says.
    conn.query_drop(format!("SET GLOBAL {setting} = OFF"))
        .unwrap();
    conn.exec_drop(
        format!("DELETE FROM {POSITION_TABLE} WHERE outbox_table = ?"),
        (&f.table,),
    )
    .unwrap();
    assert!(
        delivered(&f.pool, &f.table, 20),
        "caught up from the table after the position was removed"
    );
    ids.extend(commit(&f.pool, &f.store, &[message(20)]));
    assert!(
        delivered(&f.pool, &f.table, 21),
        "and following the log again"
    );
    let got = consume(
        &f.topic,
        21,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<Vec<_>>(),
        ids,
        "each once, in order"
    );
    relay.stop().unwrap();
}

fn a_relay_killed_mid_stream_resumes_from_its_position_and_loses_nothing(server: Server) {
    const KEYS: usize = 10;
    let f = fixture(server, "binlog_kill");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let aggregates = Arc::new(Aggregates::new(pool, KEYS));

    let (mut first, _, _) = relay_process(url, table, "binlog-killed");
    wait_until_following(pool, table);
    let writing = {
        let (pool, store, aggregates, topic) = (
            pool.clone(),
            store.clone(),
            aggregates.clone(),
            topic.to_string(),
        );
        std::thread::spawn(move || {
            write_concurrently(&pool, &store, &aggregates, &topic, 2, KEYS, 60)
        })
    };
    assert!(
        wait_for(Duration::from_secs(30), || count(pool, table, "state = 1")
            >= 50),
        "the first relay publishes"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let delivered_at_kill = count(pool, table, "state = 1");
    let (file, offset): (String, u64) = pool
        .get_conn()
        .unwrap()
        .exec_first(
            format!("SELECT file, position FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
            (&table,),
        )
        .unwrap()
        .expect("a position saved before the kill");
    let (mut second, _, logs) = relay_process(url, table, "binlog-restarted");
    let committed = writing.join().unwrap();

    let got = consume_ids(
        topic,
        &committed,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert!(
        committed.is_subset(&read),
        "{} of {} committed messages missing",
        committed.difference(&read).count(),
        committed.len()
    );
    assert_eq!(
        read.len(),
        committed.len(),
        "nothing but committed messages"
    );
    assert_commit_order(&versions_read(&got), &aggregates.versions(pool), true);
    assert!(
        (delivered_at_kill as usize) < committed.len(),
        "the relay was killed mid-stream ({delivered_at_kill} of {})",
        committed.len()
    );
    assert!(wait_for(Duration::from_secs(10), || count(
        pool,
        table,
        "state = 0"
    ) == 0));
    // It resumed where the killed relay had saved its position, and never caught up
    // from the table (which claims the pending rows instead).
    let resumed = logs.wait_for(" resumes at ", Duration::from_secs(10));
    assert_eq!(
        resumed.map(|line| line.ends_with(&format!(" resumes at {file}:{offset}"))),
        Some(true),
        "the restarted relay resumed from the saved position {file}:{offset}"
    );
    assert_eq!(
        logs.matching("catching up"),
        Vec::<String>::new(),
        "without catching up from the table"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// The relay process killed (SIGKILL) 2 s after each start, 8 times, while 4 writers
/// commit: everything committed is published, and each key's messages are first read in
/// commit order (a kill may send again what was in flight, in order).
fn a_relay_killed_every_two_seconds_while_writers_commit_loses_nothing(server: Server) {
    const KEYS: usize = 10;
    const KILLS: usize = 8;
    let f = fixture(server, "binlog_kill_loop");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let aggregates = Arc::new(Aggregates::new(pool, KEYS));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|_| keep_writing(pool, store, &aggregates, topic, KEYS as u64, &stop))
        .collect();
    let mut delivered_at_kills = Vec::new();
    for kill in 0..KILLS {
        let (mut relay, _, _) = relay_process(url, table, &format!("binlog-kill-loop-{kill}"));
        std::thread::sleep(Duration::from_secs(2));
        relay.kill().unwrap();
        relay.wait().unwrap();
        delivered_at_kills.push(count(pool, table, "state = 1"));
    }
    stop.store(true, Ordering::SeqCst);
    let committed: HashSet<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let pending_at_end = count(pool, table, "state = 0");
    let (mut last, _, _) = relay_process(url, table, "binlog-kill-loop-last");
    let got = consume_ids(
        topic,
        &committed,
        Duration::from_secs(90),
        Duration::from_secs(3),
    );
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert!(
        committed.is_subset(&read),
        "{} of {} committed messages missing",
        committed.difference(&read).count(),
        committed.len()
    );
    assert_commit_order(&versions_read(&got), &aggregates.versions(pool), true);
    assert!(
        delivered_at_kills
            .windows(2)
            .filter(|w| w[1] > w[0])
            .count()
            >= KILLS / 2,
        "the relays published between kills: delivered at each kill {delivered_at_kills:?}"
    );
    eprintln!(
        "kill loop: {} committed, {} read, {pending_at_end} left to the last relay; \
         delivered at each kill {delivered_at_kills:?}",
        committed.len(),
        got.len()
    );
    last.kill().unwrap();
    last.wait().unwrap();
}

/// Sessions reading the server's binary log (`Binlog Dump`, `Binlog Dump GTID`).
fn binlog_readers(pool: &mysql::Pool) -> u64 {
    let mut conn = pool.get_conn().unwrap();
    let listed = conn.query_first(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
    );
    // MySQL may refuse to list sessions whose statement text it cannot convert.
    let listed = listed.or_else(|_| {
        conn.query_first(
            "SELECT COUNT(*) FROM performance_schema.threads \
             WHERE PROCESSLIST_COMMAND LIKE 'Binlog Dump%'",
        )
    });
    listed.unwrap().unwrap_or(0)
}

fn health_names_the_reader_sees_a_busy_relay_alive_and_the_reader_stops_with_it(server: Server) {
    const N: usize = 3_000;
    let f = fixture(server, "binlog_health");
    // Slower to send than to read: the relay is never idle while the backlog lasts.
    let slow = SlowBroker {
        inner: broker(),
        pause: Duration::from_millis(200),
    };
    // Thirty batches, six seconds at least.
    let settings = outbox::DispatcherSettings {
        batch_size: 100,
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        &f.table,
        slow,
        settings,
        BinlogSettings::default(),
        "binlog-health",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(&f.pool, &f.table);
    let workers: Vec<Worker> = relay.health().workers.iter().map(|w| w.worker).collect();
    for worker in [Worker::Relay, Worker::BinlogReader, Worker::Settler] {
        assert!(workers.contains(&worker), "{worker}: {workers:?}");
    }
    assert!(
        !workers.contains(&Worker::Publisher),
        "no polling publisher: {workers:?}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || binlog_readers(&f.pool) == 1),
        "one reader while it runs"
    );

    // While a backlog is drained, the relay and its reader keep saying they work.
    let messages: Vec<outbox::Message> = (0..N)
        .map(|i| outbox::Message::new(&f.topic, format!("m{i}")))
        .collect();
    commit(&f.pool, &f.store, &messages);
    let committed = SystemTime::now();
    let mut checked = 0;
    while count(&f.pool, &f.table, "state = 0") > 0 {
        std::thread::sleep(Duration::from_millis(200));
        let now = SystemTime::now();
        if now.duration_since(committed).unwrap() < Duration::from_secs(2) {
            continue;
        }
        let health = relay.health();
        assert!(health.is_alive(), "{health:?}");
        for worker in [Worker::Relay, Worker::BinlogReader, Worker::Settler] {
            let last = health
                .workers
                .iter()
                .find(|w| w.worker == worker)
                .and_then(|w| w.last_success)
                .unwrap_or(std::time::UNIX_EPOCH);
            let age = now.duration_since(last).unwrap_or_default();
            assert!(
                age < Duration::from_millis(1_500),
                "{worker} last succeeded {age:?} ago, mid-drain"
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "the drain lasted long enough to be looked at");
    assert_eq!(count(&f.pool, &f.table, "state = 1"), N as u64);

    relay.stop().unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || binlog_readers(&f.pool) == 0),
        "the reader's connection closed with the relay: {} left",
        binlog_readers(&f.pool)
    );
}

/// Commits `messages` one per transaction on `conn`, as its session is set up.
fn commit_each_on(conn: &mut mysql::PooledConn, store: &MySqlStore, messages: &[outbox::Message]) {
    let outbox = Outbox::new(store);
    for message in messages {
        let mut tx = conn.start_transaction(mysql::TxOpts::default()).unwrap();
        outbox.add(&mut tx, message).unwrap();
        tx.commit().unwrap();
    }
}

fn rows_a_session_logs_in_minimal_images_are_read_from_the_table(server: Server) {
    let f = fixture(server, "binlog_minimal");
    let (pool, table, topic) = (&f.pool, f.table.as_str(), f.topic.as_str());
    // Two dead rows, each holding back its key.
    let dead = |key: &str| {
        pool.get_conn()
            .unwrap()
            .query_drop(format!(
                "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload, state, \
                 number_of_attempts, created_on, available_on) VALUES \
                 (UNHEX(REPLACE(UUID(), '-', '')), '{topic}', '{key}', '[]', '{key}:0', 2, 3, \
                 UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
            ))
            .unwrap();
    };
    dead("a");
    dead("b");
    let settings = outbox::DispatcherSettings {
        dead_blocks_key: true,
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        table,
        broker(),
        settings,
        BinlogSettings::default(),
        "binlog-minimal",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(pool, table);

    // A session that logs only the columns a statement names: its inserts leave out the
    // state, and its updates the row's former state.
    let mut minimal = pool.get_conn().unwrap();
    minimal
        .query_drop("SET SESSION binlog_row_image = 'MINIMAL'")
        .unwrap();
    let messages: Vec<outbox::Message> = (0..20)
        .map(|i| {
            outbox::Message::new(topic, format!("m:{i}"))
                .with_key("m")
                .with_header("n", format!("{i}"))
        })
        .collect();
    commit_each_on(&mut minimal, &f.store, &messages);
    commit_each_on(
        &mut minimal,
        &f.store,
        &[
            outbox::Message::new(topic, "a:1").with_key("a"),
            outbox::Message::new(topic, "b:1").with_key("b"),
        ],
    );
    // An operator's replay and discard, as `outbox replay` and `outbox discard` write them.
    minimal
        .query_drop(format!(
            "UPDATE `{table}` SET state = 0, number_of_attempts = 0, \
             available_on = UTC_TIMESTAMP(6), error = NULL WHERE state = 2 AND msg_key = 'a'"
        ))
        .unwrap();
    minimal
        .query_drop(format!(
            "UPDATE `{table}` SET state = 3, processed_on = UTC_TIMESTAMP(6) \
             WHERE state = 2 AND msg_key = 'b'"
        ))
        .unwrap();

    let got = consume(topic, 23, Duration::from_secs(30), Duration::from_secs(1));
    let of = |key: &str| {
        payloads(&got)
            .into_iter()
            .filter(|p| p.starts_with(key))
            .collect::<Vec<_>>()
    };
    let expected: Vec<String> = (0..20).map(|i| format!("m:{i}")).collect();
    assert_eq!(of("m:"), expected, "every insert, once, in order");
    for record in got.iter().filter(|r| r.key.as_deref() == Some("m")) {
        let n = String::from_utf8_lossy(&record.payload)[2..].to_string();
        assert_eq!(record.header("n"), Some(n.as_bytes()), "headers intact");
    }
    assert_eq!(
        of("a:"),
        ["a:0", "a:1"],
        "the replayed row, then what it held"
    );
    assert_eq!(of("b:"), ["b:1"], "the discarded row released its key");
    assert!(delivered(pool, table, 23));
    relay.stop().unwrap();
}

fn a_standby_takes_over_within_seconds_of_the_active_relay_cut_off(server: Server) {
    const KEYS: usize = 10;
    let f = fixture(server, "binlog_cut");
    let (pool, table, topic) = (&f.pool, f.table.as_str(), f.topic.as_str());
    let aggregates = Arc::new(Aggregates::new(pool, KEYS));
    // The active relay reaches the server through a proxy that can stop moving bytes
    // with both sockets left open: a cut link, or a host gone dark. (Over loopback the
    // `mysql` crate would take the server's socket instead, unless told not to.) It
    // publishes slower than the writers write, so that it has rows in hand when cut off.
    let address = f.url.split('@').nth(1).unwrap().split('/').next().unwrap();
    let proxy = Proxy::start(address);
    let cut_url = format!(
        "mysql://root@{}/test?prefer_socket=false&pool_min=1&pool_max=10",
        proxy.address()
    );
    let slow = SlowBroker {
        inner: broker(),
        pause: Duration::from_millis(500),
    };
    let settings = outbox::DispatcherSettings {
        batch_size: 10,
        ..fast_settings()
    };
    let binlog = BinlogSettings {
        lock_timeout: Duration::from_secs(4),
        ..BinlogSettings::default()
    };
    let mut active = BinlogRelay::new(
        mysql::Opts::from_url(&cut_url).unwrap(),
        table,
        slow,
        settings,
        binlog,
        "binlog-active",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(pool, table);
    let (standby, _, standby_logs) = relay_process(&f.url, table, "binlog-standby");
    let standby = Reaped(standby);
    assert!(standby_logs
        .wait_for("waits as a standby", Duration::from_secs(30))
        .is_some());

    let _close = CloseOnDrop(&proxy);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(pool, &f.store, &aggregates, topic, KEYS as u64, &stop);
    assert!(
        wait_for(Duration::from_secs(30), || count(pool, table, "state = 1")
            >= 20
            && count(pool, table, "state = 0") >= 200),
        "the active relay publishes, and falls behind"
    );
    proxy.cut();
    let cut = Instant::now();
    // The standby takes the lock once the server lets the cut-off connection go, and
    // every message committed in the 15 s after the cut is published within 30 s of it.
    assert!(
        standby_logs
            .wait_for("is the active relay", Duration::from_secs(30))
            .is_some(),
        "the standby took over"
    );
    let taken_over = cut.elapsed();
    std::thread::sleep((cut + Duration::from_secs(15)).saturating_duration_since(Instant::now()));
    let high: u64 = pool
        .get_conn()
        .unwrap()
        .query_first(format!("SELECT MAX(id) FROM `{table}`"))
        .unwrap()
        .unwrap();
    let behind = format!("id <= {high} AND state = 0");
    assert!(
        wait_for(
            (cut + Duration::from_secs(30)).saturating_duration_since(Instant::now()),
            || count(pool, table, &behind) == 0
        ),
        "published within 30 s of the cut: {} still pending",
        count(pool, table, &behind)
    );
    let published = cut.elapsed();
    // The cut-off relay had rows in hand, and stopped publishing them on its own.
    let errors: Vec<Error> = active.errors().try_iter().collect();
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().contains("could not prove")),
        "fenced: {errors:?}"
    );

    // The link comes back: the relay that was cut off waits as a standby.
    proxy.mend();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let committed = writer.join().unwrap();
    let got = consume_ids(
        topic,
        &committed,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert!(
        committed.is_subset(&read),
        "{} of {} committed messages missing",
        committed.difference(&read).count(),
        committed.len()
    );
    assert_first_reads_in_order(&versions_read(&got), &aggregates.versions(pool));
    eprintln!(
        "cut off: the standby took over {taken_over:?} after the cut; what was committed \
         15 s into it was published {published:?} after it; {} messages committed, {} read",
        committed.len(),
        got.len()
    );
    active.stop().unwrap();
    drop(standby);
}

fn a_message_the_broker_never_takes_holds_back_its_own_key_only(server: Server) {
    let f = fixture(server, "binlog_stuck");
    let (pool, table, topic) = (&f.pool, f.table.as_str(), f.topic.as_str());
    let relay_with = |max_attempts: Option<u32>| {
        let settings = outbox::DispatcherSettings {
            max_attempts,
            ..fast_settings()
        };
        BinlogRelay::new(
            mysql::Opts::from_url(&f.url).unwrap(),
            table,
            broker(),
            settings,
            BinlogSettings::default(),
            "binlog-stuck",
        )
        .unwrap()
        .start()
        .unwrap()
    };
    let mut relay = relay_with(None);
    wait_until_following(pool, table);
    // 2 MB, written by SQL as another writer might: more than the producer sends.
    pool.get_conn()
        .unwrap()
        .query_drop(format!(
            "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload, created_on, \
             available_on) VALUES (UNHEX(REPLACE(UUID(), '-', '')), '{topic}', 'big', '[]', \
             REPEAT('x', 2000000), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
        ))
        .unwrap();
    let behind: Vec<outbox::Message> = (1..=5)
        .map(|i| outbox::Message::new(topic, format!("big:{i}")).with_key("big"))
        .collect();
    commit(pool, &f.store, &behind);
    let others = unique("binlog_others");
    let messages: Vec<outbox::Message> = (0..200)
        .map(|i| outbox::Message::new(&others, format!("o:{i}")).with_key(format!("k{}", i % 7)))
        .collect();
    let ids: HashSet<String> = commit(pool, &f.store, &messages).into_iter().collect();

    // Everything else goes on; the big one is tried again and again, its key waits.
    let got = consume(
        &others,
        200,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<HashSet<_>>(),
        ids,
        "the other topic's 200 went"
    );
    assert!(
        wait_for(Duration::from_secs(30), || count(
            pool,
            table,
            "msg_key = 'big' AND state = 0 AND number_of_attempts >= 3"
        ) == 1),
        "the big one is tried again"
    );
    assert_eq!(
        count(pool, table, "msg_key = 'big' AND state = 0"),
        6,
        "its key's later messages wait behind it"
    );
    relay.stop().unwrap();

    // Restarted with a limit: it is dead at once (its attempts are the table's), and
    // its key goes on, in order.
    let mut relay = relay_with(Some(3));
    assert!(
        wait_for(Duration::from_secs(30), || count(pool, table, "state = 2")
            == 1
            && count(pool, table, "msg_key = 'big' AND state = 1") == 5),
        "dead after its attempts, and the rest of its key published"
    );
    let big = consume(topic, 5, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(
        payloads(&big),
        (1..=5).map(|i| format!("big:{i}")).collect::<Vec<_>>()
    );
    relay.stop().unwrap();
}

fn a_long_wait_behind_a_failed_message_is_read_back_from_the_table_in_order(server: Server) {
    let f = fixture(server, "binlog_spill");
    let (pool, table, topic) = (&f.pool, f.table.as_str(), f.topic.as_str());
    // Small batches keep 256 held rows in memory at most; the rest stay in the table.
    let settings = outbox::DispatcherSettings {
        batch_size: 10,
        max_attempts: Some(4),
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        table,
        broker(),
        settings,
        BinlogSettings::default(),
        "binlog-spill",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(pool, table);
    pool.get_conn()
        .unwrap()
        .query_drop(format!(
            "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload, created_on, \
             available_on) VALUES (UNHEX(REPLACE(UUID(), '-', '')), '{topic}', 'k', '[]', \
             REPEAT('x', 2000000), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
        ))
        .unwrap();
    for chunk in 0..6 {
        let messages: Vec<outbox::Message> = (0..100)
            .map(|i| outbox::Message::new(topic, format!("k:{}", chunk * 100 + i)).with_key("k"))
            .collect();
        commit(pool, &f.store, &messages);
    }
    assert!(
        wait_for(Duration::from_secs(60), || count(pool, table, "state = 2")
            == 1
            && count(pool, table, "state = 1") == 600),
        "dead after 4 attempts, then all 600 behind it: {} delivered",
        count(pool, table, "state = 1")
    );
    let got = consume(topic, 600, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(
        payloads(&got),
        (0..600).map(|i| format!("k:{i}")).collect::<Vec<_>>(),
        "each once, in order"
    );
    relay.stop().unwrap();
}

fn a_row_the_relay_never_read_is_published_by_the_sweep(server: Server) {
    let kept = common::recorder::kept();
    let f = fixture(server, "binlog_sweep");
    let (pool, table, topic) = (&f.pool, f.table.as_str(), f.topic.as_str());
    let binlog = BinlogSettings {
        sweep_after: Duration::from_secs(2),
        ..BinlogSettings::default()
    };
    // An instance of its own: its counters are its own.
    let instance = unique("binlog_sweep");
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        table,
        broker(),
        fast_settings(),
        binlog,
        &instance,
    )
    .unwrap()
    .start()
    .unwrap();
    let swept = format!("outbox_binlog_rows_swept_total{{instance={instance}}}");
    wait_until_following(pool, table);
    // Held on purpose: a row the producer refuses, and its key's later rows. The sweep
    // leaves them to the relay.
    let mut conn = pool.get_conn().unwrap();
    conn.query_drop(format!(
        "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload, created_on, \
         available_on) VALUES (UNHEX(REPLACE(UUID(), '-', '')), '{topic}', 'big', '[]', \
         REPEAT('x', 2000000), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
    ))
    .unwrap();
    commit(
        pool,
        &f.store,
        &[outbox::Message::new(topic, "big:1").with_key("big")],
    );
    // A row whose insert never reaches the binary log (as if its event were lost).
    conn.query_drop("SET SESSION sql_log_bin = 0").unwrap();
    let outbox = Outbox::new(&f.store);
    let mut tx = conn.start_transaction(mysql::TxOpts::default()).unwrap();
    let lost = outbox
        .add(
            &mut tx,
            &outbox::Message::new(topic, "unseen").with_key("u"),
        )
        .unwrap();
    tx.commit().unwrap();
    conn.query_drop("SET SESSION sql_log_bin = 1").unwrap();

    let got = consume(topic, 1, Duration::from_secs(20), Duration::from_secs(6));
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<Vec<_>>(),
        [lost.hyphenated().to_string()],
        "the unseen row, published by the sweep, and nothing held"
    );
    assert_eq!(kept.counter(&swept), 1);
    assert_eq!(
        count(pool, table, "msg_key = 'big' AND state = 0"),
        2,
        "the held rows wait for the relay"
    );
    relay.stop().unwrap();
}

fn a_standby_takes_over_when_the_active_relay_dies(server: Server) {
    let f = fixture(server, "binlog_standby");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let outbox = Outbox::new(store);
    let add = |n: usize, from: usize| -> Vec<String> {
        let mut tx = pool.start_transaction(mysql::TxOpts::default()).unwrap();
        let messages: Vec<_> = (from..from + n)
            .map(|i| outbox::Message::new(topic, format!("m{i}")).with_key(format!("k{}", i % 3)))
            .collect();
        let ids = outbox.add_all(&mut tx, &messages).unwrap();
        tx.commit().unwrap();
        ids.iter().map(|id| id.hyphenated().to_string()).collect()
    };

    let saved_by = || -> String {
        pool.get_conn()
            .unwrap()
            .exec_first(
                format!("SELECT relay FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
                (&table,),
            )
            .unwrap()
            .unwrap_or_default()
    };

    let (mut active, active_owner, _) = relay_process(url, table, "binlog-active");
    let mut ids = add(20, 0);
    assert!(delivered(pool, table, 20));
    let mut standby = start_relay(url, table, "binlog-standby").unwrap();
    // Several of the standby's lock waits.
    std::thread::sleep(Duration::from_secs(3));
    ids.extend(add(20, 20));
    assert!(delivered(pool, table, 40));
    assert_eq!(
        saved_by(),
        active_owner,
        "the active relay published the second batch"
    );
    active.kill().unwrap();
    active.wait().unwrap();
    ids.extend(add(20, 40));
    assert!(
        delivered(pool, table, 60),
        "the standby publishes once the active relay is gone"
    );
    assert!(
        wait_for(Duration::from_secs(10), || saved_by() == standby.owner()),
        "the standby took over and saves the position"
    );
    let got = consume(topic, 60, Duration::from_secs(30), Duration::from_secs(2));
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert_eq!(read, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(
        got.len(),
        60,
        "the standby sent nothing while the active relay ran"
    );
    standby.stop().unwrap();
}

fn a_rotated_then_purged_binary_log_is_caught_up_from_the_table(server: Server) {
    let f = fixture(server, "binlog_purge");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let outbox = Outbox::new(store);
    let add = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| {
                let mut tx = pool.start_transaction(mysql::TxOpts::default()).unwrap();
                let id = outbox
                    .add(
                        &mut tx,
                        &outbox::Message::new(topic, format!("m{i}")).with_key("k"),
                    )
                    .unwrap();
                tx.commit().unwrap();
                id.hyphenated().to_string()
            })
            .collect()
    };
    let mut conn = pool.get_conn().unwrap();

    let mut relay = start_relay(url, table, "binlog-rotate").unwrap();
    wait_until_following(pool, table);
    let mut ids = add(0, 10);
    conn.query_drop("FLUSH BINARY LOGS").unwrap();
    ids.extend(add(10, 10));
    assert!(
        delivered(pool, table, 20),
        "the relay follows the log into its next file"
    );
    relay.stop().unwrap();

    // While no relay runs: more messages, and the file of the saved position purged.
    ids.extend(add(20, 10));
    conn.query_drop("FLUSH BINARY LOGS").unwrap();
    let newest: String = conn
        .query::<mysql::Row, _>("SHOW BINARY LOGS")
        .unwrap()
        .last()
        .and_then(|row| row.get(0))
        .unwrap();
    // A file being read cannot be purged: wait for the stopped relay's reader to go.
    assert!(wait_for(Duration::from_secs(10), || count(
        pool,
        "information_schema`.`PROCESSLIST",
        "COMMAND LIKE 'Binlog Dump%'"
    ) == 0));
    // MariaDB keeps a file until its binlog checkpoint moved past it: try again.
    assert!(
        wait_for(Duration::from_secs(10), || {
            conn.query_drop(format!("PURGE BINARY LOGS TO '{newest}'"))
                .unwrap();
            conn.query::<mysql::Row, _>("SHOW BINARY LOGS")
                .unwrap()
                .len()
                == 1
        }),
        "the saved position's file is purged"
    );

    let mut relay = start_relay(url, table, "binlog-purged").unwrap();
    ids.extend(add(30, 10));
    assert!(
        delivered(pool, table, 40),
        "the catch-up publishes what the purged log held, and the relay follows after it"
    );
    let got = consume(topic, 40, Duration::from_secs(30), Duration::from_secs(2));
    let payloads: Vec<String> = payloads(&got);
    let expected: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(
        payloads, expected,
        "one key, every message once, in commit order"
    );
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<Vec<_>>(),
        ids
    );
    relay.stop().unwrap();
}

fn each_missing_server_setting_is_refused_with_its_fix(server: Server) {
    // The shared server writes no binary log.
    let (_, _, table) = outbox_table(&small_pool_url(), "binlog_off");
    match start_relay(&small_pool_url(), &table, "binlog-off") {
        Err(Error::Config(why)) => assert!(
            why.contains("log_bin") && why.contains("--log-bin"),
            "{why}"
        ),
        other => panic!("expected a refusal naming log_bin, got {other:?}"),
    }
    let _ = mysql::Pool::new(small_pool_url().as_str())
        .unwrap()
        .get_conn()
        .unwrap()
        .query_drop(format!("DROP TABLE IF EXISTS `{table}`"));

    let db = binlog_database(server);
    let url = db.url();
    let (pool, _, table) = outbox_table(&url, "binlog_settings");
    let mut conn = pool.get_conn().unwrap();
    let refused = |setting: &str, fix: &str| match start_relay(&url, &table, "binlog-refused") {
        Err(Error::Config(why)) => {
            assert!(why.contains(setting) && why.contains(fix), "{why}")
        }
        other => panic!("expected a refusal naming {setting}, got {other:?}"),
    };
    conn.query_drop("SET GLOBAL binlog_format = 'MIXED'")
        .unwrap();
    refused("binlog_format", "SET GLOBAL binlog_format = 'ROW'");
    conn.query_drop("SET GLOBAL binlog_format = 'ROW'").unwrap();
    conn.query_drop("SET GLOBAL binlog_row_image = 'MINIMAL'")
        .unwrap();
    refused("binlog_row_image", "SET GLOBAL binlog_row_image = 'FULL'");
    conn.query_drop("SET GLOBAL binlog_row_image = 'FULL'")
        .unwrap();
    let compression = compression(server);
    conn.query_drop(format!("SET GLOBAL {compression} = ON"))
        .unwrap();
    refused(compression, &format!("SET GLOBAL {compression} = OFF"));
    conn.query_drop(format!("SET GLOBAL {compression} = OFF"))
        .unwrap();
    if server == Server::MySql {
        // Commits made visible out of the log's order: MariaDB has no such setting.
        conn.query_drop("SET GLOBAL binlog_order_commits = OFF")
            .unwrap();
        refused(
            "binlog_order_commits",
            "SET GLOBAL binlog_order_commits = ON",
        );
        conn.query_drop("SET GLOBAL binlog_order_commits = ON")
            .unwrap();
    }

    // A user with rights on the tables only, then with REPLICATION SLAVE only.
    conn.query_drop("CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app'")
        .unwrap();
    conn.query_drop("GRANT ALL ON test.* TO 'app'@'127.0.0.1'")
        .unwrap();
    let app_url = url.replace("root@", "app:app@");
    let refused_for_app = |privilege: &str| match start_relay(&app_url, &table, "binlog-app") {
        Err(Error::Config(why)) => assert!(
            why.contains(privilege) && why.contains("GRANT REPLICATION SLAVE, REPLICATION CLIENT"),
            "{why}"
        ),
        other => panic!("expected a refusal naming {privilege}, got {other:?}"),
    };
    refused_for_app("REPLICATION SLAVE");
    conn.query_drop("GRANT REPLICATION SLAVE ON *.* TO 'app'@'127.0.0.1'")
        .unwrap();
    refused_for_app("REPLICATION CLIENT");
    conn.query_drop("GRANT REPLICATION CLIENT ON *.* TO 'app'@'127.0.0.1'")
        .unwrap();
    let mut relay = start_relay(&app_url, &table, "binlog-app").expect("all granted");
    // And it relays. MySQL does not let this user log its marks with minimal row images
    // (that takes SESSION_VARIABLES_ADMIN): the reader skips them in full.
    let store = MySqlStore::with_table(pool.clone(), &table).unwrap();
    let topic = unique("binlog_app");
    let ids: HashSet<String> = commit(&pool, &store, &keyed(&topic, 0, 20))
        .into_iter()
        .collect();
    assert!(
        delivered(&pool, &table, 20),
        "the granted user's relay publishes"
    );
    let got = consume(&topic, 20, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<HashSet<_>>(),
        ids
    );
    assert_eq!(got.len(), 20, "each once");
    relay.stop().unwrap();
}

/// `n` messages from `from` over 10 keys, each payload `key:number`.
fn keyed(topic: &str, from: usize, n: usize) -> Vec<outbox::Message> {
    (from..from + n)
        .map(|i| {
            outbox::Message::new(topic, format!("k{}:{i}", i % 10)).with_key(format!("k{}", i % 10))
        })
        .collect()
}

/// Commits `messages` in one transaction; returns their ids.
fn commit(pool: &mysql::Pool, store: &MySqlStore, messages: &[outbox::Message]) -> Vec<String> {
    let mut tx = pool.start_transaction(mysql::TxOpts::default()).unwrap();
    let ids = Outbox::new(store).add_all(&mut tx, messages).unwrap();
    tx.commit().unwrap();
    ids.iter().map(|id| id.hyphenated().to_string()).collect()
}

/// Each key's numbers (payload `key:number`, a key's numbers 10 apart, see [`keyed`])
/// were read in order without a gap: each step forward is to the key's next number. With
/// `duplicates`, a step may also go back, to send a suffix again.
fn assert_key_order(got: &[Consumed], duplicates: bool) {
    let mut last = std::collections::HashMap::new();
    for record in got {
        let text = String::from_utf8(record.payload.clone()).unwrap();
        let (key, n) = text.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        if let Some(previous) = last.insert(key.to_string(), n) {
            let next = n == previous + 10;
            let again = duplicates && n <= previous;
            assert!(next || again, "{key}: {n} after {previous}");
        }
    }
}

fn the_broker_down_and_back_loses_nothing_and_keeps_key_order(server: Server) {
    let f = fixture(server, "binlog_broker");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let mut kafka = common::tansu::Tansu::on_free_port().unwrap();
    kafka.start().unwrap();
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(url).unwrap(),
        table,
        broker_at(kafka.address()),
        fast_settings(),
        BinlogSettings::default(),
        "binlog-broker",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(pool, table);
    commit(pool, store, &keyed(topic, 0, 100));
    assert!(delivered(pool, table, 100));

    kafka.kill();
    let mut pending: HashSet<String> = HashSet::new();
    for round in 0..10 {
        pending.extend(commit(pool, store, &keyed(topic, 100 + round * 50, 50)));
    }
    assert!(
        wait_for(Duration::from_secs(30), || count(
            pool,
            table,
            "number_of_attempts >= 1 AND state = 0"
        ) > 0),
        "sends are tried, fail and are counted"
    );
    assert!(
        relay.errors().try_iter().count() > 0,
        "the outage is reported"
    );
    assert_eq!(
        count(pool, table, "state = 1"),
        100,
        "nothing is marked while it is down"
    );

    kafka.start().unwrap();
    assert!(
        delivered(pool, table, 600),
        "every message is delivered once the broker is back"
    );
    // The restarted broker (memory storage) holds what was committed while it was down.
    let got = consume_from(
        kafka.address(),
        topic,
        pending.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let counts = id_counts(&got);
    assert!(
        pending.iter().all(|id| counts.get(id) == Some(&1)),
        "each pending message once"
    );
    assert_key_order(&got, false);
    relay.stop().unwrap();
}

fn the_database_restarted_mid_stream_loses_nothing(server: Server) {
    let Fixture {
        mut db,
        url,
        pool,
        store,
        table,
        topic,
    } = fixture(server, "binlog_restart");
    let settings = outbox::DispatcherSettings {
        batch_size: 20,
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&url).unwrap(),
        &table,
        broker(),
        settings,
        BinlogSettings::default(),
        "binlog-restart",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(&pool, &table);
    let mut ids: HashSet<String> = HashSet::new();
    for round in 0..40 {
        ids.extend(commit(&pool, &store, &keyed(&topic, round * 50, 50)));
    }
    assert!(wait_for(Duration::from_secs(30), || count(
        &pool,
        &table,
        "state = 1"
    ) >= 100));
    db.kill(); // SIGKILL: InnoDB and the binary log recover on start
    db.start();
    let delivered_at_restart = count(&pool, &table, "state = 1");
    assert!(
        delivered_at_restart < 2_000,
        "killed mid-stream ({delivered_at_restart} delivered)"
    );
    for round in 40..42 {
        ids.extend(commit(&pool, &store, &keyed(&topic, round * 50, 50)));
    }
    assert!(
        delivered(&pool, &table, 2_100),
        "every message is delivered after the restart"
    );
    let got = consume(
        &topic,
        ids.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert_eq!(read, ids, "every committed message, nothing else");
    assert_key_order(&got, true);
    assert!(relay.is_running(), "the relay rode out the restart");
    relay.stop().unwrap();
}

fn a_dead_message_holds_its_key_until_an_operator_discards_it(server: Server) {
    let f = fixture(server, "binlog_dead");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let settings = outbox::DispatcherSettings {
        max_attempts: Some(2),
        dead_blocks_key: true,
        ..fast_settings()
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(url).unwrap(),
        table,
        small_message_broker(),
        settings,
        BinlogSettings::default(),
        "binlog-dead",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(pool, table);
    let big = "x".repeat(20_000);
    let messages = vec![
        outbox::Message::new(topic, "a:1").with_key("a"),
        outbox::Message::new(topic, big.as_str()).with_key("a"),
        outbox::Message::new(topic, "a:3").with_key("a"),
        outbox::Message::new(topic, "b:1").with_key("b"),
    ];
    let ids = commit(pool, store, &messages);
    commit(
        pool,
        store,
        &[outbox::Message::new(topic, "b:2").with_key("b")],
    );
    assert!(
        wait_for(Duration::from_secs(30), || count(pool, table, "state = 2")
            == 1
            && count(pool, table, "state = 1") == 3),
        "the big one dies after 2 attempts; a:1, b:1 and b:2 go"
    );
    assert_eq!(
        count(pool, table, "state = 2 AND number_of_attempts = 2"),
        1
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(pool, table, "state = 0"),
        1,
        "a:3 waits behind the dead a:2"
    );

    let admin = outbox::admin::Admin::new(store.clone()).unwrap();
    let discarded = admin
        .discard(
            &outbox::admin::DeadFilter {
                topic: Some(topic.to_string()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(discarded.len(), 1);
    assert!(delivered(pool, table, 4), "a:3 goes once a:2 is discarded");
    let got = consume(topic, 4, Duration::from_secs(30), Duration::from_secs(1));
    let payloads: Vec<String> = payloads(&got);
    let of = |key: &str| {
        payloads
            .iter()
            .filter(|p| p.starts_with(key))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("a:"), ["a:1", "a:3"]);
    assert_eq!(of("b:"), ["b:1", "b:2"]);
    assert!(
        !got.iter().any(|c| c.message_id() == ids[1]),
        "the dead one was never published"
    );
    relay.stop().unwrap();
}

/// Two dead messages of a key replayed in one statement, with a run of the key's messages
/// waiting behind them: the first replay's event releases the key, and reads its pending
/// rows (the second replayed one with them) a batch at a time; the second replay's event,
/// which comes after, must not send its message again, after the later ones.
fn dead_messages_replayed_together_go_once_each_before_the_rest_of_their_key(server: Server) {
    const WAITING: usize = 10;
    let f = fixture(server, "binlog_replay");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    // Batches of 4: the key's rows are read back in three reads.
    let (mut relay, _, logs) = relay_process_with(
        url,
        table,
        "binlog-replay",
        ",message.max.bytes=10000",
        &[
            ("OUTBOX_BATCH_SIZE", "4"),
            ("OUTBOX_MAX_ATTEMPTS", "1"),
            ("OUTBOX_DEAD_BLOCKS_KEY", "true"),
            ("RUST_LOG", "warn,outbox=info,outbox::binlog::revive=debug"),
        ],
    );
    wait_until_following(pool, table);
    // The first dies (too big for the broker) and holds its key; the second is made dead
    // by hand while it waits.
    commit(
        pool,
        store,
        &[outbox::Message::new(topic, "x".repeat(20_000)).with_key("a")],
    );
    assert!(
        wait_for(Duration::from_secs(30), || count(pool, table, "state = 2")
            == 1),
        "the big one dies"
    );
    let mut messages = vec![outbox::Message::new(topic, "a:dead-2").with_key("a")];
    messages
        .extend((1..=WAITING).map(|i| outbox::Message::new(topic, format!("a:{i}")).with_key("a")));
    messages.push(outbox::Message::new(topic, "b:1").with_key("b"));
    commit(pool, store, &messages);
    assert!(delivered(pool, table, 1), "b:1 goes");
    let mut conn = pool.get_conn().unwrap();
    conn.query_drop(format!(
        "UPDATE `{table}` SET state = 2, number_of_attempts = 1, \
         processed_on = UTC_TIMESTAMP(6) WHERE state = 0 ORDER BY id LIMIT 1"
    ))
    .unwrap();
    conn.query_drop(format!(
        "UPDATE `{table}` SET payload = 'a:dead-1' WHERE state = 2 ORDER BY id LIMIT 1"
    ))
    .unwrap();
    assert_eq!(
        count(pool, table, "state = 0"),
        WAITING as u64,
        "a's messages wait behind its dead ones"
    );

    let admin = outbox::admin::Admin::new(store.clone()).unwrap();
    let replayed = admin
        .replay(
            &outbox::admin::DeadFilter {
                topic: Some(topic.to_string()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(replayed.len(), 2, "both replayed in one statement");
    let total = WAITING as u64 + 3;
    assert!(delivered(pool, table, total), "every message goes");
    // Everything, and a little time for a second send of dead-2 to arrive.
    let got = consume(
        topic,
        total as usize,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    let of_a: Vec<String> = payloads(&got)
        .into_iter()
        .filter(|p| p.starts_with("a:"))
        .collect();
    let mut expected = vec!["a:dead-1".to_string(), "a:dead-2".to_string()];
    expected.extend((1..=WAITING).map(|i| format!("a:{i}")));
    assert_eq!(of_a, expected, "each once, in the order they were added");
    let reads: Vec<usize> = logs
        .matching("rows of a released key")
        .iter()
        .map(|line| {
            let (_, after) = line.split_once("read back ").unwrap();
            after.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        reads.len() > 1 && reads.iter().all(|&n| n <= 4),
        "read a batch at a time: {reads:?}"
    );
    assert_eq!(
        reads.iter().sum::<usize>(),
        WAITING + 1,
        "dead-2 and the waiting ones"
    );
    relay.kill().unwrap();
    relay.wait().unwrap();
}

/// The peak resident memory of process `pid`, in KiB (`VmHWM`).
fn peak_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn a_transaction_of_100_000_messages_goes_through_in_bounded_memory(server: Server) {
    const ROWS: usize = 100_000;
    const PAYLOAD: usize = 2_000;
    let f = fixture(server, "binlog_big");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let mut command = relay_command(table, "binlog-big", "", &[]);
    command
        .env("OUTBOX_DATABASE_URL", url)
        .env("OUTBOX_SOURCE", "binlog")
        .env("OUTBOX_BATCH_SIZE", "500")
        .stdin(std::process::Stdio::piped());
    let (mut relay, _) = common::start_relay(command);
    wait_until_following(pool, table);

    let payload = "p".repeat(PAYLOAD);
    let mut tx = pool.start_transaction(mysql::TxOpts::default()).unwrap();
    let outbox = Outbox::new(store);
    for chunk in 0..ROWS / 1_000 {
        let messages: Vec<_> = (0..1_000)
            .map(|i| {
                outbox::Message::new(topic, payload.as_str())
                    .with_key(format!("k{}", (chunk * 1_000 + i) % 100))
            })
            .collect();
        outbox.add_all(&mut tx, &messages).unwrap();
    }
    tx.commit().unwrap();
    assert!(
        wait_for(Duration::from_secs(300), || count(pool, table, "state = 1")
            == ROWS as u64),
        "every message of the transaction is published and marked"
    );
    let peak_mib = peak_memory_kib(relay.id()) / 1024;
    let committed_mib = (ROWS * PAYLOAD / (1024 * 1024)) as u64;
    eprintln!("relay peak memory: {peak_mib} MiB for {committed_mib} MiB of payloads");
    assert!(
        peak_mib < 100,
        "the relay peaked at {peak_mib} MiB for a transaction of {committed_mib} MiB of payloads"
    );
    relay.kill().unwrap();
    relay.wait().unwrap();
}

fn a_position_saved_on_another_server_is_not_resumed_but_caught_up(server: Server) {
    let f = fixture(server, "binlog_failover");
    let (url, pool, store, table, topic) = (
        f.url.as_str(),
        &f.pool,
        &f.store,
        f.table.as_str(),
        f.topic.as_str(),
    );
    let mut relay = start_relay(url, table, "binlog-before").unwrap();
    wait_until_following(pool, table);
    relay.stop().unwrap();
    let ids = commit(pool, store, &keyed(topic, 0, 30));
    // As after a failover: the position names a file and offset of another server, which
    // may well exist here with other contents. Here it names the end of this server's
    // log, past the 30 messages: resumed, it would publish none of them.
    let (file, end) = log_end(pool);
    let mut conn = pool.get_conn().unwrap();
    conn.exec_drop(
        format!(
            "UPDATE `{POSITION_TABLE}` SET server_id = 999, file = ?, position = ? \
             WHERE outbox_table = ?"
        ),
        (&file, end, &table),
    )
    .unwrap();

    let mut relay = start_relay(url, table, "binlog-after").unwrap();
    let server_id: u32 = conn.query_first("SELECT @@server_id").unwrap().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            conn.exec_first::<u32, _, _>(
                format!("SELECT server_id FROM `{POSITION_TABLE}` WHERE outbox_table = ?"),
                (&table,),
            )
            .unwrap()
                == Some(server_id)
        }),
        "the relay caught up and saved a position of this server"
    );
    assert!(delivered(pool, table, 30));
    let got = consume(topic, 30, Duration::from_secs(30), Duration::from_secs(1));
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert_eq!(read, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(got.len(), 30, "each once");
    relay.stop().unwrap();
}

/// Each test above, as a test on MariaDB and one on MySQL.
macro_rules! on_both_servers {
    ($($test:ident),* $(,)?) => {
        mod on_mariadb {
            $(#[test]
            fn $test() {
                super::$test(super::Server::MariaDb)
            })*
        }
        mod on_mysql {
            $(#[test]
            fn $test() {
                super::$test(super::Server::MySql)
            })*
        }
    };
}

on_both_servers!(
    a_relay_killed_every_two_seconds_while_writers_commit_loses_nothing,
    dead_messages_replayed_together_go_once_each_before_the_rest_of_their_key,
    a_row_the_relay_never_read_is_published_by_the_sweep,
    a_long_wait_behind_a_failed_message_is_read_back_from_the_table_in_order,
    a_message_the_broker_never_takes_holds_back_its_own_key_only,
    a_standby_takes_over_within_seconds_of_the_active_relay_cut_off,
    rows_a_session_logs_in_minimal_images_are_read_from_the_table,
    health_names_the_reader_sees_a_busy_relay_alive_and_the_reader_stops_with_it,
    a_log_compressed_while_the_relay_runs_stops_it_until_caught_up_from_the_table,
    a_corrupt_row_holds_its_key_until_an_operator_discards_it,
    a_corrupt_row_is_made_dead_and_the_rest_go_on,
    every_field_comes_through_the_binary_log_as_written,
    every_committed_message_is_published_in_key_order_and_none_rolled_back,
    the_relays_marks_log_no_payload,
    a_relay_killed_mid_stream_resumes_from_its_position_and_loses_nothing,
    a_standby_takes_over_when_the_active_relay_dies,
    a_rotated_then_purged_binary_log_is_caught_up_from_the_table,
    each_missing_server_setting_is_refused_with_its_fix,
    the_broker_down_and_back_loses_nothing_and_keeps_key_order,
    the_database_restarted_mid_stream_loses_nothing,
    a_dead_message_holds_its_key_until_an_operator_discards_it,
    a_transaction_of_100_000_messages_goes_through_in_bounded_memory,
    a_position_saved_on_another_server_is_not_resumed_but_caught_up,
);
