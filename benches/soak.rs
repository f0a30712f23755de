//! `make soak`: a bounded soak. Writers add at a steady rate (one through `Outbox::add`,
//! one through an `OutboxTransaction`) while two dispatchers
//! (`outbox relay` processes) relay
//! to a broker of the soak's own (Tansu from `make services`) that is killed and
//! restarted every 30 s. At the end: every committed message is delivered (by the table),
//! none is dead, what the consumer read keeps each key's order, and resident memory and
//! open database connections did not grow.
//!
//! `SOAK_SECONDS` (default 600) sets the length; `OUTBOX_DATABASE_URL` the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::rdkafka::message::Message as _;
use outbox::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use outbox::{Message, MySqlStore, Outbox};

// The fault tests' broker process, shared by path (an example cannot use the tests' crate).
#[path = "../tests/common/tansu.rs"]
#[allow(dead_code)]
mod tansu;
use tansu::Tansu;

const KEYS_PER_WRITER: u64 = 50;
const WRITERS: u64 = 2;
/// How often memory and sessions are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long the relays' memory may grow before it must level off.
const WARM_UP: Duration = Duration::from_secs(240);
/// Broker restart period unless `SOAK_RESTART_SECONDS` says otherwise (0: never).
const RESTART_EVERY: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let url = std::env::var("OUTBOX_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let run = outbox::uuid::Uuid::now_v7().simple().to_string()[24..].to_string();
    let (table, topic, user) = (
        format!("soak_{run}"),
        format!("soak.{run}"),
        format!("soak_{run}"),
    );

    // The dispatchers connect as a user of their own, so their sessions can be counted.
    let admin = mysql::Pool::new(url.as_str())?;
    let mut conn = admin.get_conn()?;
    for host in ["%", "localhost"] {
        conn.query_drop(format!(
            "CREATE USER '{user}'@'{host}' IDENTIFIED BY 'soak'"
        ))?;
        conn.query_drop(format!("GRANT ALL ON *.* TO '{user}'@'{host}'"))?;
    }
    let store = MySqlStore::with_table(admin.clone(), &table)?;
    store.migrate()?;
    let outbox = Outbox::new(&store);

    // Two dispatchers, as outbox relay processes: their own memory is what is measured.
    let mut broker = Tansu::at(&broker_address());
    broker.start()?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("OUTBOX_DATABASE_URL has no scheme")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let relay_url = format!("{scheme}://{user}:soak@{host}");
    let relay = std::env::var("SOAK_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
    let mut relays = (0..2)
        .map(|i| {
            std::process::Command::new(&relay)
                .arg("relay")
                .env("OUTBOX_DATABASE_URL", &relay_url)
                .env("OUTBOX_KAFKA_BROKERS", broker_address())
                .env("OUTBOX_TABLE", &table)
                .env("OUTBOX_INSTANCE", format!("soak-{i}"))
                .env("OUTBOX_PROCESS_INTERVAL_MS", "100")
                // Three delivery timeouts of 10 s (the relay holds three batches) and 5 s.
                .env("OUTBOX_MAX_LOCK_MS", "35000")
                // Well under the final wait: a message that failed at many restarts in a
                // row must still be due again before the soak stops looking.
                .env("OUTBOX_BACKOFF_MAX_MS", "5000")
                .env(
                    "OUTBOX_KAFKA_PROPERTIES",
                    "message.timeout.ms=5000,request.timeout.ms=5000",
                )
                .env("RUST_LOG", "off")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;

    // Writers: each owns its keys and numbers their messages 1, 2, 3...
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (pool, outbox, topic, stop, committed) = (
                admin.clone(),
                outbox.clone(),
                topic.clone(),
                stop.clone(),
                committed.clone(),
            );
            std::thread::spawn(move || -> Result<HashMap<String, u64>, outbox::Error> {
                let mut versions: HashMap<String, u64> = HashMap::new();
                let ticks = crossbeam_channel::tick(Duration::from_millis(5));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = ticks.recv();
                    n += 1;
                    let key = format!("w{w}-k{}", n % KEYS_PER_WRITER);
                    let version = versions.get(&key).copied().unwrap_or(0) + 1;
                    let message = Message::new(&topic, format!("{key}:{version}")).with_key(&key);
                    // Half the writers add on their transaction, half on the commit.
                    if w % 2 == 0 {
                        let mut tx = pool.start_transaction(TxOpts::default())?;
                        outbox.add(&mut tx, &message)?;
                        tx.commit()?;
                    } else {
                        let mut tx = outbox.start_transaction(TxOpts::default())?;
                        tx.add(&message)?;
                        tx.commit()?;
                    }
                    versions.insert(key, version);
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(versions)
            })
        })
        .collect();

    // A consumer reads along, to check each key's order in what it sees.
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(Pause::default());
    let reader = {
        let (topic, stop, pause) = (topic.clone(), consumer_stop.clone(), pause.clone());
        std::thread::spawn(move || read_along(&topic, &stop, &pause))
    };

    let restart_every = match std::env::var("SOAK_RESTART_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(0) => Duration::from_secs(u32::MAX.into()),
        Some(n) => Duration::from_secs(n),
        None => RESTART_EVERY,
    };
    let start = Instant::now();
    let mut next_restart = start + restart_every;
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(SAMPLE_EVERY);
        let rss: u64 = relays
            .iter()
            .map(|r| resident_kib(r.id()))
            .sum::<std::io::Result<u64>>()?;
        samples.push((rss, sessions(&admin, &user)?));
        // A line a minute, so that a long soak shows whether memory levels off.
        if samples.len() % 12 == 0 {
            println!(
                "  {:>5} s: outbox relay resident memory (both) {rss} KiB",
                start.elapsed().as_secs()
            );
        }
        if Instant::now() >= next_restart {
            // The reader's consumer is closed over the restart: librdkafka 2.12's consumer
            // can crash on a leader change announced in a Fetch response without a topic
            // id, which Tansu sends as it comes back (see README, "Failures").
            pause.hold();
            let restarted = broker.start();
            pause.release();
            restarted?;
            next_restart = Instant::now() + restart_every;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut finals = HashMap::new();
    for writer in writers {
        finals.extend(writer.join().map_err(|_| "writer panicked")??);
    }
    let total = committed.load(Ordering::Relaxed);
    let count = |state: u8| -> Result<u64, mysql::Error> {
        Ok(admin
            .get_conn()?
            .query_first(format!(
                "SELECT COUNT(*) FROM `{table}` WHERE state = {state}"
            ))?
            .unwrap_or(0))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(1)? < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    consumer_stop.store(true, Ordering::Relaxed);
    let (read, order_breaks) = reader.join().map_err(|_| "reader panicked")?;
    for relay in &mut relays {
        drop(relay.stdin.take());
        relay.wait()?;
    }

    let delivered = count(1)?;
    let dead = count(2)?;
    // Whatever is still pending, as the table has it: why it did not go.
    let stuck: Vec<(u64, u32, i64, u64, Option<String>)> = admin.get_conn()?.query(format!(
        "SELECT id, number_of_attempts, TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(6), available_on), \
         locked_by, LEFT(error, 120) FROM `{table}` WHERE state = 0 ORDER BY id LIMIT 20"
    ))?;
    for (id, attempts, due_in, locked_by, error) in &stuck {
        println!(
            "  pending row {id}: {attempts} attempts, due in {due_in} s, locked_by {locked_by}, \
             error {error:?}"
        );
    }
    // Memory and sessions are compared from the end of the warm-up to the end. The relays'
    // memory grows for about four minutes (connections open as they are needed, and their
    // buffers fill), so the warm-up is 240 s, or half of a shorter soak.
    let warm_up = WARM_UP.min(Duration::from_secs(seconds / 2));
    let warm_index = (warm_up.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
    let (warm, last) = (
        samples[warm_index.min(samples.len() - 1)],
        samples[samples.len() - 1],
    );
    let peak_rss = samples.iter().map(|s| s.0).max().unwrap_or(0);
    println!("soak: {seconds} s, broker restarted every {restart_every:?}");
    println!(
        "  committed {total}, delivered {delivered}, dead {dead}, still pending {}",
        total - delivered.min(total)
    );
    println!("  consumer read {read} records; per-key order breaks: {order_breaks}");
    println!(
        "  outbox relay resident memory (both) {} KiB warm, {} KiB at the end, {peak_rss} KiB peak",
        warm.0, last.0
    );
    println!(
        "  dispatcher database sessions {} warm, {} at the end",
        warm.1, last.1
    );

    for host in ["%", "localhost"] {
        let _ = conn.query_drop(format!("DROP USER '{user}'@'{host}'"));
    }
    let _ = conn.query_drop(format!("DROP TABLE `{table}`"));
    let flat = last.0 <= warm.0 * 5 / 4 + 2_048 && last.1 <= warm.1 + 2;
    if delivered != total || dead != 0 || order_breaks != 0 || !flat || finals.is_empty() {
        return Err("the soak did not hold".into());
    }
    println!("soak: ok");
    Ok(())
}

/// Reads `topic` from the beginning of every partition as it grows. After a broker
/// restart its offsets are out of range on the new, empty log and reset to the start.
/// Returns how many records it read and how many broke their key's order.
/// Lets the main thread close the reader's consumer while it restarts the broker.
#[derive(Default)]
struct Pause {
    wanted: AtomicBool,
    /// True while the reader holds no consumer.
    idle: AtomicBool,
}

impl Pause {
    /// Asks the reader to close its consumer and waits (up to 10 s) until it has.
    fn hold(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.idle.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn release(&self) {
        self.wanted.store(false, Ordering::SeqCst);
    }
}

/// Reads the topic as the soak runs, with a new consumer after each broker restart
/// (reading the new broker's log from its beginning), and checks each key's order.
fn read_along(topic: &str, stop: &AtomicBool, pause: &Pause) -> (u64, u64) {
    let mut order = OrderCheck::default();
    while !stop.load(Ordering::Relaxed) {
        if pause.wanted.load(Ordering::SeqCst) {
            pause.idle.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        pause.idle.store(false, Ordering::SeqCst);
        if pause.wanted.load(Ordering::SeqCst) {
            continue;
        }
        read_until_paused(topic, stop, pause, &mut order);
    }
    order.result()
}

fn read_until_paused(topic: &str, stop: &AtomicBool, pause: &Pause, order: &mut OrderCheck) {
    let done = || stop.load(Ordering::Relaxed) || pause.wanted.load(Ordering::SeqCst);
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", broker_address())
        .set("group.id", format!("{topic}.reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create::<BaseConsumer>()
    else {
        std::thread::sleep(Duration::from_millis(200));
        return;
    };
    let partitions = loop {
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
            .unwrap_or(0);
        if found > 0 || done() {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let _ = assignment.add_partition_offset(topic, p, Offset::Beginning);
    }
    if partitions == 0 || consumer.assign(&assignment).is_err() {
        return;
    }
    while !done() {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            order.read(&String::from_utf8_lossy(
                message.payload().unwrap_or_default(),
            ));
        }
    }
}

/// Counts the records read whose key's order broke: a message read after a later one of
/// its key without having been read before. Reading a version again (a re-send) is
/// allowed, and so are gaps (messages a restarted broker lost with its memory storage).
/// It keeps, per key, only the highest version and the versions read below it since.
#[derive(Default)]
struct OrderCheck {
    keys: HashMap<String, (u64, std::collections::BTreeSet<u64>)>,
    records: u64,
    breaks: u64,
}

impl OrderCheck {
    fn read(&mut self, text: &str) {
        self.records += 1;
        let Some((key, version)) = text.rsplit_once(':') else {
            return;
        };
        let Ok(version) = version.parse::<u64>() else {
            return;
        };
        let (max, recent) = self.keys.entry(key.to_string()).or_default();
        if version < *max && !recent.contains(&version) {
            self.breaks += 1;
        }
        *max = (*max).max(version);
        recent.insert(version);
        // A re-send replays a short suffix: keep a window, not the whole history.
        while recent.len() > 200 {
            recent.pop_first();
        }
    }

    fn result(&self) -> (u64, u64) {
        (self.records, self.breaks)
    }
}

fn broker_address() -> String {
    std::env::var("SOAK_BROKER").unwrap_or_else(|_| "127.0.0.1:9192".into())
}

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

fn sessions(pool: &mysql::Pool, user: &str) -> Result<u64, mysql::Error> {
    Ok(pool
        .get_conn()?
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
            (user,),
        )?
        .unwrap_or(0))
}
