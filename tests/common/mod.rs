//! Shared helpers for the integration tests: the real MariaDB and the real broker.
//!
//! `OUTBOX_DATABASE_URL` (default `mysql://root@127.0.0.1:3306/test`) and
//! `OUTBOX_KAFKA_BROKERS` (default `127.0.0.1:9092`) point them elsewhere. Every test
//! uses its own table and topic, so tests run in parallel and in any order.

#![allow(dead_code)]

mod aggregates;
mod consume;
pub mod gate;
pub mod logs;
pub mod private_db;
mod process;
pub mod proxy;
pub mod recorder;
#[cfg(feature = "opentelemetry")]
pub mod spans;
pub mod tansu;

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use outbox::{DispatcherSettings, KafkaBroker, MySqlStore};

// Every test binary compiles these helpers; not every one uses each of them.
#[allow(unused_imports)]
pub use self::aggregates::*;
#[allow(unused_imports)]
pub use self::consume::*;
#[allow(unused_imports)]
pub use self::process::*;

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
