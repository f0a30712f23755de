//! `outbox relay --metrics-addr` scraped as Prometheus would: `/metrics` read by
//! Prometheus' own Python parser and checked against the table, `/healthz`, `/readyz`
//! through a broker's death, and bad requests.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tansu::Tansu;
use common::*;
use outbox::Message;
use serde_json::Value as Json;

/// Starts `outbox relay` serving metrics on a free port; returns it, its lease owner and
/// the address it serves at.
fn relay_with_metrics(mut command: Command) -> (Child, String, String) {
    command
        .env("OUTBOX_METRICS_ADDR", "0")
        .env("OUTBOX_GAUGE_INTERVAL_MS", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut owner = String::new();
    out.read_line(&mut owner).unwrap();
    let mut served = String::new();
    out.read_line(&mut served).unwrap();
    let address = served
        .trim()
        .strip_prefix("metrics http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the relay says where it serves: {served:?}"))
        .to_string();
    (child, owner.trim().to_string(), address)
}

fn get(address: &str, path: &str) -> (u16, String) {
    exchange(
        address,
        format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

/// The samples of a scrape, as Prometheus' Python client parses the text: each
/// `{"name", "labels", "value"}`. Panics if the text does not parse.
fn parse(text: &str) -> Vec<Json> {
    let site = concat!(env!("CARGO_MANIFEST_DIR"), "/.services/python");
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [dict(name=s.name, labels=s.labels, value=s.value)\n\
               for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))";
    let mut python = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", site)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "Prometheus' parser reads the scrape (make services installs it): {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Vec<Json>>(&output.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Json], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

#[test]
fn a_scrape_during_a_drain_with_failures_agrees_with_the_table() {
    let table = TestTable::new("relay_metrics");
    let topic = unique("relay_metrics");
    let mut messages: Vec<Message> = (0..40)
        .map(|i| Message::new(&topic, format!("m{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    messages.extend(
        (0..4).map(|i| Message::new(&topic, vec![b'x'; 20_000]).with_key(format!("big{i}"))),
    );
    table.commit(&messages);
    let mut command = relay_command(
        &table.name,
        "metrics_relay",
        ",message.max.bytes=10000",
        &[],
    );
    command.env("OUTBOX_MAX_ATTEMPTS", "2");
    let (mut relay, _, address) = relay_with_metrics(command);

    let labels = [("instance", "metrics_relay"), ("topic", topic.as_str())];
    let mut samples = Vec::new();
    let settled = wait_for(Duration::from_secs(60), || {
        let (status, text) = get(&address, "/metrics");
        assert_eq!(status, 200, "{text}");
        samples = parse(&text);
        table.count("state = 1") == 40
            && table.count("state = 2") == 4
            && sample(&samples, "outbox_messages_published_total", &labels) == Some(40.0)
            && sample(&samples, "outbox_pending_messages", &labels) == Some(0.0)
    });
    assert!(settled, "{samples:?}");
    assert_eq!(
        sample(&samples, "outbox_messages_dead_total", &labels),
        Some(4.0)
    );
    assert_eq!(
        sample(&samples, "outbox_publish_failures_total", &labels),
        Some(8.0)
    );
    assert_eq!(sample(&samples, "outbox_dead_messages", &labels), Some(4.0));
    assert_eq!(sample(&samples, "outbox_lag_seconds", &labels), Some(0.0));
    // One latency observation per published message, in histogram form.
    assert_eq!(
        sample(&samples, "outbox_delivery_latency_seconds_count", &labels),
        Some(40.0)
    );
    let within_a_minute = samples.iter().find(|s| {
        s["name"] == "outbox_delivery_latency_seconds_bucket"
            && s["labels"]["topic"] == topic.as_str()
            && s["labels"]["le"]
                .as_str()
                .and_then(|le| le.parse::<f64>().ok())
                == Some(60.0)
    });
    assert_eq!(
        within_a_minute.and_then(|s| s["value"].as_f64()),
        Some(40.0),
        "every latency under a minute: {samples:?}"
    );
    for stage in ["claim", "publish", "mark"] {
        let stage_labels = [("instance", "metrics_relay"), ("stage", stage)];
        assert!(
            sample(&samples, "outbox_stage_seconds_count", &stage_labels).is_some_and(|n| n >= 1.0),
            "{stage}"
        );
    }

    assert_eq!(get(&address, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(&address, "/readyz"), (200, "ready\n".into()));
    // Bad requests get a 4xx, and the relay goes on.
    let (status, _) = exchange(&address, b"GARBAGE\r\n\r\n");
    assert!((400..500).contains(&status), "{status}");
    let (status, _) = exchange(
        &address,
        b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(status, 405);
    assert_eq!(get(&address, "/nothing").0, 404);
    assert_eq!(get(&address, "/healthz").0, 200);
    table.commit(&[Message::new(&topic, "after")]);
    assert!(wait_for(Duration::from_secs(10), || table
        .count("state = 1")
        == 41));
    assert!(relay.try_wait().unwrap().is_none(), "the relay runs on");
    relay.kill().unwrap();
    relay.wait().unwrap();
}

#[test]
fn readyz_turns_503_while_the_broker_is_down_and_200_when_it_is_back() {
    let table = TestTable::new("relay_ready");
    let mut kafka = Tansu::on_free_port().unwrap();
    kafka.start().unwrap();
    let mut command = relay_command(&table.name, "ready_relay", "", &[]);
    command.env("OUTBOX_KAFKA_BROKERS", kafka.address());
    let (mut relay, _, address) = relay_with_metrics(command);
    assert!(wait_for(Duration::from_secs(20), || get(
        &address, "/readyz"
    )
    .0 == 200));

    kafka.kill();
    let mut body = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let (status, text) = get(&address, "/readyz");
            body = text;
            status == 503
        }),
        "503 within seconds of the broker's death"
    );
    assert!(body.starts_with("broker: "), "{body}");
    assert_eq!(
        get(&address, "/healthz").0,
        200,
        "the relay itself is alive"
    );

    kafka.start().unwrap();
    assert!(wait_for(Duration::from_secs(30), || get(
        &address, "/readyz"
    )
    .0 == 200));
    relay.kill().unwrap();
    relay.wait().unwrap();
}
