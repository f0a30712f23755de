//! The web example under concurrent clients, with and without its event writes.

use super::*;

/// Requests a client of the web service sends in one run.
pub(crate) const WEB_REQUESTS: usize = 500;

impl Bench {
    /// One run of the web service: its requests per second, and (with `events`) the
    /// milliseconds from each 2xx answer to its event's arrival at a consumer.
    pub(crate) fn web_run(
        &self,
        mode: WebMode,
    ) -> Result<(f64, Vec<f64>, CpuUse), Box<dyn std::error::Error>> {
        let events = mode != WebMode::Without;
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
            .env(
                "WEB_RELAY",
                match mode {
                    WebMode::External | WebMode::ExternalBinlog | WebMode::Unrelayed => "external",
                    _ => "in-process",
                },
            )
            .env(
                "WEB_HAND_OFF",
                if mode == WebMode::InProcessHanded {
                    "1"
                } else {
                    "0"
                },
            )
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
        // The service made the table; the relay of its own starts on it now.
        let relay = match mode {
            WebMode::External => Some(self.relay_process(&outbox_table, Source::Polling)?),
            WebMode::ExternalBinlog => {
                let relay = self.relay_process(&outbox_table, Source::Binlog)?;
                self.following(&outbox_table)?;
                Some(relay)
            }
            _ => None,
        };
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
        let consumer = (events && mode != WebMode::Unrelayed).then(|| {
            let (brokers, topic, group) = (self.brokers.clone(), topic.clone(), self.name("group"));
            std::thread::spawn(move || {
                arrivals(&brokers, &topic, &group, WEB_CLIENTS * WEB_REQUESTS)
            })
        });
        let mut others = vec![("service", service.id())];
        if let Some(relay) = &relay {
            others.push(("relay apart", relay.id()));
        }
        let processes = Processes::of(self);
        let cpu_before = processes.used(&others);
        let statements_before = statements(self);
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
        let mut cpu = spent(&cpu_before, &processes.used(&others));
        let statements_run = statements(self) - statements_before;
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
        if let Some(relay) = relay {
            Bench::stop_relay(relay)?;
        }
        // SAFETY: kill with the pid of a child still running.
        unsafe { libc::kill(service.id() as libc::pid_t, libc::SIGTERM) };
        service.wait()?;
        for name in [outbox_table, orders] {
            self.drop_table(&name)?;
        }
        cpu.push(("statements", statements_run));
        Ok((rate, latencies, cpu))
    }
}

/// Concurrent clients of the web service.
pub(crate) const WEB_CLIENTS: usize = 8;

/// How the web service runs in one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WebMode {
    /// Its event writes taken out: the baseline.
    Without,
    /// Events, relayed by the dispatcher in its process, woken at every commit.
    InProcess,
    /// Events, handed by each commit to the dispatcher in its process (`hand_off`).
    InProcessHanded,
    /// Events, relayed by an `outbox relay` process (polling) of their own.
    External,
    /// Events, relayed by an `outbox relay --source binlog` process of their own (on a
    /// server with the binary log on).
    ExternalBinlog,
    /// Events written and relayed by nobody: what the add alone costs, the most a
    /// service with a relay anywhere on the same machine could keep.
    Unrelayed,
}

/// The web service example under load: with its events relayed in its process, with them
/// relayed by a process of their own, and without them, in turn; then, on the bench's
/// server with the binary log on, with them relayed by a binlog relay and without them.
pub(crate) fn web(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("web service, {WEB_CLIENTS} clients x {WEB_REQUESTS} requests ({runs} runs)");
    let modes = [
        WebMode::InProcess,
        WebMode::InProcessHanded,
        WebMode::External,
        WebMode::Unrelayed,
        WebMode::Without,
    ];
    let mut rates: HashMap<WebMode, Vec<f64>> = HashMap::new();
    let mut latencies = Percentiles::default();
    let mut spending = Spending::default();
    for run in 0..runs {
        // A different mode first in each run.
        for i in 0..modes.len() {
            let mode = modes[(run + i) % modes.len()];
            let (rate, latencies_of_run, cpu) = bench.web_run(mode)?;
            rates.entry(mode).or_default().push(rate);
            latencies.record(mode, latencies_of_run);
            spending.record(mode, &cpu);
        }
    }
    // The binlog relay needs a server with the binary log on: the benchmark's own, where
    // the service runs without events too, for a ratio on the same server.
    let url = std::env::var("BENCH_BINLOG_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3307/test".into());
    let logged = Bench::at(url)?;
    let mut binlog_rates: HashMap<WebMode, Vec<f64>> = HashMap::new();
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [WebMode::ExternalBinlog, WebMode::Without]
        } else {
            [WebMode::Without, WebMode::ExternalBinlog]
        };
        for mode in order {
            let (rate, latencies_of_run, _) = logged.web_run(mode)?;
            binlog_rates.entry(mode).or_default().push(rate);
            latencies.record(mode, latencies_of_run);
        }
    }
    let without = &rates[&WebMode::Without];
    table.rate(
        "web service with events (req/s)",
        &rates[&WebMode::InProcess],
    );
    table.rate(
        "web service with events, relay in a process of its own (req/s)",
        &rates[&WebMode::External],
    );
    table.rate("web service, event writes taken out (req/s)", without);
    table.ratio("  with / without", &rates[&WebMode::InProcess], without);
    table.rate(
        "web service with events, handed over (req/s)",
        &rates[&WebMode::InProcessHanded],
    );
    table.ratio(
        "  handed over / without",
        &rates[&WebMode::InProcessHanded],
        without,
    );
    table.ratio(
        "  handed over / claimed",
        &rates[&WebMode::InProcessHanded],
        &rates[&WebMode::InProcess],
    );
    table.ratio(
        "  relay in its own process / without",
        &rates[&WebMode::External],
        without,
    );
    table.ratio(
        "  events written, relayed by nobody / without (the add alone)",
        &rates[&WebMode::Unrelayed],
        without,
    );
    let logged_without = &binlog_rates[&WebMode::Without];
    table.rate(
        "web service with events, binlog relay apart, binlog on (req/s)",
        &binlog_rates[&WebMode::ExternalBinlog],
    );
    table.rate(
        "web service, event writes taken out, binlog on (req/s)",
        logged_without,
    );
    table.ratio(
        "  binlog relay apart / without, binlog on",
        &binlog_rates[&WebMode::ExternalBinlog],
        logged_without,
    );
    for (mode, name) in [
        (WebMode::InProcess, "web service"),
        (WebMode::InProcessHanded, "web service, handed over"),
        (WebMode::External, "web service, relay apart"),
        (WebMode::ExternalBinlog, "web service, binlog relay apart"),
    ] {
        table.millis(
            &format!("{name}, 2xx answer to event consumed, p50 (ms)"),
            &latencies.p50[&mode],
        );
        table.millis(
            &format!("{name}, 2xx answer to event consumed, p99 (ms)"),
            &latencies.p99[&mode],
        );
    }
    spending.tabulate(table);
    Ok(())
}

/// CPU milliseconds per request by process and mode, and the database's statements per
/// request, one figure per run: where the cost of the event writes and of their relay
/// goes on this machine.
#[derive(Default)]
pub(crate) struct Spending(Vec<(WebMode, &'static str, Vec<f64>)>);

impl Spending {
    fn record(&mut self, mode: WebMode, cpu: &CpuUse) {
        let requests = (WEB_CLIENTS * WEB_REQUESTS) as f64;
        let (counts, seconds): (Vec<_>, Vec<_>) = cpu
            .iter()
            .copied()
            .partition(|(name, _)| *name == "statements");
        let total = seconds.iter().map(|(_, seconds)| seconds).sum::<f64>();
        let per_request = seconds
            .into_iter()
            .chain([("all", total)])
            .map(|(name, seconds)| (name, seconds * 1e3 / requests))
            .chain(counts.into_iter().map(|(name, n)| (name, n / requests)));
        for (process, per_request) in per_request {
            match self
                .0
                .iter_mut()
                .find(|(m, p, _)| *m == mode && *p == process)
            {
                Some((_, _, values)) => values.push(per_request),
                None => self.0.push((mode, process, vec![per_request])),
            }
        }
    }

    fn tabulate(&self, table: &mut Table) {
        for (mode, process, values) in &self.0 {
            let mode = match mode {
                WebMode::Without => "event writes taken out",
                WebMode::InProcess => "relay in process",
                WebMode::InProcessHanded => "relay in process, handed over",
                WebMode::External => "relay apart",
                WebMode::ExternalBinlog => "binlog relay apart",
                WebMode::Unrelayed => "relayed by nobody",
            };
            let label = if *process == "statements" {
                format!("web service, statements per request, {mode}")
            } else {
                format!("web service, CPU ms per request, {mode}: {process}")
            };
            table.add(&label, values, |v| format!("{v:.3}"));
        }
    }
}

/// The p50 and p99 of each run's answer-to-event latencies, by mode.
#[derive(Default)]
pub(crate) struct Percentiles {
    pub(crate) p50: HashMap<WebMode, Vec<f64>>,
    pub(crate) p99: HashMap<WebMode, Vec<f64>>,
}

impl Percentiles {
    /// Adds one run's figures; a run without events has none.
    fn record(&mut self, mode: WebMode, mut latencies: Vec<f64>) {
        if matches!(mode, WebMode::Without | WebMode::Unrelayed) {
            return;
        }
        latencies.sort_by(f64::total_cmp);
        self.p50
            .entry(mode)
            .or_default()
            .push(percentile(&latencies, 0.50));
        self.p99
            .entry(mode)
            .or_default()
            .push(percentile(&latencies, 0.99));
    }
}

/// Reads `topic` from its creation until `expected` events arrived (or two minutes
/// passed); when each arrived, by (order id, whether it is the payment).
pub(crate) fn arrivals(
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
        // A consumer that waits for records: the broker answers a fetch as soon as
        // there is one, or after 10 ms (librdkafka's default is 500 ms).
        .set("fetch.wait.max.ms", "10")
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
