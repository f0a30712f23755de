//! The inbox against the real MariaDB and broker: each message's effect applied once,
//! however often it arrives, whatever fails.

mod applying;
#[path = "../common/mod.rs"]
mod common;
mod faults;
mod groups;

use common::private_db::PrivateDatabase;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::recorder::kept;
use common::*;
use mysql::prelude::Queryable;
use mysql::Transaction;
use outbox::inbox::{
    Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxHandle, InboxSettings, Recorded,
};
use outbox::rdkafka::message::{Header, OwnedHeaders};
use outbox::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use outbox::rdkafka::ClientConfig;
use outbox::{Error, Message, MESSAGE_ID_HEADER};

/// An inbox, a business table and a topic of the test's own; the tables are dropped at
/// the end.
struct Fixture {
    pool: mysql::Pool,
    inbox: Inbox,
    effects: String,
    topic: String,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        Fixture::on(&small_pool_url(), prefix)
    }

    /// A fixture on the database at `url`.
    fn on(url: &str, prefix: &str) -> Fixture {
        let pool = mysql::Pool::new(url).expect("MariaDB (make services)");
        let name = unique(prefix);
        let inbox = Inbox::with_table(pool.clone(), &format!("{name}_inbox")).unwrap();
        inbox.migrate().unwrap();
        let effects = format!("{name}_effects");
        pool.get_conn()
            .unwrap()
            .query_drop(format!(
                "CREATE TABLE `{effects}` (seq BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
                 message_id CHAR(36) NOT NULL, msg_key VARCHAR(100) NULL, payload TEXT NOT NULL)"
            ))
            .unwrap();
        Fixture {
            pool,
            inbox,
            effects,
            topic: unique(prefix).replace('_', "."),
        }
    }

    /// A handler that writes one row per message into the business table.
    fn writer(&self) -> impl FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO `{}` (message_id, msg_key, payload) VALUES (?, ?, ?)",
            self.effects
        );
        move |tx, delivery| {
            tx.exec_drop(
                &sql,
                (
                    delivery.message_id().to_string(),
                    delivery
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    String::from_utf8_lossy(delivery.payload()).into_owned(),
                ),
            )?;
            Ok(())
        }
    }

    fn consumer(&self, assignment: Assignment, settings: InboxSettings) -> InboxConsumer {
        InboxConsumer::new(
            self.inbox.clone(),
            "effects",
            &brokers(),
            assignment,
            settings,
        )
        .unwrap()
    }

    fn explicit(&self, settings: InboxSettings) -> InboxConsumer {
        self.consumer(Assignment::Topics(vec![self.topic.clone()]), settings)
    }

    /// (rows, distinct message ids) in the business table.
    fn effects(&self) -> (u64, u64) {
        self.pool
            .get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM `{}`",
                self.effects
            ))
            .unwrap()
            .unwrap()
    }

    /// Each key's payloads, in the order their effects were written.
    fn payloads_by_key(&self) -> HashMap<String, Vec<String>> {
        let rows: Vec<(Option<String>, String)> = self
            .pool
            .get_conn()
            .unwrap()
            .query(format!(
                "SELECT msg_key, payload FROM `{}` ORDER BY seq",
                self.effects
            ))
            .unwrap();
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for (key, payload) in rows {
            by_key
                .entry(key.unwrap_or_default())
                .or_default()
                .push(payload);
        }
        by_key
    }

    /// Records read so far by the explicitly assigned consumer, by its saved offsets.
    fn records_read(&self) -> i64 {
        self.pool
            .get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COALESCE(SUM(next_offset), 0) FROM `{}_offsets`",
                self.inbox.table()
            ))
            .unwrap()
            .unwrap_or(0)
    }

    fn count(&self, sql: &str) -> u64 {
        let sql = sql.replace("{inbox}", self.inbox.table());
        self.pool
            .get_conn()
            .unwrap()
            .query_first(sql)
            .unwrap()
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(mut conn) = self.pool.get_conn() {
            let t = self.inbox.table();
            let _ = conn.query_drop(format!(
                "DROP TABLE IF EXISTS `{t}`, `{t}_dead`, `{t}_offsets`, `{}`",
                self.effects
            ));
        }
    }
}

/// Publishes `(key, payload, message id)` records to `topic` in order, straight through a
/// producer, and waits for them to be acknowledged.
fn produce(topic: &str, records: &[(String, String, uuid::Uuid)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (key, payload, id) in records {
        let id = id.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: MESSAGE_ID_HEADER,
            value: Some(&id),
        });
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(payload.as_str())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// `n` records over `keys` keys, payload `key:i` with `i` counting per key.
fn keyed_records(n: usize, keys: usize) -> Vec<(String, String, uuid::Uuid)> {
    let mut counts = vec![0; keys];
    (0..n)
        .map(|i| {
            let k = i % keys;
            counts[k] += 1;
            let key = format!("key-{k}");
            (
                key.clone(),
                format!("{key}:{}", counts[k]),
                uuid::Uuid::now_v7(),
            )
        })
        .collect()
}

/// Checks that each key's payloads are `key:1`, `key:2`, ... in order.
fn assert_key_order(by_key: &HashMap<String, Vec<String>>) {
    for (key, payloads) in by_key {
        let numbers: Vec<u64> = payloads
            .iter()
            .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, expected, "key {key}: effects out of order");
    }
}

fn fast() -> InboxSettings {
    InboxSettings {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        replay_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn stop(mut handle: InboxHandle) {
    handle.stop().unwrap();
}

/// `outbox inbox --inbox-table <the fixture's> <args>`: its standard output, after
/// checking that it succeeded.
fn outbox_inbox(f: &Fixture, args: &[&str]) -> String {
    let output = Command::new(outbox_command())
        .args(["inbox", "--inbox-table", f.inbox.table()])
        .args(args)
        .env("OUTBOX_DATABASE_URL", database_url())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The billing service of `examples/inbox_pipeline.rs`, as its own process.
fn billing(topic: &str, tables: &str) -> Child {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("examples").join("inbox_pipeline");
    assert!(path.exists(), "{} (make test builds it)", path.display());
    let mut child = Command::new(path)
        .arg("billing")
        .env("OUTBOX_DATABASE_URL", database_url())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("PIPELINE_TOPIC", topic)
        .env("PIPELINE_TABLES", tables)
        // A transaction per record: slow enough to be killed mid-stream.
        .env("PIPELINE_BATCH", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("billing consumes"), "{line:?}");
    child
}

/// The offsets the consumer group `group` committed on `topic`, by partition.
fn committed(group: &str, topic: &str) -> HashMap<i32, i64> {
    use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
    use outbox::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let partitions = partition_count(topic);
    assert!(partitions > 0, "{topic} has partitions");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        list.add_partition(topic, p);
    }
    let list = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("the group's committed offsets");
    list.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(n) => Some((e.partition(), n)),
            _ => None,
        })
        .collect()
}
