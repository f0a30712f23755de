//! `examples/web_service.rs` as its users run it: a process taking concurrent requests,
//! its events read back from the real broker, stopped by SIGTERM.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value as Json;

const CLIENTS: usize = 8;
const REQUESTS: usize = 200;

/// The example built beside the tests (`cargo test --features cli` builds it).
fn example() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("examples").join("web_service");
    assert!(path.exists(), "{} (make test builds it)", path.display());
    path
}

fn request(address: &str, method: &str, path: &str, body: &str) -> (u16, Json) {
    let text = format!(
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = exchange(address, text.as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Json::Null))
}

/// One client: creates orders, pays some, and sends invalid requests on purpose. Returns
/// the events its 2xx answers promise, in the order it got them, and how many 4xx it got.
fn client(address: &str, seed: u64) -> (Vec<(u64, &'static str)>, usize) {
    let mut rng = Rng::new(seed);
    let mut events = Vec::new();
    let (mut unpaid, mut paid) = (Vec::new(), Vec::new());
    let mut refused = 0;
    for _ in 0..REQUESTS {
        let choice = rng.below(10);
        let (status, body) = match choice {
            0..=4 => request(
                address,
                "POST",
                "/orders",
                r#"{"customer":"c","total_cents":100}"#,
            ),
            5 | 6 if !unpaid.is_empty() => {
                let id: u64 = unpaid.swap_remove(rng.below(unpaid.len() as u64) as usize);
                let answer = request(address, "POST", &format!("/orders/{id}/pay"), "");
                assert_eq!(answer.0, 200, "{answer:?}");
                paid.push(id);
                events.push((id, "OrderPaid"));
                continue;
            }
            7 if !paid.is_empty() => {
                let id = paid[rng.below(paid.len() as u64) as usize];
                request(address, "POST", &format!("/orders/{id}/pay"), "")
            }
            8 => request(address, "POST", "/orders/999999999/pay", ""),
            _ => request(address, "POST", "/orders", r#"{"customer": 7}"#),
        };
        match status {
            201 => {
                let id = body["id"].as_u64().unwrap();
                unpaid.push(id);
                events.push((id, "OrderCreated"));
            }
            400 | 404 | 409 => refused += 1,
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    (events, refused)
}

/// The example, its relay `in-process` or `external`; in process, with the hand-off or
/// claiming.
fn start_with(
    table: &str,
    orders: &str,
    topic: &str,
    relay: &str,
    hand_off: bool,
) -> (Child, String) {
    let mut child = Command::new(example())
        .env("WEB_RELAY", relay)
        .env("WEB_HAND_OFF", if hand_off { "1" } else { "0" })
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TABLE", table)
        .env("WEB_ORDERS_TABLE", orders)
        .env("WEB_TOPIC", topic)
        .env("WEB_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("the service says where it listens: {line:?}"))
        .to_string();
    (child, address)
}

#[test]
fn concurrent_clients_get_every_event_once_in_order_and_none_for_refusals() {
    concurrent_clients(false);
}

#[test]
fn with_the_hand_off_too() {
    concurrent_clients(true);
}

/// Concurrent clients creating and paying orders, some requests refused: every event
/// arrives once, an order's in order, and nothing for a refusal.
fn concurrent_clients(hand_off: bool) {
    let table = TestTable::new("web");
    let orders = unique("web_orders");
    let topic = unique("web");
    let (mut service, address) = start_with(&table.name, &orders, &topic, "in-process", hand_off);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let address = address.clone();
            std::thread::spawn(move || client(&address, c as u64 + 1))
        })
        .collect();
    let mut expected = Vec::new();
    let mut refused = 0;
    for client in clients {
        let (events, n) = client.join().unwrap();
        expected.extend(events);
        refused += n;
    }
    assert!(refused > 100, "invalid requests were sent: {refused}");
    assert!(expected.iter().any(|(_, kind)| *kind == "OrderPaid"));

    let got = consume(
        &topic,
        expected.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let events: Vec<(u64, String)> = got
        .iter()
        .map(|record| {
            let event: Json = serde_json::from_slice(&record.payload).unwrap();
            assert_eq!(
                record.key.as_deref(),
                Some(event["id"].to_string().as_str())
            );
            (
                event["id"].as_u64().unwrap(),
                event["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let promised: HashSet<(u64, String)> = expected
        .iter()
        .map(|(id, kind)| (*id, kind.to_string()))
        .collect();
    assert_eq!(
        promised.len(),
        expected.len(),
        "each promised event is distinct"
    );
    assert_eq!(
        events.len(),
        expected.len(),
        "every event once, and nothing for a refusal"
    );
    assert_eq!(events.iter().cloned().collect::<HashSet<_>>(), promised);
    // Per order: created, then paid.
    let mut seen: HashMap<u64, Vec<&str>> = HashMap::new();
    for (id, kind) in &events {
        seen.entry(*id).or_default().push(kind);
    }
    for (id, kinds) in &seen {
        assert_eq!(kinds[0], "OrderCreated", "order {id}: {kinds:?}");
        assert!(kinds.len() <= 2, "order {id}: {kinds:?}");
    }
    // With the hand-off, the commits handed the events over: most went with no claim.
    let (_, metrics) = exchange(&address, b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n");
    let handed: f64 = metrics
        .lines()
        .find(|line| line.starts_with("outbox_rows_handed_total"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    if hand_off {
        assert!(
            handed >= expected.len() as f64 / 2.0,
            "{handed} of {} events handed over",
            expected.len()
        );
    } else {
        assert_eq!(handed, 0.0, "nothing is handed over unless asked");
    }

    // SIGTERM: a clean stop, nothing left pending.
    // SAFETY: kill with a live child's pid.
    unsafe { libc::kill(service.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut service, Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(table.count("state <> 1"), 0);
    let mut conn = table.conn();
    mysql::prelude::Queryable::query_drop(&mut conn, format!("DROP TABLE `{orders}`")).unwrap();
}

#[test]
fn with_the_relay_in_a_process_of_its_own_the_service_only_writes_and_the_relay_sends() {
    let table = TestTable::new("web_apart");
    let orders = unique("web_apart_orders");
    let topic = unique("web_apart");
    let (service, address) = start_with(&table.name, &orders, &topic, "external", false);
    let mut service = Reaped(service);
    let (status, health) = request(&address, "GET", "/health", "");
    assert_eq!((status, health["relay"].as_str()), (200, Some("external")));
    let mut created = HashSet::new();
    for _ in 0..20 {
        let (status, body) = request(
            &address,
            "POST",
            "/orders",
            r#"{"customer":"c","total_cents":1}"#,
        );
        assert_eq!(status, 201, "{body}");
        created.insert(body["id"].as_u64().unwrap());
    }
    // No dispatcher in the service: its events stay pending.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(table.count("state = 0"), 20);

    let (relay, _) = spawn_relay(&table.name, &unique("web_relay"), "", &[]);
    let mut relay = Reaped(relay);
    let got = consume(
        &topic,
        20,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let ids: HashSet<u64> = got
        .iter()
        .map(|record| {
            let event: Json = serde_json::from_slice(&record.payload).unwrap();
            assert_eq!(event["type"], "OrderCreated");
            event["id"].as_u64().unwrap()
        })
        .collect();
    assert_eq!((got.len(), ids), (20, created), "each order's event, once");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 20));

    drop(relay.0.stdin.take());
    assert!(wait_exit(&mut relay.0, Duration::from_secs(30)).is_some_and(|s| s.success()));
    // SAFETY: kill with a live child's pid.
    unsafe { libc::kill(service.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut service.0, Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let mut conn = table.conn();
    mysql::prelude::Queryable::query_drop(&mut conn, format!("DROP TABLE `{orders}`")).unwrap();
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}
