//! `outbox status` and `outbox leases`: counts that match the table, the indexes it reads, `--watch`, and the release of a gone relay's leases.

use super::*;

#[test]
fn status_counts_match_the_table_after_a_drain_with_failures_and_dead_rows() {
    let table = TestTable::new("admin_status");
    let (a, b) = (unique("admin_a"), unique("admin_b"));
    // Topic a: 20 good messages and 3 that die; topic b: 10 good ones.
    let mut messages: Vec<Message> = (0..20)
        .map(|i| Message::new(&a, format!("a{i}")).with_key(format!("k{}", i % 4)))
        .collect();
    messages.extend((0..3).map(|i| too_large(&a, &format!("dead{i}"))));
    messages.extend((0..10).map(|i| Message::new(&b, format!("b{i}"))));
    table.commit(&messages);
    let handle = table.dispatch(small_message_broker(), settings(1, false), "admin_status");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 3
        && table.count("state = 1") == 30));
    drop(handle);

    // Then: a failure backing off for an hour on topic b, and messages nobody relays yet,
    // four of them leased by a dispatcher that is gone.
    table.commit(&[too_large(&b, "retry")]);
    let retry = DispatcherSettings {
        max_attempts: None,
        backoff_min: Duration::from_secs(3_600),
        backoff_max: Duration::from_secs(7_200),
        ..fast_settings()
    };
    let handle = table.dispatch(small_message_broker(), retry, "admin_status_retry");
    assert!(wait_for(Duration::from_secs(30), || table.count(
        "state = 0 AND number_of_attempts = 1 AND locked_by = 0"
    ) == 1));
    drop(handle);
    // A reminder due in an hour: pending and scheduled, and not late.
    table.commit(&[Message::new(&b, "reminder").deliver_after(Duration::from_secs(3_600))]);
    table.commit(
        &(0..6)
            .map(|i| Message::new(&a, format!("later{i}")))
            .collect::<Vec<_>>(),
    );
    let gone = lease_of("gone#00000001");
    table.exec(&format!(
        "UPDATE {{t}} SET locked_by = {gone}, locked_on = UTC_TIMESTAMP(6) - INTERVAL 90 SECOND \
         WHERE state = 0 AND payload LIKE 'later%' ORDER BY id LIMIT 4"
    ));

    let status = outbox_json(&table.name, &["status"]);
    for topic in [&a, &b] {
        let entry = status["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == topic.as_str())
            .unwrap_or_else(|| panic!("topic {topic} in {status}"));
        let of = |condition: &str| table.count(&format!("topic = '{topic}' AND {condition}"));
        assert_eq!(entry["pending"], of("state = 0"), "{topic}");
        assert_eq!(
            entry["backing_off"],
            of("state = 0 AND locked_by = 0 AND number_of_attempts > 0 \
                AND available_on > UTC_TIMESTAMP(6)"),
            "{topic}"
        );
        assert_eq!(
            entry["scheduled"],
            of("state = 0 AND locked_by = 0 AND number_of_attempts = 0 \
                AND available_on > UTC_TIMESTAMP(6)"),
            "{topic}"
        );
        assert_eq!(
            entry["leased"],
            of("state = 0 AND locked_by <> 0"),
            "{topic}"
        );
        assert_eq!(entry["delivered"], of("state = 1"), "{topic}");
        assert_eq!(entry["dead"], of("state = 2"), "{topic}");
        assert_eq!(entry["discarded"], 0);
        let oldest: i64 = table
            .conn()
            .query_first(format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_on), UTC_TIMESTAMP(6)) FROM `{}` \
                 WHERE topic = '{topic}' AND state = 0 AND payload <> 'reminder'",
                table.name
            ))
            .unwrap()
            .unwrap();
        let lag = entry["lag_seconds"].as_f64().unwrap();
        let oldest = oldest as f64 / 1e6;
        assert!(
            lag <= oldest && lag > oldest - 5.0,
            "{topic}: lag {lag}, oldest {oldest}"
        );
    }
    let total = &status["total"];
    assert_eq!(
        total["pending"], 8,
        "6 later, 1 retrying, 1 reminder: {status}"
    );
    assert_eq!(total["backing_off"], 1);
    assert_eq!(total["scheduled"], 1);
    assert_eq!(total["leased"], 4);
    assert_eq!(total["delivered"], 30);
    assert_eq!(total["dead"], 3);
    let leases = status["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{status}");
    assert_eq!(leases[0]["owner"], Owner::of("gone#00000001").to_string());
    assert_eq!(leases[0]["rows"], 4);
    assert!(leases[0]["oldest_seconds"].as_f64().unwrap() >= 90.0);

    // The people's form says the same.
    let text = outbox(&table.name, &["status"]);
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with(&a)).unwrap();
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[1..8], ["6", "0", "0", "4", "20", "3", "0"], "{text}");
    assert!(
        text.contains(&Owner::of("gone#00000001").to_string()),
        "{text}"
    );

    // --max-lag: exit 1 above it, 0 below it.
    table.exec(
        "UPDATE {t} SET created_on = created_on - INTERVAL 1 HOUR, \
         available_on = available_on - INTERVAL 1 HOUR WHERE state = 0 AND payload <> 'reminder'",
    );
    let over = outbox(&table.name, &["status", "--max-lag", "30m"]);
    assert_eq!(over.status.code(), Some(1), "{}", printed(&over));
    assert!(
        printed(&over).contains("above --max-lag 30m"),
        "{}",
        printed(&over)
    );
    let under = outbox(&table.name, &["status", "--max-lag", "2h"]);
    assert_eq!(under.status.code(), Some(0), "{}", printed(&under));
}

#[test]
fn status_reads_indexes_and_watch_prints_a_line_a_second() {
    let table = TestTable::new("admin_watch");
    let admin = Admin::new(table.store.clone()).unwrap();
    let plans = admin.explain_status().unwrap();
    assert!(!plans.is_empty());
    // Every read of the table goes through an index; the rows a query derives on the way
    // (`<derived2>`) are its own.
    for plan in plans.iter().filter(|plan| !plan.contains("table=<derived")) {
        assert!(!plan.contains("type=ALL"), "no table scan: {plans:?}");
        assert!(
            ["key=state_id", "key=key_order", "key=state_processed"]
                .iter()
                .any(|key| plan.contains(key)),
            "an index: {plans:?}"
        );
    }
    assert!(
        plans
            .iter()
            .any(|plan| plan.contains("key=state_processed")),
        "the dead rows, for the keys they hold back: {plans:?}"
    );

    let topic = unique("admin_watch");
    table.commit(&[Message::new(&topic, "one")]);
    let handle = table.dispatch(broker(), fast_settings(), "admin_watch");
    let mut watch = Command::new(outbox_command())
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .args(["--table", &table.name, "status", "--watch", "--json"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (line_tx, printed) = crossbeam_channel::unbounded();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });
    let lines: Vec<Json> = (0..4)
        .map(|i| {
            let line = printed
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("line {i} printed"));
            serde_json::from_str(&line).unwrap()
        })
        .collect();
    watch.kill().unwrap();
    watch.wait().unwrap();
    drop(handle);
    // A line a second, by the database's clock when each was read: never faster, and
    // not much slower while the queries take milliseconds.
    let times: Vec<jiff::Timestamp> = lines
        .iter()
        .map(|line| line["at"].as_str().unwrap().parse().unwrap())
        .collect();
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]).as_secs_f64();
        assert!(
            (0.5..5.0).contains(&gap),
            "{gap} s between lines: {lines:?}"
        );
    }
    for line in &lines {
        assert!(line["total"]["delivered_per_second"].is_number(), "{line}");
        assert_eq!(line["table"], table.name.as_str());
    }
}

#[test]
fn releasing_a_gone_relays_leases_lets_another_dispatcher_take_its_rows_at_once() {
    let table = TestTable::new("admin_release");
    let topic = unique("admin_release");
    let ids = table.commit(
        &(0..20)
            .map(|i| Message::new(&topic, format!("m{i}")))
            .collect::<Vec<_>>(),
    );
    // A relay whose broker never answers claims the rows, then is killed holding them.
    let mut command = relay_command(&table.name, "admin_gone", "", &[]);
    command.env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9");
    command.stdin(Stdio::piped());
    let (mut relay, owner) = start_relay(command);
    assert!(wait_for(Duration::from_secs(10), || table
        .count(&leased_by(&owner))
        == 20));
    relay.kill().unwrap();
    relay.wait().unwrap();

    // Another dispatcher, whose leases last minutes, finds nothing it may take.
    let long_leases = DispatcherSettings {
        max_lock_duration: Duration::from_secs(300),
        ..fast_settings()
    };
    let handle = table.dispatch(broker(), long_leases, "admin_release_ok");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        table.count("state = 1"),
        0,
        "the gone relay's rows are still leased"
    );

    let leases = outbox_json(&table.name, &["leases"]);
    assert_eq!(leases["leases"][0]["owner"], Owner::of(&owner).to_string());
    assert_eq!(leases["leases"][0]["rows"], 20);
    let released = outbox(&table.name, &["leases", "--release", &owner]);
    assert_eq!(released.status.code(), Some(0), "{}", printed(&released));
    assert!(
        printed(&released).contains("released 20 rows"),
        "{}",
        printed(&released)
    );
    let started = Instant::now();
    assert!(wait_for(Duration::from_secs(10), || table
        .count("state = 1")
        == 20));
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(handle);
    let got = consume(
        &topic,
        20,
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    let mut sent: Vec<String> = got.iter().map(|r| r.message_id()).collect();
    sent.sort();
    let mut expected = ids.clone();
    expected.sort();
    sent.dedup();
    assert_eq!(sent, expected);
}
