//! Property: any message `add` accepts comes out of the broker byte for byte (topic, key
//! as text or bytes, headers in order, payload), with the message id it was given: added
//! on the caller's transaction or kept for the COMMIT of an `OutboxTransaction`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use outbox::{Message, MESSAGE_ID_HEADER};
use proptest::collection::vec;
use proptest::prelude::*;

/// Any text without control characters (what header names may hold).
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(
        any::<char>().prop_filter("no control characters", |c| !c.is_control()),
        1..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn message(topic: String) -> impl Strategy<Value = Message> {
    (
        // Keys: text, or any bytes (a schema registry's 0x00-framed keys among them).
        proptest::option::of(prop_oneof![
            text(40).prop_map(String::into_bytes),
            vec(any::<u8>(), 1..40),
        ]),
        vec((text(20), vec(any::<u8>(), 0..64)), 0..6),
        vec(any::<u8>(), 0..2_000),
    )
        .prop_map(move |(key, headers, payload)| {
            let mut message = Message::new(topic.clone(), payload);
            if let Some(key) = key {
                message = message.with_key(key);
            }
            for (name, value) in headers {
                message = message.with_header(name, value);
            }
            message
        })
}

/// A batch of messages on one topic: a fresh base name and a random legal suffix.
fn batch() -> impl Strategy<Value = Vec<Message>> {
    "[A-Za-z0-9._-]{0,12}".prop_flat_map(|suffix| {
        let topic = format!("{}{suffix}", unique("roundtrip"));
        vec(message(topic), 1..25)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn accepted_messages_come_out_of_the_broker_byte_for_byte(messages in batch()) {
        round_trip(messages, TestTable::commit)?;
    }

    #[test]
    fn messages_written_with_the_commit_come_out_byte_for_byte(messages in batch()) {
        round_trip(messages, TestTable::commit_on_commit)?;
    }
}

/// Writes `messages` with `write`, relays them, and checks what the broker hands out.
fn round_trip(
    messages: Vec<Message>,
    write: fn(&TestTable, &[Message]) -> Vec<String>,
) -> Result<(), TestCaseError> {
    let messages: Vec<Message> = messages
        .into_iter()
        .filter(|m| {
            m.headers()
                .iter()
                .all(|(n, _)| !n.eq_ignore_ascii_case(MESSAGE_ID_HEADER))
        })
        .collect();
    prop_assume!(!messages.is_empty());
    for m in &messages {
        prop_assert!(m.validate().is_ok(), "{m:?}");
    }
    let table = TestTable::new("roundtrip");
    let ids = write(&table, &messages);
    let handle = table.dispatch(broker(), fast_settings(), "roundtrip");
    let topic = messages[0].topic().to_string();
    let got = consume(
        &topic,
        messages.len(),
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    drop(handle);
    // Each message exactly once: every id read once, and no id but those written.
    let counts = id_counts(&got);
    prop_assert!(counts.values().all(|&n| n == 1), "{:?}", counts);
    prop_assert_eq!(
        counts.keys().collect::<std::collections::HashSet<_>>(),
        ids.iter().collect::<std::collections::HashSet<_>>()
    );

    let sent: HashMap<&String, &Message> = ids.iter().zip(&messages).collect();
    for record in &got {
        let id = record.message_id();
        let original = sent[&id];
        prop_assert_eq!(record.key_bytes.as_deref(), original.key());
        prop_assert_eq!(&record.payload[..], original.payload());
        let mut expected: Vec<(String, Vec<u8>)> = original.headers().to_vec();
        expected.push((MESSAGE_ID_HEADER.to_string(), id.clone().into_bytes()));
        prop_assert_eq!(&record.headers, &expected);
    }
    Ok(())
}
