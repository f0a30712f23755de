//! Where the relay resumes: killed once or in a loop, the database restarted, the log rotated and purged, compressed, or a position from another server.

use super::*;

fn a_relay_killed_mid_stream_resumes_from_its_position_and_loses_nothing(server: Server) {
    const KEYS: usize = 10;
    let f = fixture(server, "binlog_kill");
    let (url, pool, store, table, topic) = f.parts();
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
    let read = assert_all_read(&committed, &got);
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
    let (url, pool, store, table, topic) = f.parts();
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
    assert_all_read(&committed, &got);
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

fn a_rotated_then_purged_binary_log_is_caught_up_from_the_table(server: Server) {
    let f = fixture(server, "binlog_purge");
    let (url, pool, store, table, topic) = f.parts();
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

fn a_position_saved_on_another_server_is_not_resumed_but_caught_up(server: Server) {
    let f = fixture(server, "binlog_failover");
    let (url, pool, store, table, topic) = f.parts();
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

on_both_servers!(
    a_relay_killed_mid_stream_resumes_from_its_position_and_loses_nothing,
    a_relay_killed_every_two_seconds_while_writers_commit_loses_nothing,
    the_database_restarted_mid_stream_loses_nothing,
    a_rotated_then_purged_binary_log_is_caught_up_from_the_table,
    a_position_saved_on_another_server_is_not_resumed_but_caught_up,
    a_log_compressed_while_the_relay_runs_stops_it_until_caught_up_from_the_table,
);
