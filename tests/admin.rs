//! The `outbox` command an operator runs, built and run against the real MariaDB and the
//! real broker: status, dead messages, replay, discard, leases, and bad input.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mysql::prelude::Queryable;
use outbox::admin::{Admin, Owner};
use outbox::{DispatcherSettings, Message, Store};
use serde_json::Value as Json;

/// `outbox --table <table> <args>` against the tests' database.
fn outbox(table: &str, args: &[&str]) -> Output {
    Command::new(outbox_command())
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .env("OUTBOX_TABLE", table)
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The JSON `outbox` prints for `args` (with `--json` added), which must succeed.
fn outbox_json(table: &str, args: &[&str]) -> Json {
    let mut args = args.to_vec();
    args.push("--json");
    let output = outbox(table, &args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {}",
        printed(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {}", printed(&output)))
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn too_large(topic: &str, key: &str) -> Message {
    Message::new(topic, vec![b'x'; 20_000]).with_key(key)
}

/// The table's checksum: any change to any row changes it.
fn checksum(table: &TestTable) -> u64 {
    let row: Option<(String, Option<u64>)> = table
        .conn()
        .query_first(format!("CHECKSUM TABLE `{}` EXTENDED", table.name))
        .unwrap();
    row.and_then(|(_, sum)| sum).expect("a checksum")
}

/// The row id of the message with this message id.
fn row_id(table: &TestTable, message_id: &str) -> u64 {
    table
        .conn()
        .exec_first(
            format!(
                "SELECT id FROM `{}` WHERE message_id = UNHEX(REPLACE(?, '-', ''))",
                table.name
            ),
            (message_id,),
        )
        .unwrap()
        .unwrap()
}

fn settings(max_attempts: u32, dead_blocks_key: bool) -> DispatcherSettings {
    DispatcherSettings {
        max_attempts: Some(max_attempts),
        dead_blocks_key,
        ..fast_settings()
    }
}

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
            of("state = 0 AND locked_by = 0 AND available_on > UTC_TIMESTAMP(6)"),
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
                 WHERE topic = '{topic}' AND state = 0",
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
    assert_eq!(total["pending"], 7, "6 later, 1 retrying: {status}");
    assert_eq!(total["backing_off"], 1);
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
    assert_eq!(cells[1..7], ["6", "0", "4", "20", "3", "0"], "{text}");
    assert!(
        text.contains(&Owner::of("gone#00000001").to_string()),
        "{text}"
    );

    // --max-lag: exit 1 above it, 0 below it.
    table.exec("UPDATE {t} SET created_on = created_on - INTERVAL 1 HOUR WHERE state = 0");
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

/// A lease a dispatcher with this owner name takes.
fn lease_of(owner: &str) -> u64 {
    *outbox::MySqlStore::leases_of(owner).start() | 1
}

#[test]
fn replay_by_id_and_by_filter_delivers_in_key_order_with_a_dispatcher_running() {
    let table = TestTable::new("admin_replay");
    let topic = unique("admin_replay");
    // Two keys, each with a message that dies second in line; dead messages hold their
    // keys back, so the two behind each wait.
    let mut messages = Vec::new();
    for key in ["p", "q"] {
        messages.push(Message::new(&topic, format!("{key}1")).with_key(key));
        messages.push(too_large(&topic, key));
        messages.push(Message::new(&topic, format!("{key}3")).with_key(key));
        messages.push(Message::new(&topic, format!("{key}4")).with_key(key));
    }
    let ids = table.commit(&messages);
    let handle = table.dispatch(small_message_broker(), settings(1, true), "admin_replay");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 2
        && table.count("state = 1") == 2));
    drop(handle);

    // A dispatcher that can send them runs; the dead messages still hold their keys.
    let handle = table.dispatch(broker(), settings(1, true), "admin_replay_ok");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(table.count("state = 1"), 2);

    // A dry run says which, and changes nothing.
    let before = checksum(&table);
    let dry = outbox_json(&table.name, &["replay", "--id", &ids[1], "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["count"], 1);
    assert_eq!(dry["messages"][0]["message_id"], ids[1].as_str());
    assert_eq!(
        dry["messages"][0]["error"].as_str().map(|e| !e.is_empty()),
        Some(true)
    );
    let all = outbox_json(&table.name, &["replay", "--all", "--dry-run"]);
    assert_eq!(all["count"], 2);
    assert_eq!(checksum(&table), before, "a dry run changes nothing");

    // By message id: key p's three go out, in order.
    let replayed = outbox_json(&table.name, &["replay", "--id", &ids[1]]);
    assert_eq!(replayed["count"], 1);
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 5));
    assert_eq!(
        table.count("msg_key = 'q' AND state = 0"),
        2,
        "q still waits"
    );

    // By filter (its key and a word of its error): key q's.
    let row = row_id(&table, &ids[5]).to_string();
    let listed = outbox_json(&table.name, &["dead", "list", "--key", "q"]);
    assert_eq!(listed["messages"][0]["id"].to_string(), row);
    let replayed = outbox_json(&table.name, &["replay", "--key", "q", "--error", "SIZE"]);
    assert_eq!(replayed["count"], 1, "{replayed}");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 8));
    drop(handle);

    let got = consume(
        &topic,
        8,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    for (key, expected) in [("p", &ids[..4]), ("q", &ids[4..])] {
        let sent: Vec<String> = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .map(|r| r.message_id())
            .collect();
        assert_eq!(sent, expected, "key {key}'s messages, once each, in order");
    }
    // The replayed rows started over: one attempt, the one that delivered them.
    assert_eq!(
        table.count("state = 1 AND LENGTH(payload) = 20000 AND number_of_attempts = 1"),
        2
    );
}

#[test]
fn discard_takes_dead_messages_out_of_the_work_and_retention_deletes_them() {
    let table = TestTable::new("admin_discard");
    let topic = unique("admin_discard");
    let ids = table.commit(&[
        too_large(&topic, "k"),
        Message::new(&topic, "after").with_key("k"),
        too_large(&topic, "other"),
    ]);
    let handle = table.dispatch(small_message_broker(), settings(1, true), "admin_discard");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 2));
    assert_eq!(table.count("state = 0"), 1, "k's later message waits");

    let before = outbox_json(&table.name, &["status"]);
    assert_eq!(before["total"]["dead"], 2);
    let discarded = outbox_json(&table.name, &["discard", "--id", &ids[0]]);
    assert_eq!(discarded["count"], 1);
    // The key's held message goes on; the discarded one is no work and not dead.
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 1));
    drop(handle);
    let after = outbox_json(&table.name, &["status"]);
    assert_eq!(after["total"]["dead"], 1);
    assert_eq!(after["total"]["discarded"], 1);
    assert_eq!(after["total"]["pending"], 0);
    assert_eq!(after["total"]["lag_seconds"], Json::Null);
    assert_eq!(
        table.count("state = 3 AND processed_on > UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE"),
        1
    );
    let dead = outbox_json(&table.name, &["dead", "list"]);
    assert_eq!(dead["messages"].as_array().unwrap().len(), 1);
    assert_eq!(dead["messages"][0]["message_id"], ids[2].as_str());

    // A discarded message cannot be replayed by id: it is not dead.
    let refused = outbox(&table.name, &["replay", "--id", &ids[0]]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        printed(&refused).contains("is discarded, not dead"),
        "{}",
        printed(&refused)
    );

    // Retention deletes it with the delivered rows; the dead one stays.
    let deleted = table.store.purge_delivered(Duration::ZERO, 100).unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(table.count("state = 2"), 1);
    assert_eq!(table.count("state <> 2"), 0);
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

#[test]
fn bad_input_exits_2_with_one_line_and_changes_nothing() {
    let table = TestTable::new("admin_bad");
    let topic = unique("admin_bad");
    let ids = table.commit(&[too_large(&topic, "k"), Message::new(&topic, "fine")]);
    let handle = table.dispatch(small_message_broker(), settings(1, false), "admin_bad");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 1
        && table.count("state = 1") == 1));
    drop(handle);
    let plain = unique("not_outbox");
    table
        .conn()
        .query_drop(format!(
            "CREATE TABLE `{plain}` (id INT PRIMARY KEY, state INT)"
        ))
        .unwrap();
    let delivered = row_id(&table, &ids[1]).to_string();
    let before = checksum(&table);

    let secret = "hunter2secret";
    let refused = |table: &str, url: Option<&str>, args: &[&str], says: &str| {
        let mut command = Command::new(outbox_command());
        command
            .env(
                "OUTBOX_DATABASE_URL",
                url.map_or_else(small_pool_url, str::to_string),
            )
            .env("OUTBOX_TABLE", table)
            .args(args)
            .stdin(Stdio::null());
        let output = command.output().unwrap();
        let text = printed(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(output.stdout.is_empty(), "{args:?}: {text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(!text.contains(secret), "{args:?}: {text}");
    };
    let t = table.name.as_str();
    refused(t, None, &["dead", "show", "999999"], "no message 999999");
    refused(t, None, &["replay", "--id", "999999"], "no message 999999");
    refused(
        t,
        None,
        &["discard", "--id", &delivered],
        "is delivered, not dead",
    );
    refused(
        t,
        None,
        &["replay", "--id", &ids[0], "--id", "999999"],
        "no message 999999",
    );
    refused(t, None, &["replay", "--id", "12ab"], "neither a row id");
    refused(
        t,
        None,
        &["replay", "--died-after", "yesterday"],
        "neither a time",
    );
    refused(
        t,
        None,
        &["dead", "list", "--key-hex", "zz"],
        "not hexadecimal",
    );
    refused(t, None, &["replay"], "--all for every dead message");
    refused(t, None, &["status", "--max-lag", "soon"], "not a duration");
    refused(
        t,
        None,
        &["leases", "--release", " "],
        "8 hexadecimal digits or a name",
    );
    refused(&plain, None, &["replay", "--all"], "is not an outbox table");
    refused(
        "no_such_table",
        None,
        &["status"],
        "no table `no_such_table`",
    );
    refused("bad-name", None, &["status"], "not a plain identifier");
    let unreachable = format!("mysql://root:{secret}@127.0.0.1:1/test");
    refused(
        t,
        Some(&unreachable),
        &["status"],
        "cannot reach the database",
    );
    let wrong_password = format!("mysql://root:{secret}@127.0.0.1:3306/test");
    refused(
        t,
        Some(&wrong_password),
        &["replay", "--all"],
        "cannot reach the database",
    );
    let bad_url = format!("mysql://root:{secret}@127.0.0.1:3306/test?pool_min=x");
    refused(t, Some(&bad_url), &["status"], "is not a MySQL URL");
    assert_eq!(checksum(&table), before, "nothing changed");
    assert_eq!(table.count("state = 2"), 1);
    table
        .conn()
        .query_drop(format!("DROP TABLE `{plain}`"))
        .unwrap();
}

#[test]
fn dead_messages_list_in_pages_and_show_whole() {
    let table = TestTable::new("admin_show");
    let topic = unique("admin_show");
    let message = too_large(&topic, "k\u{e9}y")
        .with_header("event-type", "OrderCreated")
        .with_header("binary", vec![0u8, 255]);
    let mut messages = vec![message];
    messages.extend((0..4).map(|i| too_large(&topic, &format!("k{i}"))));
    let ids = table.commit(&messages);
    let handle = table.dispatch(small_message_broker(), settings(1, false), "admin_show");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 5));
    drop(handle);

    // Pages of two: 2, 2, 1, each after the last id of the one before.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["dead", "list", "--limit", "2"];
        if let Some(after) = &after {
            args.extend(["--after-id", after.as_str()]);
        }
        let page = outbox_json(&table.name, &args);
        seen.extend(
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["message_id"].as_str().unwrap().to_string()),
        );
        match page["next_after_id"].as_u64() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let shown = outbox_json(&table.name, &["dead", "show", &ids[0]]);
    assert_eq!(shown["state"], "dead");
    assert_eq!(shown["key"], "k\u{e9}y");
    assert_eq!(shown["payload_bytes"], 20_000);
    assert_eq!(shown["payload"].as_str().map(str::len), Some(20_000));
    assert_eq!(
        shown["headers"],
        serde_json::json!([["event-type", "OrderCreated"], ["binary", [0, 255]]])
    );
    assert_eq!(shown["attempts"], 1);
    assert!(shown["processed"].is_string() && shown["locked_on"].is_string());
    let by_row = outbox_json(
        &table.name,
        &["dead", "show", &row_id(&table, &ids[0]).to_string()],
    );
    assert_eq!(by_row, shown);
    let text = outbox(&table.name, &["dead", "show", &ids[0]]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("event-type: OrderCreated") && text.contains("state           dead"),
        "{text}"
    );
}

#[test]
fn status_reads_indexes_and_watch_prints_a_line_a_second() {
    let table = TestTable::new("admin_watch");
    let admin = Admin::new(table.store.clone()).unwrap();
    let plans = admin.explain_status().unwrap();
    assert!(!plans.is_empty());
    for plan in &plans {
        assert!(!plan.contains("type=ALL"), "no table scan: {plans:?}");
        assert!(
            plan.contains("key=state_id") || plan.contains("key=key_order"),
            "an index: {plans:?}"
        );
    }

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
