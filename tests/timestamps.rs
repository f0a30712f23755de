//! A record's timestamp is the time its message was added (its row's `created_on`), not
//! the relay's clock when it happened to publish it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use mysql::prelude::Queryable;
use outbox::{KafkaBroker, Message, RECORD_TIMESTAMP};

/// Adds "fresh" and "late" to `table` for `topic`, the late one as if added three hours
/// ago; returns each payload's `created_on` in milliseconds since 1970.
fn add_fresh_and_late(table: &TestTable, topic: &str) -> HashMap<String, i64> {
    table.commit(&[Message::new(topic, "fresh"), Message::new(topic, "late")]);
    table.exec("UPDATE {t} SET created_on = created_on - INTERVAL 3 HOUR WHERE payload = 'late'");
    table
        .conn()
        .query_map(
            format!(
                "SELECT CAST(payload AS CHAR), \
                 TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', created_on) DIV 1000 FROM `{}`",
                table.name
            ),
            |(payload, millis): (String, i64)| (payload, millis),
        )
        .unwrap()
        .into_iter()
        .collect()
}

/// The records of `topic` by payload, once both are published through `broker`.
fn published(table: &TestTable, topic: &str, broker: KafkaBroker) -> HashMap<String, i64> {
    let handle = table.dispatch(broker, fast_settings(), "timestamps");
    assert!(wait_for(Duration::from_secs(20), || table
        .count("state = 1")
        == 2));
    drop(handle);
    consume(topic, 2, Duration::from_secs(10), Duration::ZERO)
        .into_iter()
        .map(|r| {
            let timestamp = r.timestamp.expect("a record timestamp");
            (String::from_utf8(r.payload).unwrap(), timestamp)
        })
        .collect()
}

#[test]
fn a_record_carries_the_time_its_message_was_added_even_when_published_hours_later() {
    let table = TestTable::new("timestamps");
    let topic = unique("timestamps");
    let created = add_fresh_and_late(&table, &topic);
    let read = published(&table, &topic, broker());
    assert_eq!(
        read, created,
        "each record's timestamp is its row's created_on"
    );
}

#[test]
fn publish_time_is_there_for_those_who_ask_for_it() {
    let table = TestTable::new("publish_time");
    let topic = unique("publish_time");
    let created = add_fresh_and_late(&table, &topic);
    let mut properties = test_properties();
    properties.push((RECORD_TIMESTAMP.into(), "publish".into()));
    let broker = KafkaBroker::with_properties(&brokers(), properties).unwrap();
    let read = published(&table, &topic, broker);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (payload, timestamp) in &read {
        assert!(
            (now - timestamp).abs() < 60_000,
            "{payload}: published now, read {timestamp}, now {now}"
        );
    }
    assert!(
        (read["late"] - created["late"]) > 2 * 3_600_000,
        "not the time it was added"
    );
}
