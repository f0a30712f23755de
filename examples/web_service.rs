//! A synchronous web service on the outbox: `make web-service`, then `curl` it.
//!
//! A thread-per-request HTTP server (tiny_http, eight worker threads, no async runtime)
//! in front of MariaDB, with the dispatcher in the same process:
//!
//! - `POST /orders` with `{"customer": "ada", "total_cents": 1999}` writes the order and
//!   its `OrderCreated` event in one transaction and answers 201 `{"id": n}`;
//! - `POST /orders/{id}/pay` marks it paid with an `OrderPaid` event: 200, or 404 for an
//!   unknown order, 409 for one already paid; a malformed body or path is 400. Nothing is
//!   written unless the answer is 2xx;
//! - `GET /health` is the dispatcher's health (200 while every worker runs, else 503);
//!   `GET /metrics` its Prometheus metrics.
//!
//! Events go to the topic `WEB_TOPIC` (default `web.orders`), keyed by order id, through
//! an `OutboxTransaction` whose commit wakes the dispatcher. SIGTERM or SIGINT stops the
//! server from accepting, lets the requests in progress finish, stops the dispatcher (it
//! settles what it publishes) and exits 0. It prints its address on standard output.
//!
//! `OUTBOX_DATABASE_URL`, `OUTBOX_KAFKA_BROKERS`, `OUTBOX_TABLE` (default `outbox`),
//! `WEB_ORDERS_TABLE` (default `web_orders`) and `WEB_ADDR` (default `127.0.0.1:8080`)
//! point it elsewhere. `WEB_WITHOUT_EVENTS=1` takes the event writes out of the handlers
//! (the baseline `make bench` compares with); `WEB_WAKE=0` leaves the dispatcher to its
//! polls instead of waking it at every commit; `WEB_HAND_OFF=1` has each commit hand its
//! events to the dispatcher, which publishes them with no claim (the hand-off); `OUTBOX_LINGER_MS` sets its `linger`.
//! `WEB_RELAY=external` runs no dispatcher: the
//! service only writes, and an `outbox relay` process of its own relays the table, as a
//! service that keeps its threads for its requests would deploy. Needs the `cli` feature
//! (tiny_http, the Prometheus exporter).

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use mysql::prelude::Queryable;
use mysql::{Pool, TxOpts};
use outbox::{
    Dispatcher, DispatcherSettings, HealthProbe, KafkaBroker, Message, MySqlStore, Outbox,
};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

const WORKERS: usize = 8;

/// What every request thread shares.
struct App {
    outbox: Outbox,
    orders: String,
    topic: String,
    /// False to take the event writes out (a benchmark's baseline).
    events: bool,
    /// The dispatcher's health; `None` when the relay runs in a process of its own.
    health: Option<HealthProbe>,
    metrics: PrometheusHandle,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signals = block_stop_signals()?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let pool = Pool::new(env("OUTBOX_DATABASE_URL", "mysql://root@127.0.0.1:3306/test").as_str())?;
    let orders = env("WEB_ORDERS_TABLE", "web_orders");
    pool.get_conn()?.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS `{orders}` (
           id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
           customer VARCHAR(100) NOT NULL,
           total_cents BIGINT NOT NULL,
           status VARCHAR(20) NOT NULL)"
    ))?;
    let store = MySqlStore::with_table(pool.clone(), &env("OUTBOX_TABLE", "outbox"))?;
    store.migrate()?;
    let broker = KafkaBroker::new(&env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9092"))?;
    let mut settings = DispatcherSettings {
        gauge_interval: Some(Duration::from_secs(15)),
        ..Default::default()
    };
    if let Ok(ms) = env("OUTBOX_LINGER_MS", "").parse() {
        settings.linger = Duration::from_millis(ms);
    }
    settings.hand_off = env("WEB_HAND_OFF", "0") == "1";
    let mut handle = if env("WEB_RELAY", "in-process") == "external" {
        None
    } else {
        Some(Dispatcher::new(store.clone(), broker, settings, "web-service")?.start()?)
    };
    let app = Arc::new(App {
        outbox: match &handle {
            Some(handle) if env("WEB_WAKE", "1") == "1" => {
                Outbox::new(&store).with_waker(handle.waker())
            }
            _ => Outbox::new(&store),
        },
        orders,
        topic: env("WEB_TOPIC", "web.orders"),
        events: env("WEB_WITHOUT_EVENTS", "0") != "1",
        health: handle.as_ref().map(|handle| handle.health_probe()),
        metrics,
    });

    let server =
        Arc::new(Server::http(env("WEB_ADDR", "127.0.0.1:8080")).map_err(|e| e.to_string())?);
    println!("listening on http://{}", server.server_addr());
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (server, app) = (server.clone(), app.clone());
            std::thread::spawn(move || {
                // Until the server is unblocked at shutdown.
                while let Ok(request) = server.recv() {
                    answer(&app, request);
                }
            })
        })
        .collect();

    wait_for_stop(signals);
    for _ in 0..WORKERS {
        server.unblock();
    }
    for worker in workers {
        let _ = worker.join();
    }
    if let Some(handle) = &mut handle {
        handle.stop()?;
    }
    Ok(())
}

/// Routes a request and answers it; a handler's database error is a 500.
fn answer(app: &App, mut request: Request) {
    let mut body = String::new();
    let read = std::io::Read::read_to_string(request.as_reader(), &mut body);
    let path: Vec<&str> = request.url().trim_matches('/').split('/').collect();
    let (status, reply) = match (request.method(), path.as_slice(), read) {
        (_, _, Err(_)) => (400, json!({"error": "the body is not UTF-8"})),
        (Method::Post, ["orders"], _) => create(app, &body),
        (Method::Post, ["orders", id, "pay"], _) => match id.parse::<u64>() {
            Ok(id) => pay(app, id),
            Err(_) => (400, json!({"error": "an order id is a number"})),
        },
        (Method::Get, ["health"], _) => health(app),
        (Method::Get, ["metrics"], _) => {
            app.metrics.run_upkeep();
            let response = Response::from_string(app.metrics.render());
            let _ = request.respond(response);
            return;
        }
        _ => (404, json!({"error": "no such route"})),
    };
    let mut response = Response::from_string(reply.to_string()).with_status_code(status);
    if let Ok(header) = Header::from_bytes("Content-Type", "application/json") {
        response = response.with_header(header);
    }
    let _ = request.respond(response);
}

/// `POST /orders`: the order and its `OrderCreated` event, in one transaction.
fn create(app: &App, body: &str) -> (u16, Value) {
    let order: Value = match serde_json::from_str(body) {
        Ok(order) => order,
        Err(_) => return (400, json!({"error": "the body is not JSON"})),
    };
    let (Some(customer), Some(total)) = (order["customer"].as_str(), order["total_cents"].as_i64())
    else {
        return (
            400,
            json!({"error": "customer (text) and total_cents (a number) are needed"}),
        );
    };
    if customer.is_empty() || customer.len() > 100 || total < 0 {
        return (
            400,
            json!({"error": "customer is 1 to 100 bytes, total_cents not negative"}),
        );
    }
    let written = (|| -> outbox::Result<u64> {
        let mut tx = app.outbox.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            format!(
                "INSERT INTO `{}` (customer, total_cents, status) VALUES (?, ?, 'created')",
                app.orders
            ),
            (customer, total),
        )?;
        let id = tx.last_insert_id().unwrap_or_default();
        let event =
            json!({"type": "OrderCreated", "id": id, "customer": customer, "total_cents": total});
        if app.events {
            tx.add(&event_message(app, id, "OrderCreated", &event))?;
        }
        tx.commit()?;
        Ok(id)
    })();
    match written {
        Ok(id) => (201, json!({ "id": id })),
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

/// `POST /orders/{id}/pay`: paid, with its `OrderPaid` event; 404 unknown, 409 already paid.
fn pay(app: &App, id: u64) -> (u16, Value) {
    let written = (|| -> outbox::Result<(u16, Value)> {
        let mut tx = app.outbox.start_transaction(TxOpts::default())?;
        let status: Option<String> = tx.exec_first(
            format!(
                "SELECT status FROM `{}` WHERE id = ? FOR UPDATE",
                app.orders
            ),
            (id,),
        )?;
        match status.as_deref() {
            None => return Ok((404, json!({"error": "no such order"}))),
            Some("paid") => return Ok((409, json!({"error": "already paid"}))),
            Some(_) => {}
        }
        tx.exec_drop(
            format!("UPDATE `{}` SET status = 'paid' WHERE id = ?", app.orders),
            (id,),
        )?;
        let event = json!({"type": "OrderPaid", "id": id});
        if app.events {
            tx.add(&event_message(app, id, "OrderPaid", &event))?;
        }
        tx.commit()?;
        Ok((200, json!({ "id": id, "status": "paid" })))
    })();
    // An early return drops the transaction: it rolls back, nothing written.
    written.unwrap_or_else(|e| (500, json!({ "error": e.to_string() })))
}

fn event_message(app: &App, id: u64, kind: &str, event: &Value) -> Message {
    Message::new(&app.topic, event.to_string())
        .with_key(id.to_string())
        .with_header("event-type", kind)
}

/// `GET /health`: each worker of the dispatcher, 503 unless all run.
fn health(app: &App) -> (u16, Value) {
    let Some(probe) = &app.health else {
        return (200, json!({ "alive": true, "relay": "external" }));
    };
    let health = probe.health();
    let workers: Vec<Value> = health
        .workers
        .iter()
        .map(|w| json!({"worker": w.worker.to_string(), "alive": w.alive}))
        .collect();
    let status = if health.is_alive() { 200 } else { 503 };
    (
        status,
        json!({ "alive": health.is_alive(), "workers": workers }),
    )
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started after it.
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only
    // reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            code => Err(std::io::Error::from_raw_os_error(code)),
        }
    }
}

/// Waits for SIGTERM or SIGINT.
fn wait_for_stop(signals: libc::sigset_t) {
    let mut signal = 0;
    // SAFETY: `signals` is a valid set and `signal` a valid place for the answer.
    unsafe { libc::sigwait(&signals, &mut signal) };
}
