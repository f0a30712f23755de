//! One active relay per table: a standby taking over from one cut off or dead, and the health that shows which runs.

use super::*;

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
    assert_all_read(&committed, &got);
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

fn a_standby_takes_over_when_the_active_relay_dies(server: Server) {
    let f = fixture(server, "binlog_standby");
    let (url, pool, store, table, topic) = f.parts();
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

on_both_servers!(
    a_standby_takes_over_within_seconds_of_the_active_relay_cut_off,
    a_standby_takes_over_when_the_active_relay_dies,
    health_names_the_reader_sees_a_busy_relay_alive_and_the_reader_stops_with_it,
);
