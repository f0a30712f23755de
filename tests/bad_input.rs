//! Bad input is a clear error and changes nothing in the table.

mod common;

use std::time::Duration;

use common::*;
use mysql::TxOpts;
use outbox::{
    Dispatcher, DispatcherSettings, Error, Message, MySqlStore, Outbox, MAX_HEADERS, MAX_KEY_LEN,
    MAX_MESSAGE_SIZE, MAX_TOPIC_LEN, MESSAGE_ID_HEADER,
};

/// Each bad message, with a case name and what its refusal must say: the rule it broke.
fn bad_messages() -> Vec<(&'static str, Message, String)> {
    let ok = || Message::new("orders", "payload");
    vec![
        (
            "empty topic",
            Message::new("", "p"),
            "topic is empty".into(),
        ),
        (
            "topic with a space",
            Message::new("or ders", "p"),
            "topic \"or ders\" contains ' '".into(),
        ),
        (
            "topic with a slash",
            Message::new("a/b", "p"),
            "topic \"a/b\" contains '/'".into(),
        ),
        (
            "topic '..'",
            Message::new("..", "p"),
            "topic may not be \"..\"".into(),
        ),
        (
            "topic too long",
            Message::new("t".repeat(MAX_TOPIC_LEN + 1), "p"),
            format!(
                "topic is {} characters, the limit is {MAX_TOPIC_LEN}",
                MAX_TOPIC_LEN + 1
            ),
        ),
        (
            "topic with a quote",
            Message::new("x'; DROP TABLE outbox; --", "p"),
            "contains '\\''".into(),
        ),
        (
            "key too long",
            ok().with_key("k".repeat(MAX_KEY_LEN + 1)),
            format!(
                "key is {} bytes, the limit is {MAX_KEY_LEN}",
                MAX_KEY_LEN + 1
            ),
        ),
        (
            "empty header name",
            ok().with_header("", "v"),
            "header name is empty".into(),
        ),
        (
            "header name with NUL",
            ok().with_header("a\0b", "v"),
            "contains a control character".into(),
        ),
        (
            "reserved header",
            ok().with_header(MESSAGE_ID_HEADER, "forged"),
            format!("header name {MESSAGE_ID_HEADER:?} is reserved"),
        ),
        (
            "too many headers",
            (0..=MAX_HEADERS).fold(ok(), |m, i| m.with_header(format!("h{i}"), "v")),
            format!("{} headers, the limit is {MAX_HEADERS}", MAX_HEADERS + 1),
        ),
        (
            "payload too large",
            Message::new("orders", vec![7u8; MAX_MESSAGE_SIZE + 1]),
            format!(
                "message is {} bytes (payload, key and headers), the limit is {MAX_MESSAGE_SIZE}",
                MAX_MESSAGE_SIZE + 1
            ),
        ),
        (
            "headers too large",
            ok().with_header("big", vec![0u8; MAX_MESSAGE_SIZE]),
            format!(
                "message is {} bytes",
                "payload".len() + "big".len() + MAX_MESSAGE_SIZE
            ),
        ),
    ]
}

#[test]
fn every_bad_message_is_refused_and_nothing_is_written() {
    let table = TestTable::new("bad_input");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    for (case, message, rule) in bad_messages() {
        match outbox.add(&mut tx, &message) {
            Err(Error::InvalidMessage(reason)) => {
                assert!(reason.contains(&rule), "{case}: {reason:?} says {rule:?}")
            }
            other => panic!("{case}: expected InvalidMessage, got {other:?}"),
        }
    }
    // The transaction is still usable and nothing from the bad calls is in it.
    outbox
        .add(&mut tx, &Message::new("orders", "good"))
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(table.count("1"), 1);
    assert_eq!(table.count("payload = 'good'"), 1);
}

#[test]
fn one_bad_message_in_a_batch_writes_none_of_it() {
    let table = TestTable::new("bad_batch");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let batch = vec![
        Message::new("orders", "1"),
        Message::new("orders", "2"),
        Message::new("", "bad"),
        Message::new("orders", "3"),
    ];
    assert!(matches!(
        outbox.add_all(&mut tx, &batch),
        Err(Error::InvalidMessage(_))
    ));
    tx.commit().unwrap();
    assert_eq!(table.count("1"), 0);
}

#[test]
fn largest_accepted_message_is_stored_and_published_whole() {
    let table = TestTable::new("large");
    let topic = unique("large");
    let outbox = Outbox::new(&table.store);
    let payload = vec![b'x'; MAX_MESSAGE_SIZE - 10];
    let message = Message::new(&topic, payload.clone())
        .with_key("k")
        .with_header("h", "12345678");
    assert_eq!(
        payload.len() + 1 + 1 + 8,
        MAX_MESSAGE_SIZE,
        "exactly at the limit"
    );
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    outbox.add(&mut tx, &message).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        table.count(&format!("LENGTH(payload) = {}", payload.len())),
        1
    );

    let handle = table.dispatch(broker(), fast_settings(), "large");
    let got = consume(
        &topic,
        1,
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, payload);
    drop(handle);
}

#[test]
fn table_names_that_are_not_plain_identifiers_are_refused() {
    let pool = mysql::Pool::new(database_url().as_str()).unwrap();
    for name in [
        "",
        "outbox; DROP TABLE users",
        "out`box",
        "1outbox",
        "a.b",
        "outbox -- x",
    ] {
        match MySqlStore::with_table(pool.clone(), name) {
            Err(Error::Config(reason)) => {
                assert!(reason.contains("identifier"), "{name}: {reason}")
            }
            other => panic!("{name:?}: expected Config error, got {other:?}"),
        }
    }
}

#[test]
fn a_table_with_an_earlier_layout_is_refused_by_migrate_and_left_as_it_was() {
    use mysql::prelude::Queryable;
    let pool = mysql::Pool::new(database_url().as_str()).unwrap();
    let name = unique("old_layout");
    let mut conn = pool.get_conn().unwrap();
    conn.query_drop(format!(
        "CREATE TABLE `{name}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
         locked_by VARCHAR(100) NULL, payload LONGBLOB NOT NULL)"
    ))
    .unwrap();
    conn.query_drop(format!("INSERT INTO `{name}` (payload) VALUES ('kept')"))
        .unwrap();
    let store = MySqlStore::with_table(pool.clone(), &name).unwrap();
    let outcome = store.migrate();
    let rows: Vec<(Option<String>, Vec<u8>)> = conn
        .query(format!("SELECT locked_by, payload FROM `{name}`"))
        .unwrap();
    conn.query_drop(format!("DROP TABLE `{name}`")).unwrap();
    match outcome {
        Err(Error::Config(reason)) => assert!(reason.contains("earlier"), "{reason}"),
        other => panic!("expected a Config error, got {other:?}"),
    }
    assert_eq!(rows, vec![(None, b"kept".to_vec())]);
}

#[test]
fn invalid_settings_are_refused_at_construction() {
    let table = TestTable::new("bad_settings");
    let d = fast_settings;
    let cases = vec![
        (
            "process_interval must be greater than zero",
            DispatcherSettings {
                process_interval: Duration::ZERO,
                ..d()
            },
        ),
        (
            "batch_size must be 1 to",
            DispatcherSettings {
                batch_size: 0,
                ..d()
            },
        ),
        (
            "max_attempts must be at least 1",
            DispatcherSettings {
                max_attempts: Some(0),
                ..d()
            },
        ),
        (
            "backoff_min must not exceed backoff_max",
            DispatcherSettings {
                backoff_min: Duration::from_secs(2),
                backoff_max: Duration::from_secs(1),
                ..d()
            },
        ),
        (
            "max_lock_duration (1.999s) must be at least 2s",
            DispatcherSettings {
                max_lock_duration: Duration::from_millis(1_999),
                ..d()
            },
        ),
    ];
    // Each refusal names the setting at fault and the rule.
    for (rule, settings) in cases {
        match Dispatcher::new(table.store.clone(), broker(), settings, "bad") {
            Err(Error::Config(reason)) => assert!(reason.contains(rule), "{reason:?}: {rule:?}"),
            Err(other) => panic!("{rule}: expected a Config error, got {other:?}"),
            Ok(_) => panic!("{rule}: the settings were accepted"),
        }
    }
}

#[test]
fn a_wrong_database_password_is_a_clear_error_that_retrying_will_not_fix() {
    let url = database_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let wrong = format!("{scheme}://root:not-the-password@{host}");
    let err: Error = mysql::Pool::new(wrong.as_str())
        .map(|_| ())
        .unwrap_err()
        .into();
    assert!(matches!(err, Error::Database(_)), "{err}");
    assert!(err.to_string().contains("Access denied"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn a_broker_address_that_does_not_resolve_is_refused() {
    match outbox::KafkaBroker::new("kafka.no-such-host.invalid:9092") {
        Err(Error::Config(reason)) => assert!(reason.contains("resolve"), "{reason}"),
        other => panic!("expected Config error, got {other:?}"),
    }
}
