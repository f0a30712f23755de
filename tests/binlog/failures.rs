//! Messages that fail: corrupt rows, a broker that refuses or is down, dead messages held and replayed.

use super::*;

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

fn the_broker_down_and_back_loses_nothing_and_keeps_key_order(server: Server) {
    let f = fixture(server, "binlog_broker");
    let (url, pool, store, table, topic) = f.parts();
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

fn a_dead_message_holds_its_key_until_an_operator_discards_it(server: Server) {
    let f = fixture(server, "binlog_dead");
    let (url, pool, store, table, topic) = f.parts();
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
    let (url, pool, store, table, topic) = f.parts();
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

on_both_servers!(
    a_corrupt_row_is_made_dead_and_the_rest_go_on,
    a_corrupt_row_holds_its_key_until_an_operator_discards_it,
    a_message_the_broker_never_takes_holds_back_its_own_key_only,
    a_long_wait_behind_a_failed_message_is_read_back_from_the_table_in_order,
    the_broker_down_and_back_loses_nothing_and_keeps_key_order,
    a_dead_message_holds_its_key_until_an_operator_discards_it,
    dead_messages_replayed_together_go_once_each_before_the_rest_of_their_key,
);
