//! What the relay publishes: every committed row, whole, in order, and none it should not; rows logged in part; a row it never read.

use super::*;

fn every_committed_message_is_published_in_key_order_and_none_rolled_back(server: Server) {
    const KEYS: usize = 20;
    let f = fixture(server, "binlog");
    let (url, pool, store, table, topic) = f.parts();
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

fn a_transaction_of_100_000_messages_goes_through_in_bounded_memory(server: Server) {
    const ROWS: usize = 100_000;
    const PAYLOAD: usize = 2_000;
    let f = fixture(server, "binlog_big");
    let (url, pool, store, table, topic) = f.parts();
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

/// A broker that counts its publish calls: each is one produce request or more.
struct CountingBroker {
    inner: outbox::KafkaBroker,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl outbox::Broker for CountingBroker {
    fn publish(&mut self, records: &[outbox::Record]) -> Vec<outbox::Result<()>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.publish(records)
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}

/// Commits 20 messages one per transaction, 20 ms apart, while a relay with `linger` follows, and
/// returns in how many publish calls they went out, and how long the commits took.
fn publishes_of_a_stream(server: Server, linger: Duration) -> (usize, Duration) {
    const N: usize = 20;
    let f = fixture(server, "binlog_linger");
    let binlog = BinlogSettings {
        linger,
        ..BinlogSettings::default()
    };
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = CountingBroker {
        inner: broker(),
        calls: calls.clone(),
    };
    let mut relay = BinlogRelay::new(
        mysql::Opts::from_url(&f.url).unwrap(),
        &f.table,
        counting,
        fast_settings(),
        binlog,
        "binlog-linger",
    )
    .unwrap()
    .start()
    .unwrap();
    wait_until_following(&f.pool, &f.table);
    let mut conn = f.pool.get_conn().unwrap();
    let before = calls.load(Ordering::SeqCst);
    let started = Instant::now();
    // A commit every 20 ms: slower than a publish, so that without a linger each one
    // goes out on its own.
    for message in keyed(&f.topic, 0, N) {
        commit_each_on(&mut conn, &f.store, &[message]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    assert!(delivered(&f.pool, &f.table, N as u64), "all delivered");
    let publishes = calls.load(Ordering::SeqCst) - before;
    let got = consume(&f.topic, N, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(got.len(), N, "each once");
    assert_key_order(&got, false);
    relay.stop().unwrap();
    (publishes, took)
}

fn with_a_linger_a_stream_of_commits_goes_out_in_a_few_batches(server: Server) {
    let linger = Duration::from_millis(200);
    let (lingered, took) = publishes_of_a_stream(server, linger);
    let most = (took.as_millis() / linger.as_millis()) as usize + 2;
    assert!(
        lingered <= most,
        "{lingered} publishes for 20 commits in {took:?} with a linger of {linger:?}"
    );
    // Without a linger, each commit goes out as it is read.
    let (each, took) = publishes_of_a_stream(server, Duration::ZERO);
    assert!(
        each >= 10,
        "{each} publishes without a linger for 20 commits in {took:?}, {lingered} with one"
    );
}

on_both_servers!(
    every_committed_message_is_published_in_key_order_and_none_rolled_back,
    the_relays_marks_log_no_payload,
    every_field_comes_through_the_binary_log_as_written,
    rows_a_session_logs_in_minimal_images_are_read_from_the_table,
    a_transaction_of_100_000_messages_goes_through_in_bounded_memory,
    a_row_the_relay_never_read_is_published_by_the_sweep,
    with_a_linger_a_stream_of_commits_goes_out_in_a_few_batches,
);
