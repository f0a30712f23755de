//! A key's order when the broker refuses one of its messages after accepting it into the
//! queue: the later messages of that key are not published before it.
//!
//! A private Tansu validates the topic's records against a JSON schema, so a payload that
//! is not the schema's JSON is refused by the broker itself (INVALID_RECORD), after
//! librdkafka queued and sent it. The tests' producer sends every message in a record
//! batch of its own (`batch.num.messages=1`): a refusal then takes only that message, and
//! Tansu, which does not enforce the idempotent producer's sequence numbers, would append
//! the later ones of its key behind the gap if they were in flight. With
//! `outbox.strict.key.order` they never are.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::tansu::Tansu;
use common::*;
use outbox::{DispatcherSettings, KafkaBroker, Message};

/// A private Tansu that refuses records of `topic` whose value is not `{"n": <integer>}`.
fn validating_broker(topic: &str) -> Tansu {
    // Tansu reads the schemas from a directory relative to where it runs.
    let relative = format!("target/{}", unique("schemas"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&relative);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{topic}.json")),
        r#"{"type": "object", "properties": {"value": {"type": "object",
            "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}"#,
    )
    .unwrap();
    let mut tansu = Tansu::on_free_port().unwrap();
    tansu.options = vec!["--schema-registry".into(), format!("file://./{relative}")];
    tansu.start().unwrap();
    tansu
}

#[test]
fn a_message_the_broker_refuses_is_not_overtaken_by_the_later_ones_of_its_key() {
    let topic = unique("validated");
    let tansu = validating_broker(&topic);
    let table = TestTable::new("late_rejection");
    let good = |key: &str, n: u32| Message::new(&topic, format!(r#"{{"n":{n}}}"#)).with_key(key);
    table.commit(&[
        good("k", 1),
        Message::new(&topic, "not json").with_key("k"),
        good("k", 3),
        good("k", 4),
        good("j", 1),
        good("j", 2),
    ]);

    let mut properties = test_properties();
    properties.push(("batch.num.messages".into(), "1".into()));
    properties.push((outbox::STRICT_KEY_ORDER.into(), "true".into()));
    let broker = KafkaBroker::with_properties(tansu.address(), properties).unwrap();
    let settings = DispatcherSettings {
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        ..fast_settings()
    };
    let handle = table.dispatch(broker, settings, "late-rejection");
    assert!(
        wait_for(Duration::from_secs(20), || table
            .count("payload = 'not json' AND number_of_attempts >= 3")
            == 1),
        "the refused message was tried, and refused, several times"
    );
    let read = |expected| {
        consume_from(
            tansu.address(),
            &topic,
            expected,
            Duration::from_secs(10),
            Duration::from_millis(500),
        )
    };
    let per_key = |records: &[Consumed]| {
        let mut keys: HashMap<String, Vec<String>> = HashMap::new();
        for r in records {
            let key = r.key.clone().unwrap_or_default();
            keys.entry(key)
                .or_default()
                .push(String::from_utf8_lossy(&r.payload).into_owned());
        }
        keys
    };
    let published = per_key(&read(3));
    assert_eq!(
        published.get("k").cloned().unwrap_or_default(),
        vec![r#"{"n":1}"#],
        "nothing of k after the refused message is published while it is refused"
    );
    assert_eq!(
        published.get("j").cloned().unwrap_or_default(),
        vec![r#"{"n":1}"#, r#"{"n":2}"#],
        "another key flows"
    );
    assert_eq!(
        table.count("state = 0 AND number_of_attempts = 0 AND payload LIKE '{\"n\":%'"),
        2,
        "k's later messages wait, untried"
    );

    // The operator mends the message: then k goes on, in order.
    table.exec(r#"UPDATE {t} SET payload = '{"n":2}' WHERE payload = 'not json'"#);
    assert!(
        wait_for(Duration::from_secs(20), || table.count("state = 1") == 6),
        "everything delivered once the message is mended"
    );
    let published = per_key(&read(6));
    assert_eq!(
        published["k"],
        vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#],
        "k in commit order"
    );
    drop(handle);
}
