//! The binlog relay against the polling relay, each an `outbox relay` process.

use super::*;

/// The binlog relay against the polling relay, each an `outbox relay` process, on the
/// benchmark's MariaDB with the binary log on; the polling drain on the machine's server
/// too.
pub(crate) fn binlog(
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

impl Bench {
    /// Starts `outbox relay` on `table`, reading from `source`; closing its standard
    /// input stops it.
    pub(crate) fn relay_process(
        &self,
        table: &str,
        source: Source,
    ) -> std::io::Result<std::process::Child> {
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

    pub(crate) fn stop_relay(mut child: std::process::Child) -> std::io::Result<()> {
        drop(child.stdin.take());
        child.wait().map(|_| ())
    }

    /// Waits until a binlog relay of `table` saved its first position: it follows the log.
    pub(crate) fn following(&self, table: &str) -> Result<(), Box<dyn std::error::Error>> {
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
    pub(crate) fn status_counters(
        conn: &mut mysql::Conn,
    ) -> Result<HashMap<String, f64>, mysql::Error> {
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
    pub(crate) fn source_drain(
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
    pub(crate) fn source_latency(
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
    pub(crate) fn idle_statements(
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

/// Where an `outbox relay` reads messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
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
pub(crate) struct Pinned {
    pub(crate) pids: Vec<u32>,
    pub(crate) all: String,
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
pub(crate) fn taskset(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// What the server did for a relay, from `SHOW GLOBAL STATUS`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ServerWork {
    pub(crate) statements: f64,
    pub(crate) rows_read: f64,
    pub(crate) rows_written: f64,
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
