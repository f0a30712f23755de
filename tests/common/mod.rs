//! Shared helpers for the integration tests: the real MariaDB and the real broker.
//!
//! `OUTBOX_DATABASE_URL` (default `mysql://root@127.0.0.1:3306/test`) and
//! `OUTBOX_KAFKA_BROKERS` (default `127.0.0.1:9092`) point them elsewhere. Every test
//! uses its own table and topic, so tests run in parallel and in any order.

#![allow(dead_code)]

pub mod gate;
pub mod logs;
pub mod private_db;
pub mod proxy;
pub mod recorder;
pub mod tansu;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::rdkafka::message::{Headers, Message as _};
use outbox::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use outbox::{DispatcherSettings, KafkaBroker, MySqlStore};

pub fn database_url() -> String {
    std::env::var("OUTBOX_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// The database URL with a small pool, so that tests running in parallel stay well
/// under the server's connection limit.
pub fn small_pool_url() -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}pool_min=1&pool_max=20")
}

pub fn brokers() -> String {
    std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[id.len() - 12..])
}

/// The SQL condition for rows leased by any claim of `owner`.
pub fn leased_by(owner: &str) -> String {
    let leases = MySqlStore::leases_of(owner);
    format!("locked_by BETWEEN {} AND {}", leases.start(), leases.end())
}

/// A fresh outbox table, dropped at the end of the test.
pub struct TestTable {
    pub pool: mysql::Pool,
    pub store: MySqlStore,
    pub name: String,
}

impl TestTable {
    pub fn new(prefix: &str) -> TestTable {
        let pool = mysql::Pool::new(small_pool_url().as_str())
            .expect("MariaDB is reachable (make services)");
        let name = unique(prefix);
        let store = MySqlStore::with_table(pool.clone(), &name).unwrap();
        store.migrate().unwrap();
        TestTable { pool, store, name }
    }

    pub fn conn(&self) -> mysql::PooledConn {
        self.pool.get_conn().unwrap()
    }

    /// Rows matching `condition` (SQL).
    pub fn count(&self, condition: &str) -> u64 {
        self.conn()
            .query_first(format!(
                "SELECT COUNT(*) FROM `{}` WHERE {condition}",
                self.name
            ))
            .unwrap()
            .unwrap_or(0)
    }

    /// Adds `messages` in one committed transaction; returns their ids.
    pub fn commit(&self, messages: &[outbox::Message]) -> Vec<String> {
        let mut tx = self
            .pool
            .start_transaction(mysql::TxOpts::default())
            .unwrap();
        let ids = outbox::Outbox::new(&self.store)
            .add_all(&mut tx, messages)
            .unwrap();
        tx.commit().unwrap();
        ids.into_iter()
            .map(|id| id.hyphenated().to_string())
            .collect()
    }

    /// Adds `messages` one by one in an `OutboxTransaction`, which writes them with its
    /// COMMIT; returns their ids.
    pub fn commit_on_commit(&self, messages: &[outbox::Message]) -> Vec<String> {
        let outbox = outbox::Outbox::new(&self.store);
        let mut tx = outbox.start_transaction(mysql::TxOpts::default()).unwrap();
        let ids = messages
            .iter()
            .map(|m| tx.add(m).unwrap().hyphenated().to_string())
            .collect();
        tx.commit().unwrap();
        ids
    }

    /// Starts a dispatcher on this table.
    pub fn dispatch(
        &self,
        broker: impl outbox::Broker,
        settings: DispatcherSettings,
        instance: &str,
    ) -> outbox::DispatcherHandle {
        outbox::Dispatcher::new(self.store.clone(), broker, settings, instance)
            .unwrap()
            .start()
            .unwrap()
    }

    pub fn exec(&self, sql: &str) {
        self.conn()
            .query_drop(sql.replace("{t}", &format!("`{}`", self.name)))
            .unwrap();
    }
}

impl Drop for TestTable {
    fn drop(&mut self) {
        if let Ok(mut conn) = self.pool.get_conn() {
            let _ = conn.query_drop(format!("DROP TABLE IF EXISTS `{}`", self.name));
        }
    }
}

/// `message.timeout.ms` and `request.timeout.ms` of the tests' brokers: short, so that
/// failures show quickly.
pub const MESSAGE_TIMEOUT_MS: u64 = 3_000;
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// The tests' brokers' delivery timeout: the longest a publish waits.
pub const DELIVERY_TIMEOUT_MS: u64 = MESSAGE_TIMEOUT_MS + REQUEST_TIMEOUT_MS;

/// The Kafka properties of the tests' brokers.
pub fn test_properties() -> Vec<(String, String)> {
    vec![
        ("message.timeout.ms".into(), MESSAGE_TIMEOUT_MS.to_string()),
        ("request.timeout.ms".into(), REQUEST_TIMEOUT_MS.to_string()),
    ]
}

/// A broker on the test Kafka with a short delivery timeout.
pub fn broker() -> KafkaBroker {
    broker_at(&brokers())
}

pub fn broker_at(servers: &str) -> KafkaBroker {
    KafkaBroker::with_properties(servers, test_properties()).unwrap()
}

/// A broker whose producer refuses messages over 10,000 bytes, at once: a message that
/// fails for good, on a healthy broker.
pub fn small_message_broker() -> KafkaBroker {
    let mut properties = test_properties();
    properties.push(("message.max.bytes".into(), "10000".into()));
    KafkaBroker::with_properties(&brokers(), properties).unwrap()
}

/// The shortest `max_lock_duration` the tests' brokers allow: three delivery timeouts
/// (the relay holds up to three batches) and the margin.
pub fn shortest_lease() -> Duration {
    Duration::from_millis(3 * DELIVERY_TIMEOUT_MS) + DispatcherSettings::LEASE_MARGIN
}

/// Settings that make every worker run often.
pub fn fast_settings() -> DispatcherSettings {
    DispatcherSettings {
        process_interval: Duration::from_millis(50),
        lock_check_interval: Duration::from_millis(100),
        cleanup_interval: Duration::from_millis(100),
        max_lock_duration: shortest_lease(),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Polls `done` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

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

/// A small deterministic random number generator (xorshift64*), so tests need no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// A business table of aggregates `k0..k{n-1}`, each with a version. Every event is
/// written in the transaction that bumps its aggregate's version under a row lock, as an
/// application would: per key, version order is commit order.
pub struct Aggregates {
    pub table: String,
}

impl Aggregates {
    pub fn new(pool: &mysql::Pool, keys: usize) -> Aggregates {
        let table = unique("agg");
        let mut conn = pool.get_conn().unwrap();
        conn.query_drop(format!(
            "CREATE TABLE `{table}` (k VARCHAR(64) PRIMARY KEY, version INT UNSIGNED NOT NULL) ENGINE=InnoDB"
        ))
        .unwrap();
        let rows: Vec<String> = (0..keys).map(|i| format!("('k{i}', 0)")).collect();
        conn.query_drop(format!("INSERT INTO `{table}` VALUES {}", rows.join(", ")))
            .unwrap();
        Aggregates { table }
    }

    /// One business transaction on `key`: `n` events with the next versions, committed
    /// or rolled back, through `Outbox::add_all`. Returns the message ids. The payload of
    /// each event is `key:version`.
    pub fn write(
        &self,
        pool: &mysql::Pool,
        outbox: &outbox::Outbox,
        topic: &str,
        key: &str,
        n: u32,
        commit: bool,
    ) -> Result<Vec<String>, outbox::Error> {
        let mut tx = pool.start_transaction(mysql::TxOpts::default())?;
        let ids = self.bump(&mut tx, topic, key, n, |tx, messages| {
            outbox.add_all(tx, messages)
        })?;
        if commit {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(ids)
    }

    /// As [`write`](Aggregates::write), in an `OutboxTransaction` (the messages ride on
    /// the COMMIT) on a connection from `outbox`'s store.
    pub fn write_on_commit(
        &self,
        outbox: &outbox::Outbox,
        topic: &str,
        key: &str,
        n: u32,
        commit: bool,
    ) -> Result<Vec<String>, outbox::Error> {
        let mut tx = outbox.start_transaction(mysql::TxOpts::default())?;
        let ids = self.bump(&mut tx, topic, key, n, |tx, messages| tx.add_all(messages))?;
        if commit {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(ids)
    }

    /// Locks `key`'s row, adds `n` events with the next versions through `add`, and
    /// writes the new version.
    fn bump<Q: Queryable>(
        &self,
        tx: &mut Q,
        topic: &str,
        key: &str,
        n: u32,
        add: impl FnOnce(&mut Q, &[outbox::Message]) -> outbox::Result<Vec<uuid::Uuid>>,
    ) -> Result<Vec<String>, outbox::Error> {
        let version: u32 = tx
            .exec_first(
                format!(
                    "SELECT version FROM `{}` WHERE k = ? FOR UPDATE",
                    self.table
                ),
                (key,),
            )?
            .unwrap_or(0);
        let messages: Vec<_> = (1..=n)
            .map(|i| outbox::Message::new(topic, format!("{key}:{}", version + i)).with_key(key))
            .collect();
        let ids = add(tx, &messages)?;
        tx.exec_drop(
            format!("UPDATE `{}` SET version = ? WHERE k = ?", self.table),
            (version + n, key),
        )?;
        Ok(ids
            .into_iter()
            .map(|id| id.hyphenated().to_string())
            .collect())
    }

    /// Final version of every key.
    pub fn versions(&self, pool: &mysql::Pool) -> HashMap<String, u32> {
        pool.get_conn()
            .unwrap()
            .query_map(
                format!("SELECT k, version FROM `{}`", self.table),
                |(k, v)| (k, v),
            )
            .unwrap()
            .into_iter()
            .collect()
    }

    pub fn drop_table(&self, pool: &mysql::Pool) {
        let _ = pool
            .get_conn()
            .map(|mut c| c.query_drop(format!("DROP TABLE IF EXISTS `{}`", self.table)));
    }
}

/// Writes on `aggregates` from a thread of its own, a transaction every few
/// milliseconds, until `stop` is set; the ids committed.
pub fn keep_writing(
    pool: &mysql::Pool,
    store: &MySqlStore,
    aggregates: &Arc<Aggregates>,
    topic: &str,
    keys: u64,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<HashSet<String>> {
    let (pool, store, aggregates, topic, stop) = (
        pool.clone(),
        store.clone(),
        aggregates.clone(),
        topic.to_string(),
        stop.clone(),
    );
    std::thread::spawn(move || {
        let outbox = outbox::Outbox::new(&store);
        let mut rng = Rng::new(7);
        let mut committed = HashSet::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let key = format!("k{}", rng.below(keys));
            let ids = aggregates
                .write(&pool, &outbox, &topic, &key, 1 + rng.below(2) as u32, true)
                .unwrap();
            committed.extend(ids);
            std::thread::sleep(Duration::from_millis(20));
        }
        committed
    })
}

/// Versions per key in the order consumers read them, from `key:version` payloads.
pub fn versions_read(records: &[Consumed]) -> HashMap<String, Vec<u32>> {
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for r in records {
        let text = String::from_utf8(r.payload.clone()).unwrap();
        let (key, version) = text.rsplit_once(':').expect("key:version payload");
        assert_eq!(
            r.key.as_deref(),
            Some(key),
            "record key matches its payload"
        );
        per_key
            .entry(key.to_string())
            .or_default()
            .push(version.parse().unwrap());
    }
    per_key
}

/// Checks that each key's versions were read as 1, 2, ..., final, in order. With
/// `duplicates_allowed`, the sequence may also go back, to re-send a suffix: the only
/// step forward is always +1, so a re-sent suffix replays in order and nothing is
/// skipped (1 2 3 4 2 3 4 5 passes; 1 2 4 3 does not).
pub fn assert_commit_order(
    read: &HashMap<String, Vec<u32>>,
    finals: &HashMap<String, u32>,
    duplicates_allowed: bool,
) {
    for (key, &last) in finals {
        let seen = read.get(key).cloned().unwrap_or_default();
        if last == 0 {
            assert!(
                seen.is_empty(),
                "{key}: nothing was committed, read {seen:?}"
            );
            continue;
        }
        assert_eq!(
            seen.first(),
            Some(&1),
            "{key}: starts at version 1: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&last),
            "{key}: ends at version {last}: {seen:?}"
        );
        for pair in seen.windows(2) {
            let step = pair[1] as i64 - pair[0] as i64;
            let ok = step == 1 || (duplicates_allowed && step <= 0);
            assert!(ok, "{key}: read {} after {}: {seen:?}", pair[1], pair[0]);
        }
    }
}

/// Checks that each key's versions were first read as 1, 2, ..., final: nothing lost,
/// and no message published for the first time after a later one of its key. Copies
/// read again later (a batch whose publish outlived its relay's lock, say) pass.
pub fn assert_first_reads_in_order(
    read: &HashMap<String, Vec<u32>>,
    finals: &HashMap<String, u32>,
) {
    for (key, &last) in finals {
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u32> = read
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|v| seen.insert(*v))
            .collect();
        let expected: Vec<u32> = (1..=last).collect();
        assert_eq!(first, expected, "{key}: first reads, in order");
    }
}

/// Starts `outbox relay` on `table` (run through `wrapper`, a command and its
/// arguments, when not empty); returns the process and its lease owner, which it prints.
/// Closing its standard input stops it gracefully.
pub fn spawn_relay(
    table: &str,
    instance: &str,
    extra_properties: &str,
    wrapper: &[&str],
) -> (std::process::Child, String) {
    let mut command = relay_command(table, instance, extra_properties, wrapper);
    command.stdin(std::process::Stdio::piped());
    start_relay(command)
}

/// The command that runs `outbox relay` on `table` with the tests' settings
/// and brokers, as [`spawn_relay`] starts it; its standard input is left to the caller.
pub fn relay_command(
    table: &str,
    instance: &str,
    extra_properties: &str,
    wrapper: &[&str],
) -> std::process::Command {
    use std::process::{Command, Stdio};
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(outbox_command());
            command
        }
        None => Command::new(outbox_command()),
    };
    command.arg("relay");
    command
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TABLE", table)
        .env("OUTBOX_INSTANCE", instance)
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("OUTBOX_PROCESS_INTERVAL_MS", "50")
        .env("OUTBOX_LOCK_CHECK_INTERVAL_MS", "100")
        .env("OUTBOX_MAX_LOCK_MS", shortest_lease().as_millis().to_string())
        .env(
            "OUTBOX_KAFKA_PROPERTIES",
            format!(
                "message.timeout.ms={MESSAGE_TIMEOUT_MS},request.timeout.ms={REQUEST_TIMEOUT_MS}{extra_properties}"
            ),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    command
}

/// The path of the `outbox` command, built for the tests.
pub fn outbox_command() -> &'static str {
    let Some(path) = option_env!("CARGO_BIN_EXE_outbox") else {
        panic!("the outbox command: run the tests with `--features cli` (make test)");
    };
    path
}

/// Starts a relay from [`relay_command`]; returns the process and its lease owner.
pub fn start_relay(mut command: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("outbox relay starts ({command:?}): {e}"));
    let mut owner = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut owner)
        .unwrap();
    (child, owner.trim().to_string())
}

/// One HTTP/1.0 exchange on a fresh connection: the status code and the body.
pub fn exchange(address: &str, request: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::Write::write_all(&mut stream, request).unwrap();
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    (status, body)
}

/// A child process killed when dropped, so that a failing test leaves none running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
