//! The web example under concurrent clients, with and without its event writes.

use super::*;

/// Requests a client of the web service sends in one run.
pub(crate) const WEB_REQUESTS: usize = 500;

impl Bench {
    /// Peak resident memory, in MiB, of an `outbox relay` process draining a backlog of
    /// `n` messages with `batch_size`.
    /// One run of the web service: its requests per second, and (with `events`) the
    /// milliseconds from each 2xx answer to its event's arrival at a consumer.
    pub(crate) fn web_run(
        &self,
        events: bool,
    ) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
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
}

/// Concurrent clients of the web service.
pub(crate) const WEB_CLIENTS: usize = 8;

/// The web service example under load, with its events and without.
pub(crate) fn web(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
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
