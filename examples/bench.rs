//! `make bench`: the outbox's costs and rates on this machine, against the local MariaDB
//! and broker. Every figure is the median of `BENCH_RUNS` runs (default 3) with its
//! spread; rates are compared only with baselines measured in the same run.
//!
//! - add cost: a business transaction (one INSERT, commit) with and without `Outbox::add`,
//!   with a no-op statement instead (the ceiling of any add that is a statement of its
//!   own), as an `OutboxTransaction` whose add rides on the COMMIT, and with a row of one
//!   value riding on the COMMIT (the ceiling of any add that writes a row); the batch add
//!   (100 messages per transaction);
//! - drain: a backlog of `BENCH_BACKLOG` messages (default 100,000; 200-byte payloads,
//!   3 headers, 1,000 keys) drained by 1 and by 4 dispatchers, and on a single key; by one
//!   dispatcher again with `outbox.strict.key.order` (and a tenth of the hot key's backlog);
//! - raw limits: the same messages produced straight through rdkafka (no database), and
//!   a plain claim-and-mark loop over the same rows (no broker);
//! - latency: commit to broker acknowledgement at a steady 1,000 messages/s, with the
//!   default `process_interval` and with a wake-up after each commit;
//! - memory: peak resident memory of an `outbox relay` process draining the backlog.
//! - metrics: the backlog drained by one `outbox relay` process serving Prometheus
//!   metrics (`--metrics-addr`, its gauges at their default interval) and by one without,
//!   interleaved.
//! - status: `outbox status` (the process, connecting included), `Admin::status` and the
//!   dispatcher's gauge read (`Store::backlog`) on a table of `BENCH_STATUS_ROWS` rows (default 1,000,000: 90 % delivered, 9.9 % pending,
//!   0.1 % dead, over 10 topics).
//!
//! - web: `examples/web_service` under 8 concurrent clients (creates and payments), in
//!   requests per second against the same service with its event writes taken out
//!   (`WEB_WITHOUT_EVENTS=1`), alternating; and, with events, from each 2xx answer to
//!   the event's arrival at a consumer.
//!
//! - binlog: `outbox relay --source binlog` against `outbox relay` (polling), each a process
//!   of its own, on a MariaDB of the benchmark's own with the binary log on
//!   (`BENCH_BINLOG_DATABASE_URL`, which `make bench` starts): commit to acknowledgement at
//!   1,000 messages/s with no wake-up; a backlog of `BENCH_BACKLOG` messages committed while
//!   the relay was stopped, drained, with the server's work per message (`SHOW GLOBAL
//!   STATUS` deltas); statements while nothing is committed for 10 s. Both drains run
//!   again with the database pinned to CPU 0 and the broker and relays to the others
//!   (`taskset`), as when the database has a host of its own. The polling drain
//!   runs on the machine's server too, to compare the two servers. `BENCH_RELAY_LOG` sets
//!   the relay processes' log filter (`outbox::binlog=debug` shows each batch's timings).
//!
//! - inbox: `BENCH_INBOX_RECORDS` records (default 20,000, with message ids) consumed from
//!   the beginning of their topic into MySQL, one row written per record: by an
//!   `InboxConsumer` (id recorded, row written and offset saved in one transaction); by
//!   the same loop written out without the inbox's record (row and offset in one
//!   transaction); and by the raw consumer alone (no database), interleaved.
//!
//! `BENCH_ONLY=drain,latency` runs only the sections named (add, drain, latency, memory,
//! metrics, status, web, binlog, inbox).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Pool, TxOpts};
use outbox::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use outbox::rdkafka::ClientConfig;
use outbox::{
    Broker, Dispatcher, DispatcherSettings, KafkaBroker, Message, MySqlStore, Outbox, Record, Store,
};
use parking_lot::Mutex;

const KEYS: usize = 1_000;

/// The columns the relay reads: id, message_id, topic, key, headers, payload, attempts.
type RawRow = (
    u64,
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<u8>,
    u32,
);
const PAYLOAD: usize = 200;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let runs = env_number("BENCH_RUNS", 3);
    let backlog = env_number("BENCH_BACKLOG", 100_000);
    let hot_backlog = env_number("BENCH_HOT_BACKLOG", backlog);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let bench = Bench::new()?;
    let mut table = Table::default();

    if section("add") {
        add_cost(&bench, runs, &mut table)?;
    }
    if section("drain") {
        drain(&bench, runs, backlog, hot_backlog, &mut table)?;
    }
    if section("latency") {
        latency(&bench, runs, &mut table)?;
    }
    if section("memory") {
        memory(&bench, runs, backlog, &mut table)?;
    }
    if section("metrics") {
        metrics_cost(&bench, runs, backlog, &mut table)?;
    }
    if section("web") {
        web(&bench, runs, &mut table)?;
    }
    if section("status") {
        let rows = env_number("BENCH_STATUS_ROWS", 1_000_000);
        status(&bench, runs, rows, &mut table)?;
    }
    if section("binlog") {
        binlog(&bench, runs, backlog, &mut table)?;
    }
    if section("inbox") {
        inbox(
            &bench,
            runs,
            env_number("BENCH_INBOX_RECORDS", 20_000),
            &mut table,
        )?;
    }
    println!("{}", table.render());
    Ok(())
}

fn add_cost(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("add cost ({runs} runs)");
    let mut plain = Vec::new();
    let mut with_add = Vec::new();
    let mut with_noop = Vec::new();
    let mut on_commit = Vec::new();
    let mut tiny_row = Vec::new();
    let mut batch = Vec::new();
    for _ in 0..runs {
        let [a, b, c, d, e] = bench.business_transactions(5_000)?;
        plain.push(a);
        with_add.push(b);
        with_noop.push(c);
        on_commit.push(d);
        tiny_row.push(e);
        batch.push(bench.batch_add(200, 100)?);
    }
    table.rate("transaction without outbox (tx/s)", &plain);
    table.rate("transaction with Outbox::add (tx/s)", &with_add);
    table.ratio("  with / without", &with_add, &plain);
    table.rate("transaction with a no-op statement (tx/s)", &with_noop);
    table.ratio("  no-op / without: ceiling of any add", &with_noop, &plain);
    table.rate("OutboxTransaction, add on the commit (tx/s)", &on_commit);
    table.ratio("  on the commit / without", &on_commit, &plain);
    table.rate("one-value row on the commit (tx/s)", &tiny_row);
    table.ratio(
        "  one-value row / without: ceiling of any row",
        &tiny_row,
        &plain,
    );
    table.rate("batch add, 100 per tx (msg/s)", &batch);
    Ok(())
}

fn drain(
    bench: &Bench,
    runs: usize,
    backlog: usize,
    hot_backlog: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("drain, {backlog} messages ({runs} runs)");
    let (mut raw_broker, mut raw_db, mut one, mut four, mut hot) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut one_strict, mut hot_strict) = (vec![], vec![]);
    for _ in 0..runs {
        raw_broker.push(bench.raw_broker(backlog)?);
        raw_db.push(bench.raw_claim_and_mark(backlog)?);
        one.push(bench.drain(backlog, KEYS, 1, false)?);
        one_strict.push(bench.drain(backlog, KEYS, 1, true)?);
        four.push(bench.drain(backlog, KEYS, 4, false)?);
        hot.push(bench.drain(hot_backlog, 1, 1, false)?);
        hot_strict.push(bench.drain(hot_backlog / 10, 1, 1, true)?);
    }
    table.rate("raw broker: rdkafka alone (msg/s)", &raw_broker);
    table.rate("raw database: claim-and-mark loop (msg/s)", &raw_db);
    table.rate("drain, 1 dispatcher (msg/s)", &one);
    let limit: Vec<f64> = raw_broker
        .iter()
        .zip(&raw_db)
        .map(|(b, d)| b.min(*d))
        .collect();
    table.ratio("  1 dispatcher / slower raw limit", &one, &limit);
    table.rate("drain, 1 dispatcher, strict key order (msg/s)", &one_strict);
    table.ratio("  strict / pipelined", &one_strict, &one);
    table.rate("drain, 4 dispatchers (msg/s)", &four);
    table.rate(
        &format!("drain, one hot key, {hot_backlog} msgs (msg/s)"),
        &hot,
    );
    table.rate(
        &format!(
            "drain, one hot key, strict key order, {} msgs (msg/s)",
            hot_backlog / 10
        ),
        &hot_strict,
    );
    table.ratio("  strict / pipelined, one hot key", &hot_strict, &hot);
    Ok(())
}

fn latency(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("latency at 1,000 msg/s ({runs} runs)");
    for (label, wake) in [("default settings", false), ("wake-up after commit", true)] {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut max = Vec::new();
        for _ in 0..runs {
            let mut latencies = bench.latency(1_000, Duration::from_secs(10), wake)?;
            latencies.sort_by(f64::total_cmp);
            p50.push(percentile(&latencies, 0.50));
            p99.push(percentile(&latencies, 0.99));
            max.push(*latencies.last().unwrap_or(&0.0));
        }
        table.millis(&format!("latency p50, {label} (ms)"), &p50);
        table.millis(&format!("latency p99, {label} (ms)"), &p99);
        table.millis(&format!("latency max, {label} (ms)"), &max);
    }
    Ok(())
}

fn memory(
    bench: &Bench,
    runs: usize,
    backlog: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("memory");
    let mut small = Vec::new();
    let mut large = Vec::new();
    for _ in 0..runs {
        small.push(bench.relay_peak_rss(backlog / 5, 500)?);
        large.push(bench.relay_peak_rss(backlog, 500)?);
    }
    table.mib(
        &format!("outbox relay peak RSS, {} backlog (MiB)", backlog / 5),
        &small,
    );
    table.mib(
        &format!("outbox relay peak RSS, {backlog} backlog (MiB)"),
        &large,
    );
    Ok(())
}

/// What serving metrics costs a relay: the same backlog drained by an `outbox relay`
/// process with a Prometheus recorder and by one without, alternately.
fn metrics_cost(
    bench: &Bench,
    runs: usize,
    backlog: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("metrics, {backlog} messages ({runs} runs)");
    let (mut plain, mut measured) = (Vec::new(), Vec::new());
    // Alternate which goes first: the table dropped after a drain leaves the server work
    // (purge) that would otherwise always fall on the second.
    for run in 0..runs {
        if run % 2 == 0 {
            plain.push(bench.relay_drain(backlog, false)?);
            measured.push(bench.relay_drain(backlog, true)?);
        } else {
            measured.push(bench.relay_drain(backlog, true)?);
            plain.push(bench.relay_drain(backlog, false)?);
        }
    }
    table.rate("drain, outbox relay, 1 process (msg/s)", &plain);
    table.rate("drain, outbox relay --metrics-addr (msg/s)", &measured);
    table.ratio("  with metrics / without", &measured, &plain);
    Ok(())
}

/// Requests a client of the web service sends in one run.
const WEB_REQUESTS: usize = 500;
/// Concurrent clients of the web service.
const WEB_CLIENTS: usize = 8;

/// The web service example under load, with its events and without.
fn web(bench: &Bench, runs: usize, table: &mut Table) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("web service, {WEB_CLIENTS} clients x {WEB_REQUESTS} requests ({runs} runs)");
    let (mut with, mut without, mut p50, mut p99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let order: [bool; 2] = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for events in order {
            let (rate, mut latencies) = bench.web_run(events)?;
            if events {
                with.push(rate);
                latencies.sort_by(f64::total_cmp);
                p50.push(percentile(&latencies, 0.50));
                p99.push(percentile(&latencies, 0.99));
            } else {
                without.push(rate);
            }
        }
    }
    table.rate("web service with events (req/s)", &with);
    table.rate("web service, event writes taken out (req/s)", &without);
    table.ratio("  with / without", &with, &without);
    table.millis("web service, 2xx answer to event consumed, p50 (ms)", &p50);
    table.millis("web service, 2xx answer to event consumed, p99 (ms)", &p99);
    Ok(())
}

/// How long `outbox status` takes on a large table: the command as an operator runs it
/// (a process that connects, checks the table and queries), and the library call alone.
fn status(
    bench: &Bench,
    runs: usize,
    rows: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("status, {rows} rows ({runs} runs)");
    let store = bench.status_table(rows)?;
    let admin = outbox::admin::Admin::new(store.clone())?;
    let command = std::env::var("BENCH_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
    let mut process = Vec::new();
    let mut library = Vec::new();
    let mut gauges = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let output = std::process::Command::new(&command)
            .args(["--table", store.table(), "status"])
            .env("OUTBOX_DATABASE_URL", &bench.url)
            .output()?;
        process.push(start.elapsed().as_secs_f64() * 1e3);
        if !output.status.success() {
            return Err(format!("outbox status failed: {output:?}").into());
        }
        let start = Instant::now();
        let status = admin.status()?;
        library.push(start.elapsed().as_secs_f64() * 1e3);
        if status.total.delivered + status.total.pending + status.total.dead != rows as u64 {
            return Err(format!("status counted {:?} of {rows} rows", status.total).into());
        }
        // The read behind a dispatcher's gauges (gauge_interval).
        let start = Instant::now();
        let backlog = store.backlog()?.ok_or("MySqlStore reports a backlog")?;
        gauges.push(start.elapsed().as_secs_f64() * 1e3);
        let pending: u64 = backlog.topics.iter().map(|t| t.pending).sum();
        if pending != status.total.pending {
            return Err(format!("the gauges counted {pending} pending").into());
        }
    }
    table.millis(&format!("`outbox status`, {rows} rows (ms)"), &process);
    table.millis(&format!("Admin::status, {rows} rows (ms)"), &library);
    table.millis(
        &format!("gauge read (Store::backlog), {rows} rows (ms)"),
        &gauges,
    );
    bench.drop_table(store.table())?;
    Ok(())
}

/// What a business transaction does besides its INSERT.
#[derive(Clone, Copy)]
enum Extra {
    Nothing = 0,
    /// One `Outbox::add`.
    Outbox = 1,
    /// One statement that does nothing (`DO 0`): the round trip any add that is a
    /// statement of its own costs at the least.
    NoOp = 2,
    /// The transaction is an `OutboxTransaction` and its one add is written with the
    /// COMMIT.
    OnCommit = 3,
    /// An INSERT of a row of one 8-byte value (and its AUTO_INCREMENT key) sent in one
    /// packet with the COMMIT: the least any row written with the commit costs.
    TinyRow = 4,
}

/// The servers, and a name for every table and topic the benchmark makes.
struct Bench {
    pool: Pool,
    url: String,
    brokers: String,
    run: String,
    counter: Mutex<u32>,
    /// The CPUs its relay processes run on (`taskset -c`); all when `None`.
    relay_cpus: Option<String>,
}

impl Bench {
    fn new() -> Result<Bench, Box<dyn std::error::Error>> {
        let url = std::env::var("OUTBOX_DATABASE_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
        Bench::at(url)
    }

    /// A bench on the server of `url`.
    fn at(url: String) -> Result<Bench, Box<dyn std::error::Error>> {
        let brokers =
            std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let pool = Pool::new(url.as_str())?;
        let run = outbox::uuid::Uuid::now_v7().simple().to_string();
        Ok(Bench {
            pool,
            url,
            brokers,
            run: run[run.len() - 8..].to_string(),
            counter: Mutex::new(0),
            relay_cpus: None,
        })
    }

    fn name(&self, what: &str) -> String {
        let mut counter = self.counter.lock();
        *counter += 1;
        format!("bench_{what}_{}_{}", self.run, counter)
    }

    fn store(&self, what: &str) -> Result<MySqlStore, outbox::Error> {
        let store = MySqlStore::with_table(self.pool.clone(), &self.name(what))?;
        store.migrate()?;
        Ok(store)
    }

    fn drop_table(&self, table: &str) -> Result<(), mysql::Error> {
        self.pool
            .get_conn()?
            .query_drop(format!("DROP TABLE IF EXISTS `{table}`"))
    }

    /// `n` transactions of one business INSERT each for each [`Extra`], interleaved in
    /// blocks of 100 so that all of them meet the same server weather; transactions per
    /// second for each, in the order of [`Extra`].
    fn business_transactions(&self, n: usize) -> Result<[f64; 5], Box<dyn std::error::Error>> {
        const BLOCK: usize = 100;
        let store = self.store("add")?;
        let outbox = Outbox::new(&store);
        let business = self.name("orders");
        let tiny = self.name("tiny");
        let mut conn = self.pool.get_conn()?;
        conn.query_drop(format!(
            "CREATE TABLE `{business}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             customer VARCHAR(100) NOT NULL, total BIGINT NOT NULL)"
        ))?;
        conn.query_drop(format!(
            "CREATE TABLE `{tiny}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             v BIGINT NOT NULL)"
        ))?;
        let insert = format!("INSERT INTO `{business}` (customer, total) VALUES (?, ?)");
        let topic = self.name("topic");
        let mut order = [
            Extra::Nothing,
            Extra::Outbox,
            Extra::NoOp,
            Extra::OnCommit,
            Extra::TinyRow,
        ];
        let mut spent = [Duration::ZERO; 5];
        for block in 0..n.div_ceil(BLOCK) {
            for extra in order {
                let start = Instant::now();
                for i in block * BLOCK..((block + 1) * BLOCK).min(n) {
                    let row = (format!("customer-{}", i % KEYS), i as i64);
                    match extra {
                        Extra::OnCommit => {
                            let mut tx =
                                outbox.start_transaction_on(conn.as_mut(), TxOpts::default())?;
                            tx.exec_drop(&insert, row)?;
                            tx.add(&sample_message(&topic, i, KEYS))?;
                            tx.commit()?;
                        }
                        Extra::TinyRow => {
                            conn.query_drop("START TRANSACTION")?;
                            conn.exec_drop(&insert, row)?;
                            let mut result = conn.query_iter(format!(
                                "INSERT INTO `{tiny}` (v) VALUES ({i}); COMMIT"
                            ))?;
                            while let Some(set) = result.iter() {
                                for row in set {
                                    row?;
                                }
                            }
                        }
                        Extra::Nothing | Extra::Outbox | Extra::NoOp => {
                            let mut tx = conn.start_transaction(TxOpts::default())?;
                            tx.exec_drop(&insert, row)?;
                            match extra {
                                Extra::Outbox => {
                                    outbox.add(&mut tx, &sample_message(&topic, i, KEYS))?;
                                }
                                Extra::NoOp => tx.query_drop("DO 0")?,
                                _ => {}
                            }
                            tx.commit()?;
                        }
                    }
                }
                spent[extra as usize] += start.elapsed();
            }
            order.rotate_left(1);
        }
        self.drop_table(&business)?;
        self.drop_table(&tiny)?;
        self.drop_table(store.table())?;
        Ok(spent.map(|d| n as f64 / d.as_secs_f64()))
    }

    /// `n` transactions of `per_tx` messages through `add_all`; messages per second.
    fn batch_add(&self, n: usize, per_tx: usize) -> Result<f64, Box<dyn std::error::Error>> {
        let store = self.store("batch")?;
        let outbox = Outbox::new(&store);
        let topic = self.name("topic");
        let messages: Vec<Message> = (0..per_tx)
            .map(|i| sample_message(&topic, i, KEYS))
            .collect();
        let start = Instant::now();
        for _ in 0..n {
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        let rate = (n * per_tx) as f64 / start.elapsed().as_secs_f64();
        self.drop_table(store.table())?;
        Ok(rate)
    }

    /// A fresh table holding a committed backlog of `n` messages over `keys` keys.
    fn backlog(
        &self,
        n: usize,
        keys: usize,
        topic: &str,
    ) -> Result<MySqlStore, Box<dyn std::error::Error>> {
        let store = self.store("drain")?;
        let outbox = Outbox::new(&store);
        for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
            let messages: Vec<Message> = chunk
                .iter()
                .map(|&i| sample_message(topic, i, keys))
                .collect();
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        Ok(store)
    }

    /// A table of `rows` messages over 10 topics, as a busy outbox holds them: the first
    /// 90 % delivered, then one in a hundred of the rest dead and the others pending, 500
    /// of those leased.
    fn status_table(&self, rows: usize) -> Result<MySqlStore, Box<dyn std::error::Error>> {
        let store = self.store("status")?;
        let outbox = Outbox::new(&store);
        let topic = self.name("topic");
        for chunk in (0..rows).collect::<Vec<_>>().chunks(2_000) {
            let messages: Vec<Message> = chunk
                .iter()
                .map(|&i| sample_message(&format!("{topic}-{}", i % 10), i, KEYS))
                .collect();
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        let t = store.table();
        let mut conn = self.pool.get_conn()?;
        let first: u64 = conn
            .query_first(format!("SELECT MIN(id) FROM `{t}`"))?
            .unwrap_or(1);
        let delivered_below = first + (rows as u64) * 9 / 10;
        for start in (first..delivered_below).step_by(50_000) {
            conn.query_drop(format!(
                "UPDATE `{t}` SET state = 1, processed_on = UTC_TIMESTAMP(6), \
                 last_attempted_on = UTC_TIMESTAMP(6), number_of_attempts = 1 \
                 WHERE id >= {start} AND id < {}",
                (start + 50_000).min(delivered_below)
            ))?;
        }
        conn.query_drop(format!(
            "UPDATE `{t}` SET state = 2, processed_on = UTC_TIMESTAMP(6), number_of_attempts = 5, \
             error = 'broker refused: message size too large' \
             WHERE id >= {delivered_below} AND id % 100 = 0"
        ))?;
        conn.query_drop(format!(
            "UPDATE `{t}` SET locked_by = {}, locked_on = UTC_TIMESTAMP(6) \
             WHERE state = 0 ORDER BY id LIMIT 500",
            MySqlStore::leases_of("bench#00000000").start()
        ))?;
        Ok(store)
    }

    /// Whether any row is still pending: one index dive, so that watching a drain costs
    /// the server little (a `COUNT(*)` every 20 ms would take CPU from the drain itself).
    fn any_pending(&self, table: &str) -> Result<bool, mysql::Error> {
        let found: Option<u8> = self.pool.get_conn()?.query_first(format!(
            "SELECT EXISTS (SELECT 1 FROM `{table}` WHERE state = 0)"
        ))?;
        Ok(found == Some(1))
    }

    /// Drains a backlog of `n` messages over `keys` keys with `dispatchers` dispatchers
    /// (sending one message of a key at a time when `strict`); messages per second from
    /// their start until the last row is marked delivered (which happens only after the
    /// broker acknowledged it).
    fn drain(
        &self,
        n: usize,
        keys: usize,
        dispatchers: usize,
        strict: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.backlog(n, keys, &topic)?;
        let settings = DispatcherSettings {
            process_interval: Duration::from_millis(100),
            ..Default::default()
        };
        let start = Instant::now();
        let handles = (0..dispatchers)
            .map(|i| {
                let strict = (
                    outbox::STRICT_KEY_ORDER,
                    if strict { "true" } else { "false" },
                );
                let broker = KafkaBroker::with_properties(&self.brokers, [strict])?;
                Dispatcher::new(
                    store.clone(),
                    broker,
                    settings.clone(),
                    &format!("bench-{i}"),
                )?
                .start()
            })
            .collect::<Result<Vec<_>, _>>()?;
        while self.any_pending(store.table())? {
            std::thread::sleep(Duration::from_millis(20));
            if start.elapsed() > Duration::from_secs(1_800) {
                return Err("drain took longer than 30 minutes".into());
            }
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        drop(handles);
        self.drop_table(store.table())?;
        Ok(rate)
    }

    /// The same messages produced straight through rdkafka, every delivery report awaited.
    fn raw_broker(&self, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
        self.produce(&self.name("topic"), n, false)
    }

    /// Publishes `n` sample messages to `topic` straight through rdkafka, with the
    /// outbox's message id header when `with_ids`; messages per second.
    fn produce(
        &self,
        topic: &str,
        n: usize,
        with_ids: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()?;
        let messages: Vec<Message> = (0..n).map(|i| sample_message(topic, i, KEYS)).collect();
        let start = Instant::now();
        for m in &messages {
            let mut headers = outbox::rdkafka::message::OwnedHeaders::new_with_capacity(4);
            for (name, value) in m.headers() {
                headers = headers.insert(outbox::rdkafka::message::Header {
                    key: name,
                    value: Some(value),
                });
            }
            let id = outbox::uuid::Uuid::now_v7().to_string();
            if with_ids {
                headers = headers.insert(outbox::rdkafka::message::Header {
                    key: outbox::MESSAGE_ID_HEADER,
                    value: Some(&id),
                });
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(topic)
                .payload(m.payload())
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            let mut record = Some(record);
            while let Some(r) = record.take() {
                if let Err((_, back)) = producer.send(r) {
                    producer.poll(Duration::from_millis(10));
                    record = Some(back);
                }
            }
        }
        producer.flush(Duration::from_secs(120))?;
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// A consumer of every partition of `topic` from its beginning, without a group.
    fn assigned_consumer(
        &self,
        topic: &str,
    ) -> Result<outbox::rdkafka::consumer::BaseConsumer, Box<dyn std::error::Error>> {
        use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
        use outbox::rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.name("group"))
            .set("enable.auto.commit", "false")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut list = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&list)?;
        Ok(consumer)
    }

    /// A business table of one row per record.
    fn effects_table(&self) -> Result<String, Box<dyn std::error::Error>> {
        let name = self.name("effects");
        self.pool.get_conn()?.query_drop(format!(
            "CREATE TABLE `{name}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             event_id CHAR(36) NOT NULL, body BLOB NOT NULL)"
        ))?;
        Ok(name)
    }

    /// `n` records of `topic` read by rdkafka alone; records per second.
    fn consume_raw(&self, topic: &str, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
        let consumer = self.assigned_consumer(topic)?;
        let start = Instant::now();
        let mut read = 0;
        while read < n {
            if let Some(record) = consumer.poll(Duration::from_millis(100)) {
                record?;
                read += 1;
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err("the raw consumer did not read every record".into());
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// `n` records of `topic`, each writing one row and its partition's next offset in one
    /// transaction: the inbox consumer's loop without the inbox's record.
    fn consume_without_inbox(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let effects = self.effects_table()?;
        let offsets = self.name("offsets");
        let mut conn = self.pool.get_conn()?;
        conn.query_drop(format!(
            "CREATE TABLE `{offsets}` (topic VARCHAR(249) NOT NULL, kafka_partition INT NOT NULL, \
             next_offset BIGINT NOT NULL, PRIMARY KEY (topic, kafka_partition))"
        ))?;
        let insert = format!("INSERT INTO `{effects}` (event_id, body) VALUES (?, ?)");
        let save = format!(
            "INSERT INTO `{offsets}` (topic, kafka_partition, next_offset) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))"
        );
        let consumer = self.assigned_consumer(topic)?;
        let start = Instant::now();
        let mut read = 0;
        let mut deliveries = Vec::with_capacity(batch);
        while read < n {
            deliveries.clear();
            let mut timeout = Duration::from_millis(100);
            while deliveries.len() < batch {
                match consumer.poll(timeout) {
                    Some(record) => deliveries.push(outbox::inbox::Delivery::from_kafka(&record?)),
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let mut last: HashMap<(String, i32), i64> = HashMap::new();
            for delivery in &deliveries {
                tx.exec_drop(
                    &insert,
                    (delivery.message_id().to_string(), delivery.payload()),
                )?;
                last.insert(
                    (delivery.topic().to_string(), delivery.partition()),
                    delivery.offset(),
                );
            }
            for ((topic, partition), offset) in last {
                tx.exec_drop(&save, (topic, partition, offset + 1))?;
            }
            tx.commit()?;
            read += deliveries.len();
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        self.drop_table(&effects)?;
        self.drop_table(&offsets)?;
        Ok(rate)
    }

    /// `n` records of `topic` through an `InboxConsumer` whose handler writes one row;
    /// records per second, until the last record's offset is saved.
    fn consume_with_inbox(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        use outbox::inbox::{
            Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxSettings,
        };
        let effects = self.effects_table()?;
        let inbox = Inbox::with_table(self.pool.clone(), &self.name("inbox"))?;
        inbox.migrate()?;
        let insert = format!("INSERT INTO `{effects}` (event_id, body) VALUES (?, ?)");
        let consumer = InboxConsumer::new(
            inbox.clone(),
            "bench",
            &self.brokers,
            Assignment::Topics(vec![topic.to_string()]),
            InboxSettings {
                batch_size: batch,
                ..Default::default()
            },
        )?;
        let read = format!(
            "SELECT COALESCE(SUM(next_offset), 0) FROM `{}_offsets`",
            inbox.table()
        );
        let mut conn = self.pool.get_conn()?;
        let start = Instant::now();
        let mut handle = consumer.start(
            move |tx: &mut mysql::Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
                tx.exec_drop(&insert, (d.message_id().to_string(), d.payload()))?;
                Ok(())
            },
        )?;
        loop {
            let done: Option<u64> = conn.query_first(&read)?;
            if done.unwrap_or(0) >= n as u64 {
                break;
            }
            if start.elapsed() > Duration::from_secs(600) || !handle.is_running() {
                return Err("the inbox consumer did not read every record".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        handle.stop()?;
        self.drop_table(&effects)?;
        let t = inbox.table();
        conn.query_drop(format!("DROP TABLE `{t}`, `{t}_dead`, `{t}_offsets`"))?;
        Ok(rate)
    }

    /// A plain claim-and-mark loop over a backlog of `n` rows, 500 at a time, reading the
    /// same columns as the relay; no broker, no per-key rule.
    fn raw_claim_and_mark(&self, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.backlog(n, KEYS, &topic)?;
        let t = store.table().to_string();
        let mut conn = self.pool.get_conn()?;
        let start = Instant::now();
        loop {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let rows: Vec<RawRow> = tx.exec(
                format!(
                    "SELECT id, message_id, topic, msg_key, headers, payload, number_of_attempts FROM `{t}` \
                     WHERE state = 0 AND locked_by = 0 ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED"
                ),
                (),
            )?;
            if rows.is_empty() {
                break;
            }
            let ids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
            tx.query_drop(format!(
                "UPDATE `{t}` SET locked_by = 1, locked_on = UTC_TIMESTAMP(6) WHERE id IN ({})",
                ids.join(",")
            ))?;
            tx.commit()?;
            conn.query_drop(format!(
                "UPDATE `{t}` SET state = 1, processed_on = UTC_TIMESTAMP(6), last_attempted_on = UTC_TIMESTAMP(6), \
                 number_of_attempts = number_of_attempts + 1, locked_by = 0 \
                 WHERE locked_by = 1 AND id IN ({})",
                ids.join(",")
            ))?;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        self.drop_table(&t)?;
        Ok(rate)
    }

    /// Commits `rate` single-message transactions per second for `duration`, from 4 writer
    /// threads (enough to offer the rate even when one commit is slow); `committed` is told
    /// each message id as its commit returns.
    fn paced_writes(
        &self,
        outbox: &Outbox,
        topic: &str,
        rate: u32,
        duration: Duration,
        committed: impl Fn(outbox::uuid::Uuid) + Send + Sync + 'static,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let writers = 4u32;
        let per_writer = rate / writers;
        let committed = Arc::new(committed);
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let (pool, outbox, topic, committed) = (
                    self.pool.clone(),
                    outbox.clone(),
                    topic.to_string(),
                    committed.clone(),
                );
                std::thread::spawn(move || -> Result<(), outbox::Error> {
                    let ticks = crossbeam_channel::tick(Duration::from_secs(1) / per_writer);
                    let end = Instant::now() + duration;
                    let mut i = w as usize;
                    while Instant::now() < end {
                        let _ = ticks.recv();
                        let mut tx = pool.start_transaction(TxOpts::default())?;
                        let id = outbox.add(&mut tx, &sample_message(&topic, i, KEYS))?;
                        tx.commit()?;
                        committed(id);
                        i += writers as usize;
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| "writer panicked")??;
        }
        Ok(())
    }

    /// Commits `rate` single-message transactions per second for `duration` and returns,
    /// in milliseconds, the time from each commit to the broker's acknowledgement.
    fn latency(
        &self,
        rate: u32,
        duration: Duration,
        wake: bool,
    ) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.store("latency")?;
        let outbox = Outbox::new(&store);
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let broker = TimingBroker {
            inner: KafkaBroker::new(&self.brokers)?,
            acked: acked.clone(),
        };
        let handle = Dispatcher::new(
            store.clone(),
            broker,
            DispatcherSettings::default(),
            "latency",
        )?
        .start()?;
        let waker = handle.waker();

        let committed = Arc::new(Mutex::new(HashMap::new()));
        let stamps = committed.clone();
        self.paced_writes(&outbox, &topic, rate, duration, move |id| {
            stamps.lock().insert(id, Instant::now());
            if wake {
                waker.wake();
            }
        })?;
        let total = committed.lock().len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().len() < total && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(handle);
        let committed = committed.lock();
        let acked = acked.lock();
        let latencies = committed
            .iter()
            .filter_map(|(id, at)| {
                acked
                    .get(id)
                    .map(|done: &Instant| done.duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect();
        self.drop_table(store.table())?;
        Ok(latencies)
    }

    /// Peak resident memory, in MiB, of an `outbox relay` process draining a backlog of
    /// `n` messages with `batch_size`.
    /// One run of the web service: its requests per second, and (with `events`) the
    /// milliseconds from each 2xx answer to its event's arrival at a consumer.
    fn web_run(&self, events: bool) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
        use std::io::{BufRead, Read, Write};
        let (outbox_table, orders, topic) = (
            self.name("web_outbox"),
            self.name("web_orders"),
            self.name("web"),
        );
        let command = std::env::var("BENCH_WEB")
            .unwrap_or_else(|_| "target/release/examples/web_service".into());
        let mut service = std::process::Command::new(command)
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_TABLE", &outbox_table)
            .env("WEB_ORDERS_TABLE", &orders)
            .env("WEB_TOPIC", &topic)
            .env("WEB_ADDR", "127.0.0.1:0")
            .env("WEB_WITHOUT_EVENTS", if events { "0" } else { "1" })
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(service.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("listening on http://")
            .ok_or("the service did not say where it listens")?
            .to_string();
        let post = |path: &str, body: &str| -> Result<(u16, String), std::io::Error> {
            let mut stream = std::net::TcpStream::connect(&address)?;
            write!(
                stream,
                "POST {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok());
            let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            Ok((status.unwrap_or(0), body.to_string()))
        };
        // Each client creates an order and pays it, in turn; every answer's time is kept
        // by (order id, event).
        let answered: Mutex<HashMap<(u64, bool), Instant>> = Mutex::new(HashMap::new());
        // The consumer reads while the clients run, from the topic's creation on.
        let consumer = events.then(|| {
            let (brokers, topic, group) = (self.brokers.clone(), topic.clone(), self.name("group"));
            std::thread::spawn(move || {
                arrivals(&brokers, &topic, &group, WEB_CLIENTS * WEB_REQUESTS)
            })
        });
        let start = Instant::now();
        std::thread::scope(|scope| -> Result<(), String> {
            let clients: Vec<_> = (0..WEB_CLIENTS)
                .map(|_| {
                    scope.spawn(|| -> Result<(), String> {
                        for _ in 0..WEB_REQUESTS / 2 {
                            let (status, body) =
                                post("/orders", r#"{"customer":"c","total_cents":1}"#)
                                    .map_err(|e| e.to_string())?;
                            let id = body
                                .split(|c: char| !c.is_ascii_digit())
                                .find(|part| !part.is_empty())
                                .and_then(|id| id.parse::<u64>().ok());
                            let (201, Some(id)) = (status, id) else {
                                return Err(format!("create answered {status}: {body}"));
                            };
                            answered.lock().insert((id, false), Instant::now());
                            let (status, body) = post(&format!("/orders/{id}/pay"), "")
                                .map_err(|e| e.to_string())?;
                            if status != 200 {
                                return Err(format!("pay answered {status}: {body}"));
                            }
                            answered.lock().insert((id, true), Instant::now());
                        }
                        Ok(())
                    })
                })
                .collect();
            for client in clients {
                client
                    .join()
                    .map_err(|_| "a client panicked".to_string())??;
            }
            Ok(())
        })?;
        let rate = (WEB_CLIENTS * WEB_REQUESTS) as f64 / start.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        if let Some(consumer) = consumer {
            let arrived = consumer.join().map_err(|_| "the consumer panicked")??;
            for (event, answer) in answered.lock().iter() {
                let at = arrived
                    .get(event)
                    .ok_or("an answered event never arrived")?;
                latencies.push(at.saturating_duration_since(*answer).as_secs_f64() * 1e3);
            }
        }
        // SAFETY: kill with the pid of a child still running.
        unsafe { libc::kill(service.id() as libc::pid_t, libc::SIGTERM) };
        service.wait()?;
        for name in [outbox_table, orders] {
            self.drop_table(&name)?;
        }
        Ok((rate, latencies))
    }

    /// Drains a backlog of `n` messages with one `outbox relay` process, serving metrics
    /// or not; messages per second from its start until no row is pending.
    fn relay_drain(&self, n: usize, metrics: bool) -> Result<f64, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.backlog(n, KEYS, &topic)?;
        let command =
            std::env::var("BENCH_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
        let mut relay = std::process::Command::new(command);
        relay
            .arg("relay")
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_TABLE", store.table())
            .env("OUTBOX_PROCESS_INTERVAL_MS", "100")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        if metrics {
            relay.env("OUTBOX_METRICS_ADDR", "0");
        }
        let start = Instant::now();
        let mut child = relay.spawn()?;
        while self.any_pending(store.table())? {
            std::thread::sleep(Duration::from_millis(20));
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        drop(child.stdin.take());
        child.wait()?;
        self.drop_table(store.table())?;
        Ok(rate)
    }

    fn relay_peak_rss(
        &self,
        n: usize,
        batch_size: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.backlog(n, KEYS, &topic)?;
        let relay =
            std::env::var("BENCH_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
        let mut child = std::process::Command::new(relay)
            .arg("relay")
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_TABLE", store.table())
            .env("OUTBOX_BATCH_SIZE", batch_size.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        while self.any_pending(store.table())? {
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmHWM in /proc status")?;
        drop(child.stdin.take());
        child.wait()?;
        self.drop_table(store.table())?;
        Ok(kib / 1024.0)
    }
}

/// The binlog relay against the polling relay, each an `outbox relay` process, on the
/// benchmark's MariaDB with the binary log on; the polling drain on the machine's server
/// too.
fn binlog(
    shared: &Bench,
    runs: usize,
    backlog: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BENCH_BINLOG_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3307/test".into());
    let private = Bench::at(url.clone())?;
    eprintln!("binlog relay, {backlog} messages ({runs} runs)");
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut work: HashMap<(&str, &str), Vec<f64>> = HashMap::new();
    let mut latency: HashMap<(&str, &str), Vec<f64>> = HashMap::new();
    let mut idle: HashMap<&str, Vec<f64>> = HashMap::new();
    for run in 0..runs {
        // Alternate which goes first, as the server's weather drifts.
        let order = if run % 2 == 0 {
            [Source::Binlog, Source::Polling]
        } else {
            [Source::Polling, Source::Binlog]
        };
        for source in order {
            let (rate, per_message) = private.source_drain(backlog, source)?;
            rates.entry(source.name()).or_default().push(rate);
            for (what, value) in [
                ("statements", per_message.statements),
                ("rows read", per_message.rows_read),
                ("rows written", per_message.rows_written),
            ] {
                work.entry((source.name(), what)).or_default().push(value);
            }
        }
        if let Some((_pinned, others)) = Pinned::new() {
            let mut apart = Bench::at(url.clone())?;
            apart.relay_cpus = Some(others);
            for source in order {
                let (rate, _) = apart.source_drain(backlog, source)?;
                let name = match source {
                    Source::Binlog => "binlog, database on a CPU of its own",
                    Source::Polling => "polling, database on a CPU of its own",
                };
                rates.entry(name).or_default().push(rate);
            }
        }
        rates
            .entry("polling, machine's server")
            .or_default()
            .push(shared.relay_drain(backlog, false)?);
        for source in order {
            let mut latencies = private.source_latency(source, 1_000, Duration::from_secs(10))?;
            latencies.sort_by(f64::total_cmp);
            for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                latency
                    .entry((source.name(), label))
                    .or_default()
                    .push(percentile(&latencies, q));
            }
            idle.entry(source.name())
                .or_default()
                .push(private.idle_statements(source, Duration::from_secs(10))?);
        }
    }
    for source in [Source::Binlog, Source::Polling] {
        let name = source.name();
        for q in ["p50", "p99"] {
            table.millis(
                &format!("commit to ack at 1,000 msg/s, {name}, {q} (ms)"),
                &latency[&(name, q)],
            );
        }
    }
    for source in [Source::Binlog, Source::Polling] {
        let name = source.name();
        table.rate(
            &format!("drain, {name} relay process (msg/s)"),
            &rates[name],
        );
    }
    table.ratio(
        "  binlog / polling",
        &rates[Source::Binlog.name()],
        &rates[Source::Polling.name()],
    );
    let (binlog_apart, polling_apart) = (
        "binlog, database on a CPU of its own",
        "polling, database on a CPU of its own",
    );
    if let (Some(binlog), Some(polling)) = (rates.get(binlog_apart), rates.get(polling_apart)) {
        table.rate(&format!("drain, {binlog_apart} (msg/s)"), binlog);
        table.rate(&format!("drain, {polling_apart} (msg/s)"), polling);
        table.ratio("  binlog / polling, database apart", binlog, polling);
    }
    table.rate(
        "drain, polling relay process, machine's server (msg/s)",
        &rates["polling, machine's server"],
    );
    for what in ["statements", "rows read", "rows written"] {
        for source in [Source::Binlog, Source::Polling] {
            let name = source.name();
            table.value(
                &format!("server work per message, {name}: {what}"),
                &work[&(name, what)],
            );
        }
        table.ratio(
            &format!("  binlog / polling, {what}"),
            &work[&(Source::Binlog.name(), what)],
            &work[&(Source::Polling.name(), what)],
        );
    }
    for source in [Source::Binlog, Source::Polling] {
        let name = source.name();
        table.value(
            &format!("statements in 10 idle seconds, {name}"),
            &idle[name],
        );
    }
    Ok(())
}

/// Where an `outbox relay` reads messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Polling,
    Binlog,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Polling => "polling",
            Source::Binlog => "binlog",
        }
    }
}

/// The benchmark's database server on CPU 0 and the broker and relays on the others, as
/// when the database has a host of its own; undone when dropped. Its processes come
/// from `BENCH_BINLOG_PID_FILE` and `BENCH_BROKER_PID_FILE` (which `make bench` sets).
struct Pinned {
    pids: Vec<u32>,
    all: String,
}

impl Pinned {
    /// `None` (and why, on standard error) when a process is unknown or there is one CPU.
    fn new() -> Option<(Pinned, String)> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let pid = |variable: &str| -> Option<u32> {
            let file = std::env::var(variable).ok()?;
            std::fs::read_to_string(file).ok()?.trim().parse().ok()
        };
        let (Some(database), Some(broker)) =
            (pid("BENCH_BINLOG_PID_FILE"), pid("BENCH_BROKER_PID_FILE"))
        else {
            eprintln!("  (no pinned drains: the database's or the broker's process is unknown)");
            return None;
        };
        if cpus < 2 {
            eprintln!("  (no pinned drains: one CPU)");
            return None;
        }
        let others = format!("1-{}", cpus - 1);
        let pinned = Pinned {
            pids: vec![database, broker],
            all: format!("0-{}", cpus - 1),
        };
        let pin = |pid: u32, cpus: &str| taskset(pid, cpus);
        if !(pin(database, "0") && pin(broker, &others)) {
            eprintln!("  (no pinned drains: taskset failed)");
            return None;
        }
        Some((pinned, others))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for &pid in &self.pids {
            taskset(pid, &self.all);
        }
    }
}

/// Sets the CPUs of every thread of `pid`; whether it could.
fn taskset(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// What the server did for a relay, from `SHOW GLOBAL STATUS`.
#[derive(Debug, Default, Clone, Copy)]
struct ServerWork {
    statements: f64,
    rows_read: f64,
    rows_written: f64,
}

impl ServerWork {
    /// The work between two snapshots of the counters, less `own` statements of the
    /// bench's (each reading at most one row) and the second snapshot itself.
    fn between(
        before: &HashMap<String, f64>,
        after: &HashMap<String, f64>,
        own: f64,
    ) -> ServerWork {
        let delta = |names: &[&str]| -> f64 {
            names
                .iter()
                .map(|n| after.get(*n).unwrap_or(&0.0) - before.get(*n).unwrap_or(&0.0))
                .sum()
        };
        ServerWork {
            statements: delta(&["Questions"]) - own - 1.0,
            rows_read: delta(&[
                "Handler_read_first",
                "Handler_read_key",
                "Handler_read_last",
                "Handler_read_next",
                "Handler_read_prev",
                "Handler_read_rnd",
                "Handler_read_rnd_next",
            ]) - own,
            rows_written: delta(&["Handler_write", "Handler_update", "Handler_delete"]),
        }
    }
}

impl Bench {
    /// Starts `outbox relay` on `table`, reading from `source`; closing its standard
    /// input stops it.
    fn relay_process(&self, table: &str, source: Source) -> std::io::Result<std::process::Child> {
        let outbox =
            std::env::var("BENCH_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
        let mut command = match &self.relay_cpus {
            Some(cpus) => {
                let mut taskset = std::process::Command::new("taskset");
                taskset.args(["-c", cpus, &outbox]);
                taskset
            }
            None => std::process::Command::new(outbox),
        };
        command
            .arg("relay")
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_TABLE", table)
            .env("OUTBOX_SOURCE", source.name())
            // BENCH_RELAY_LOG: the relays' own log filter, to see where their time goes.
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
    }

    fn stop_relay(mut child: std::process::Child) -> std::io::Result<()> {
        drop(child.stdin.take());
        child.wait().map(|_| ())
    }

    /// Waits until a binlog relay of `table` saved its first position: it follows the log.
    fn following(&self, table: &str) -> Result<(), Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The relay creates the table of positions as it starts.
            let found: Result<Option<u8>, _> = self.pool.get_conn()?.exec_first(
                "SELECT 1 FROM outbox_binlog_position WHERE outbox_table = ?",
                (table,),
            );
            if let Ok(Some(_)) = found {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the binlog relay never followed the log".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's counters, read on `conn`: a connection of the measurement's own, so
    /// that no pool's reset of a connection counts as a statement.
    fn status_counters(conn: &mut mysql::Conn) -> Result<HashMap<String, f64>, mysql::Error> {
        let rows: Vec<(String, String)> = conn.query("SHOW GLOBAL STATUS")?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, value)| value.parse().ok().map(|v| (name, v)))
            .collect())
    }

    /// A backlog of `n` committed while no relay ran, drained by a relay process reading
    /// from `source` (the binlog relay saved a position before the backlog was written):
    /// messages per second from its start to the last row marked, and the server's work
    /// per message meanwhile.
    fn source_drain(
        &self,
        n: usize,
        source: Source,
    ) -> Result<(f64, ServerWork), Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.store("binlog_drain")?;
        if source == Source::Binlog {
            let relay = self.relay_process(store.table(), source)?;
            self.following(store.table())?;
            Bench::stop_relay(relay)?;
        }
        let outbox = Outbox::new(&store);
        for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
            let messages: Vec<Message> = chunk
                .iter()
                .map(|&i| sample_message(&topic, i, KEYS))
                .collect();
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        let mut own = mysql::Conn::new(self.url.as_str())?;
        let pending = format!(
            "SELECT EXISTS (SELECT 1 FROM `{}` WHERE state = 0)",
            store.table()
        );
        let before = Bench::status_counters(&mut own)?;
        let start = Instant::now();
        let relay = self.relay_process(store.table(), source)?;
        let mut polls = 0.0;
        loop {
            polls += 1.0;
            if own.query_first::<u8, _>(&pending)? != Some(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let after = Bench::status_counters(&mut own)?;
        Bench::stop_relay(relay)?;
        let work = ServerWork::between(&before, &after, polls);
        self.drop_table(store.table())?;
        Ok((
            rate,
            ServerWork {
                statements: work.statements / n as f64,
                rows_read: work.rows_read / n as f64,
                rows_written: work.rows_written / n as f64,
            },
        ))
    }

    /// Milliseconds from each commit (when it returned to the writer) to its row's mark
    /// after the broker's acknowledgement (`processed_on`, the database's clock on this
    /// same host), at `rate` messages per second of one-message transactions, with a
    /// relay process reading from `source` and no wake-up.
    fn source_latency(
        &self,
        source: Source,
        rate: u32,
        duration: Duration,
    ) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.store("binlog_latency")?;
        let relay = self.relay_process(store.table(), source)?;
        if source == Source::Binlog {
            self.following(store.table())?;
        }
        let committed = Arc::new(Mutex::new(HashMap::new()));
        let stamps = committed.clone();
        self.paced_writes(&Outbox::new(&store), &topic, rate, duration, move |id| {
            stamps.lock().insert(id, std::time::SystemTime::now());
        })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.any_pending(store.table())? && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Bench::stop_relay(relay)?;
        let marked: Vec<(Vec<u8>, i64)> = self.pool.get_conn()?.query(format!(
            "SELECT message_id, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', processed_on) \
             FROM `{}` WHERE state = 1",
            store.table()
        ))?;
        self.drop_table(store.table())?;
        let committed = committed.lock();
        Ok(marked
            .into_iter()
            .filter_map(|(id, marked_us)| {
                let id = outbox::uuid::Uuid::from_slice(&id).ok()?;
                let at = committed
                    .get(&id)?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                Some((marked_us as f64 - at.as_micros() as f64) / 1e3)
            })
            .collect())
    }

    /// Statements the server ran while a relay process reading from `source` waited for
    /// `window` with nothing committed (after 2 s to settle; its lock checker and cleaner
    /// run at start and then every 30 s and 60 s, outside the window).
    fn idle_statements(
        &self,
        source: Source,
        window: Duration,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let store = self.store("binlog_idle")?;
        let relay = self.relay_process(store.table(), source)?;
        if source == Source::Binlog {
            self.following(store.table())?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let mut own = mysql::Conn::new(self.url.as_str())?;
        let before = Bench::status_counters(&mut own)?;
        std::thread::sleep(window);
        let after = Bench::status_counters(&mut own)?;
        Bench::stop_relay(relay)?;
        self.drop_table(store.table())?;
        Ok(ServerWork::between(&before, &after, 0.0).statements)
    }
}

/// Reads `topic` from its creation until `expected` events arrived (or two minutes
/// passed); when each arrived, by (order id, whether it is the payment).
fn arrivals(
    brokers: &str,
    topic: &str,
    group: &str,
    expected: usize,
) -> Result<HashMap<(u64, bool), Instant>, String> {
    use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
    use outbox::rdkafka::message::Message as _;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Topics are created by the first produce: wait for it, then read from the start.
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !ids.is_empty() {
            break ids;
        }
        if Instant::now() > deadline {
            return Err(format!("topic {topic} never appeared"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut list = outbox::rdkafka::TopicPartitionList::new();
    for id in partitions {
        list.add_partition_offset(topic, id, outbox::rdkafka::Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&list).map_err(|e| e.to_string())?;
    let mut arrived = HashMap::with_capacity(expected);
    while arrived.len() < expected && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.map_err(|e| e.to_string())?;
        let at = Instant::now();
        let event: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())
                .map_err(|e| e.to_string())?;
        let id = event["id"].as_u64().ok_or("an event without id")?;
        arrived
            .entry((id, event["type"] == "OrderPaid"))
            .or_insert(at);
    }
    Ok(arrived)
}

/// Records when each message's publish call came back acknowledged.
struct TimingBroker {
    inner: KafkaBroker,
    acked: Arc<Mutex<HashMap<outbox::uuid::Uuid, Instant>>>,
}

impl Broker for TimingBroker {
    fn publish(&mut self, records: &[Record]) -> Vec<outbox::Result<()>> {
        let outcomes = self.inner.publish(records);
        let now = Instant::now();
        let mut acked = self.acked.lock();
        for (record, outcome) in records.iter().zip(&outcomes) {
            if outcome.is_ok() {
                acked.insert(record.message_id, now);
            }
        }
        outcomes
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}

/// About 200 bytes of payload, 3 headers, one of `keys` keys.
fn inbox(
    bench: &Bench,
    runs: usize,
    records: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("inbox, {records} records ({runs} runs)");
    let topic = bench.name("inbox").replace('_', ".");
    bench.produce(&topic, records, true)?;
    let mut raw = vec![];
    // Per batch size: the loop without the inbox, and the inbox consumer.
    let sizes = [1, 100];
    let mut plain = vec![vec![]; sizes.len()];
    let mut inboxed = vec![vec![]; sizes.len()];
    for run in 0..runs {
        raw.push(bench.consume_raw(&topic, records)?);
        for (i, &batch) in sizes.iter().enumerate() {
            // Each first in turn: the server's disk weather changes by the minute.
            if run % 2 == 0 {
                plain[i].push(bench.consume_without_inbox(&topic, records, batch)?);
                inboxed[i].push(bench.consume_with_inbox(&topic, records, batch)?);
            } else {
                inboxed[i].push(bench.consume_with_inbox(&topic, records, batch)?);
                plain[i].push(bench.consume_without_inbox(&topic, records, batch)?);
            }
        }
    }
    table.rate("raw consumer alone (records/s)", &raw);
    for (i, batch) in sizes.iter().enumerate() {
        let per = if *batch == 1 {
            "a transaction per record".to_string()
        } else {
            format!("up to {batch} records per transaction")
        };
        table.rate(
            &format!("loop without the inbox, {per} (records/s)"),
            &plain[i],
        );
        table.rate(&format!("inbox consumer, {per} (records/s)"), &inboxed[i]);
        table.ratio(
            "  inbox / same loop without the inbox",
            &inboxed[i],
            &plain[i],
        );
        table.ratio("  raw consumer / inbox (times faster)", &raw, &inboxed[i]);
    }
    Ok(())
}

fn sample_message(topic: &str, i: usize, keys: usize) -> Message {
    let mut payload = format!(
        "{{\"order\":{i},\"customer\":\"customer-{}\",\"items\":[",
        i % keys
    );
    while payload.len() < PAYLOAD - 3 {
        payload.push_str("\"sku-000\",");
    }
    payload.truncate(PAYLOAD - 2);
    payload.push_str("]}");
    Message::new(topic, payload)
        .with_key(format!("key-{}", i % keys))
        .with_header("event-type", "OrderCreated")
        .with_header("source", "bench")
        .with_header("trace-id", format!("{i:016x}"))
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// The result table: one row per figure, its median and its spread over the runs.
#[derive(Default)]
struct Table {
    rows: Vec<(String, String, String)>,
}

impl Table {
    fn add(&mut self, label: &str, values: &[f64], format: impl Fn(f64) -> String) {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.rows.push((
            label.to_string(),
            format(median(values)),
            format!("{} .. {}", format(min), format(max)),
        ));
        eprintln!("  {label}: {}", format(median(values)));
    }

    fn rate(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.0}"));
    }

    fn millis(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.1}"));
    }

    fn value(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.2}"));
    }

    fn mib(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.1}"));
    }

    /// Ratio run by run (each pair measured in the same run), then its median.
    fn ratio(&mut self, label: &str, numerator: &[f64], denominator: &[f64]) {
        let ratios: Vec<f64> = numerator
            .iter()
            .zip(denominator)
            .map(|(a, b)| a / b)
            .collect();
        self.add(label, &ratios, |v| format!("{v:.2}"));
    }

    fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut out = format!(
            "| {:width$} | median | spread (min .. max) |\n| {} | ---: | --- |\n",
            "figure",
            "-".repeat(width)
        );
        for (label, median, spread) in &self.rows {
            out.push_str(&format!("| {label:width$} | {median} | {spread} |\n"));
        }
        out
    }
}
