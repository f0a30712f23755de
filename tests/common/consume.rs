//! Reading records back from the broker, as a consumer would.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::rdkafka::message::{Headers, Message as _};
use outbox::rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::*;

/// A record as read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    /// The key as text (lossy), and as it was read.
    pub key: Option<String>,
    pub key_bytes: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp, in milliseconds since 1970.
    pub timestamp: Option<i64>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn message_id(&self) -> String {
        String::from_utf8(
            self.header(outbox::MESSAGE_ID_HEADER)
                .expect("message id header")
                .to_vec(),
        )
        .unwrap()
    }
}

/// Reads `topic` from the beginning until `expected` records arrived, then `linger` more
/// (to catch records that should not be there), or until `timeout`.
pub fn consume(topic: &str, expected: usize, timeout: Duration, linger: Duration) -> Vec<Consumed> {
    consume_from(&brokers(), topic, expected, timeout, linger)
}

/// As [`consume`], from the brokers at `servers`.
pub fn consume_from(
    servers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    linger: Duration,
) -> Vec<Consumed> {
    consume_with(&[], servers, topic, expected, timeout, linger)
}

/// As [`consume_from`], with further consumer properties (TLS, say).
pub fn consume_with(
    properties: &[(&str, &str)],
    servers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    linger: Duration,
) -> Vec<Consumed> {
    consume_until(properties, servers, topic, timeout, linger, |got| {
        got.len() >= expected
    })
}

/// Reads `topic` from the beginning until every message of `ids` arrived (however many
/// records that took: duplicates are allowed), then `linger` more, or until `timeout`.
pub fn consume_ids(
    topic: &str,
    ids: &std::collections::HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Consumed> {
    let mut seen = std::collections::HashSet::new();
    let mut read = 0;
    consume_until(&[], &brokers(), topic, timeout, linger, |got| {
        for record in &got[read..] {
            seen.insert(record.message_id());
        }
        read = got.len();
        ids.iter().all(|id| seen.contains(id))
    })
}

/// Reads `topic` from the beginning until `done` holds of what was read, then `linger`
/// more (to catch records that should not be there), or until `timeout`.
pub fn consume_until(
    properties: &[(&str, &str)],
    servers: &str,
    topic: &str,
    timeout: Duration,
    linger: Duration,
    mut done: impl FnMut(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", servers)
        .set("group.id", unique("test"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (name, value) in properties {
        config.set(*name, *value);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let count = metadata
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
            .unwrap_or(0);
        if count > 0 {
            break count;
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();

    let mut out = Vec::new();
    let mut stop_at = deadline;
    while Instant::now() < stop_at {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                key_bytes: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
                timestamp: m.timestamp().to_millis(),
            });
            if stop_at == deadline && done(&out) {
                stop_at = stop_at.min(Instant::now() + linger);
            }
        }
    }
    out
}

/// How many times each message id was read.
pub fn id_counts(records: &[Consumed]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in records {
        *counts.entry(r.message_id()).or_insert(0) += 1;
    }
    counts
}

/// Partitions of `topic`, by the broker's metadata (0 if it does not exist yet).
pub fn partition_count(topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()
        .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
        .unwrap_or(0)
}

/// Checks that every message id in `committed` was read in `got`; returns the ids read.
pub fn assert_all_read(committed: &HashSet<String>, got: &[Consumed]) -> HashSet<String> {
    let read: HashSet<String> = got.iter().map(Consumed::message_id).collect();
    assert!(
        committed.is_subset(&read),
        "{} of {} committed messages missing",
        committed.difference(&read).count(),
        committed.len()
    );
    read
}
