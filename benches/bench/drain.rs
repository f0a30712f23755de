//! Draining a backlog: by dispatchers, by `outbox relay` processes (memory, metrics),
//! and the raw limits of the broker and of the database alone.

use super::*;

pub(crate) fn drain(
    bench: &Bench,
    runs: usize,
    backlog: usize,
    hot_backlog: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("drain, {backlog} messages ({runs} runs)");
    let (mut raw_broker, mut raw_db, mut one, mut four, mut hot) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut one_strict, mut hot_strict, mut behind) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        raw_broker.push(bench.raw_broker(backlog)?);
        raw_db.push(bench.raw_claim_and_mark(backlog)?);
        one.push(bench.drain(backlog, KEYS, 1, false)?);
        behind.push(bench.drain_behind(DELAYED_AHEAD, backlog, KEYS, 1, false)?);
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
    table.rate(
        &format!("drain, 1 dispatcher, behind {DELAYED_AHEAD} delayed messages (msg/s)"),
        &behind,
    );
    table.ratio("  behind delayed / 1 dispatcher", &behind, &one);
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

/// Delayed messages ahead of the backlog in the drain that measures what they cost.
const DELAYED_AHEAD: usize = 10_000;

impl Bench {
    /// Drains a backlog of `n` messages over `keys` keys with `dispatchers` dispatchers
    /// (sending one message of a key at a time when `strict`); messages per second from
    /// their start until the last row is marked delivered (which happens only after the
    /// broker acknowledged it).
    pub(crate) fn drain(
        &self,
        n: usize,
        keys: usize,
        dispatchers: usize,
        strict: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        self.drain_behind(0, n, keys, dispatchers, strict)
    }

    /// As [`drain`](Bench::drain), with `delayed` messages due in an hour ahead of the
    /// backlog, which every claim passes over.
    pub(crate) fn drain_behind(
        &self,
        delayed: usize,
        n: usize,
        keys: usize,
        dispatchers: usize,
        strict: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.backlog_behind(delayed, n, keys, &topic)?;
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
    pub(crate) fn raw_broker(&self, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
        self.produce(&self.name("topic"), n, false)
    }

    /// Publishes `n` sample messages to `topic` straight through rdkafka, with the
    /// outbox's message id header when `with_ids`; messages per second.
    pub(crate) fn produce(
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

    /// A plain claim-and-mark loop over a backlog of `n` rows, 500 at a time, reading the
    /// same columns as the relay; no broker, no per-key rule.
    pub(crate) fn raw_claim_and_mark(&self, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
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

    /// Drains a backlog of `n` messages with one `outbox relay` process, serving metrics
    /// or not; messages per second from its start until no row is pending.
    pub(crate) fn relay_drain(
        &self,
        n: usize,
        metrics: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
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

    pub(crate) fn relay_peak_rss(
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

pub(crate) fn memory(
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
pub(crate) fn metrics_cost(
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

/// The columns the relay reads: id, message_id, topic, key, headers, payload, attempts.
pub(crate) type RawRow = (
    u64,
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<u8>,
    u32,
);
