//! The binlog relay, on a private MariaDB and a private MySQL with the binary log on, each
//! test on both (modules `on_mariadb` and `on_mysql`): every committed message
//! published and none rolled back, per-key order under concurrent writers, a relay killed
//! and restarted, a standby taking over, a rotated and purged binary log, and the server
//! settings it refuses to start without.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::gate::SlowBroker;
use common::logs::Logs;
use common::private_db::{PrivateDatabase, Server};
use common::proxy::{CloseOnDrop, Proxy};
use common::*;
use mysql::prelude::Queryable;
use outbox::binlog::{BinlogRelay, BinlogSettings, POSITION_TABLE};
use outbox::{DispatcherHandle, Error, MySqlStore, Outbox, Worker};

/// Each test named, as a test on MariaDB (module `on_mariadb`) and one on MySQL
/// (`on_mysql`).
macro_rules! on_both_servers {
    ($($test:ident),* $(,)?) => {
        mod on_mariadb {
            $(#[test]
            fn $test() {
                super::$test(super::Server::MariaDb)
            })*
        }
        mod on_mysql {
            $(#[test]
            fn $test() {
                super::$test(super::Server::MySql)
            })*
        }
    };
}

mod delayed;
mod delivery;
mod failover;
mod failures;
mod restarts;
mod setup;
#[cfg(feature = "opentelemetry")]
mod trace;

/// A private server that writes a row-based binary log.
fn binlog_database(server: Server) -> PrivateDatabase {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut db = PrivateDatabase::of(server);
    db.options = vec![
        "--log-bin=mysql-bin".into(),
        "--binlog-format=ROW".into(),
        "--server-id=1".into(),
    ];
    db.start();
    db
}

/// A private binlog server with a fresh outbox table and a topic of the test's own.
struct Fixture {
    /// The server, which stops when dropped.
    db: PrivateDatabase,
    url: String,
    pool: mysql::Pool,
    store: MySqlStore,
    table: String,
    topic: String,
}

impl Fixture {
    /// The server's URL, pool, store, table and topic, as most tests use them.
    fn parts(&self) -> (&str, &mysql::Pool, &MySqlStore, &str, &str) {
        (&self.url, &self.pool, &self.store, &self.table, &self.topic)
    }
}

fn fixture(server: Server, prefix: &str) -> Fixture {
    let db = binlog_database(server);
    let url = db.url();
    let (pool, store, table) = outbox_table(&url, prefix);
    Fixture {
        db,
        url,
        pool,
        store,
        table,
        topic: unique(prefix),
    }
}

/// A fresh outbox table on `url`'s server.
fn outbox_table(url: &str, prefix: &str) -> (mysql::Pool, MySqlStore, String) {
    let pool = mysql::Pool::new(url).unwrap();
    let name = unique(prefix);
    let store = MySqlStore::with_table(pool.clone(), &name).unwrap();
    store.migrate().unwrap();
    (pool, store, name)
}

fn start_relay(url: &str, table: &str, instance: &str) -> outbox::Result<DispatcherHandle> {
    BinlogRelay::new(
        mysql::Opts::from_url(url).unwrap(),
        table,
        broker(),
        fast_settings(),
        BinlogSettings::default(),
        instance,
    )?
    .start()
}

/// `outbox relay --source binlog` on the private server; what it logs (the outbox's
/// lines from `info` up, unless `RUST_LOG` says otherwise).
fn relay_process(url: &str, table: &str, instance: &str) -> (std::process::Child, String, Logs) {
    relay_process_with(url, table, instance, "", &[])
}

/// As [`relay_process`], with further Kafka `properties` (`,name=value...`) and `env`.
fn relay_process_with(
    url: &str,
    table: &str,
    instance: &str,
    properties: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, String, Logs) {
    let mut command = relay_command(table, instance, properties, &[]);
    command
        .env("OUTBOX_DATABASE_URL", url)
        .env("OUTBOX_SOURCE", "binlog")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,outbox=info".into()),
        )
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (mut child, owner) = common::start_relay(command);
    let logs = Logs::capture(child.stderr.take().unwrap(), instance);
    (child, owner, logs)
}

/// Waits until the relay of `table` saved a position: it follows the binary log.
fn wait_until_following(pool: &mysql::Pool, table: &str) {
    assert!(
        wait_for(Duration::from_secs(30), || count(
            pool,
            POSITION_TABLE,
            &format!("outbox_table = '{table}'")
        ) == 1),
        "the relay follows the binary log"
    );
}

/// Waits up to a minute until `n` rows of `table` are delivered; whether they were.
fn delivered(pool: &mysql::Pool, table: &str, n: u64) -> bool {
    wait_for(Duration::from_secs(60), || {
        count(pool, table, "state = 1") == n
    })
}

/// The payloads read, as text.
fn payloads(got: &[Consumed]) -> Vec<String> {
    got.iter()
        .map(|c| String::from_utf8_lossy(&c.payload).into_owned())
        .collect()
}

fn count(pool: &mysql::Pool, table: &str, condition: &str) -> u64 {
    pool.get_conn()
        .unwrap()
        .query_first(format!("SELECT COUNT(*) FROM `{table}` WHERE {condition}"))
        .unwrap()
        .unwrap_or(0)
}

/// Writers on `keys` aggregates, `per_key` transactions each of 1 to 3 events, every
/// fifth one rolled back; returns the ids of the committed messages.
fn write_concurrently(
    pool: &mysql::Pool,
    store: &MySqlStore,
    aggregates: &Arc<Aggregates>,
    topic: &str,
    writers: usize,
    keys: usize,
    per_key: usize,
) -> HashSet<String> {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (pool, store, aggregates, topic) = (
                pool.clone(),
                store.clone(),
                aggregates.clone(),
                topic.to_string(),
            );
            std::thread::spawn(move || {
                let outbox = Outbox::new(&store);
                let mut rng = Rng::new(w as u64 + 1);
                let mut committed = Vec::new();
                for round in 0..per_key * keys / writers {
                    let key = format!("k{}", rng.below(keys as u64));
                    let n = 1 + rng.below(3) as u32;
                    let commit = round % 5 != 4;
                    let ids = aggregates
                        .write(&pool, &outbox, &topic, &key, n, commit)
                        .unwrap();
                    if commit {
                        committed.extend(ids);
                    }
                }
                committed
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Where the server's binary log ends: its file and the offset in it.
fn log_end(pool: &mysql::Pool) -> (String, u64) {
    let mut conn = pool.get_conn().unwrap();
    // MySQL 8.4 renamed it.
    let row: mysql::Row = match conn.query_first("SHOW MASTER STATUS") {
        Ok(row) => row,
        Err(_) => conn.query_first("SHOW BINARY LOG STATUS").unwrap(),
    }
    .expect("the binary log is on");
    (row.get(0).unwrap(), row.get(1).unwrap())
}

/// Inserts, in `tx`, a pending row whose headers are no list of pairs, with key `key`.
fn insert_corrupt(tx: &mut mysql::Transaction<'_>, table: &str, topic: &str, key: &str) {
    tx.exec_drop(
        format!(
            "INSERT INTO `{table}` (message_id, topic, msg_key, headers, payload) \
             VALUES (UNHEX(REPLACE(UUID(), '-', '')), ?, ?, '{{\"not\": \"an array\"}}', 'x')"
        ),
        (topic, key),
    )
    .unwrap();
}

/// The server's setting that compresses its binary log.
fn compression(server: Server) -> &'static str {
    match server {
        Server::MariaDb => "log_bin_compress",
        Server::MySql => "binlog_transaction_compression",
    }
}

/// Sessions reading the server's binary log (`Binlog Dump`, `Binlog Dump GTID`).
fn binlog_readers(pool: &mysql::Pool) -> u64 {
    let mut conn = pool.get_conn().unwrap();
    let listed = conn.query_first(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
    );
    // MySQL may refuse to list sessions whose statement text it cannot convert.
    let listed = listed.or_else(|_| {
        conn.query_first(
            "SELECT COUNT(*) FROM performance_schema.threads \
             WHERE PROCESSLIST_COMMAND LIKE 'Binlog Dump%'",
        )
    });
    listed.unwrap().unwrap_or(0)
}

/// Commits `messages` one per transaction on `conn`, as its session is set up.
fn commit_each_on(conn: &mut mysql::PooledConn, store: &MySqlStore, messages: &[outbox::Message]) {
    let outbox = Outbox::new(store);
    for message in messages {
        let mut tx = conn.start_transaction(mysql::TxOpts::default()).unwrap();
        outbox.add(&mut tx, message).unwrap();
        tx.commit().unwrap();
    }
}

/// `n` messages from `from` over 10 keys, each payload `key:number`.
fn keyed(topic: &str, from: usize, n: usize) -> Vec<outbox::Message> {
    (from..from + n)
        .map(|i| {
            outbox::Message::new(topic, format!("k{}:{i}", i % 10)).with_key(format!("k{}", i % 10))
        })
        .collect()
}

/// Commits `messages` in one transaction; returns their ids.
fn commit(pool: &mysql::Pool, store: &MySqlStore, messages: &[outbox::Message]) -> Vec<String> {
    let mut tx = pool.start_transaction(mysql::TxOpts::default()).unwrap();
    let ids = Outbox::new(store).add_all(&mut tx, messages).unwrap();
    tx.commit().unwrap();
    ids.iter().map(|id| id.hyphenated().to_string()).collect()
}

/// Each key's numbers (payload `key:number`, a key's numbers 10 apart, see [`keyed`])
/// were read in order without a gap: each step forward is to the key's next number. With
/// `duplicates`, a step may also go back, to send a suffix again.
fn assert_key_order(got: &[Consumed], duplicates: bool) {
    let mut last = std::collections::HashMap::new();
    for record in got {
        let text = String::from_utf8(record.payload.clone()).unwrap();
        let (key, n) = text.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        if let Some(previous) = last.insert(key.to_string(), n) {
            let next = n == previous + 10;
            let again = duplicates && n <= previous;
            assert!(next || again, "{key}: {n} after {previous}");
        }
    }
}

/// The peak resident memory of process `pid`, in KiB (`VmHWM`).
fn peak_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
