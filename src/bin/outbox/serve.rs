//! `outbox relay --metrics-addr`: `/metrics` in Prometheus' text format, `/healthz` and
//! `/readyz`, served on a thread of its own by a small synchronous server.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use outbox::{HealthProbe, KafkaBroker, MySqlStore};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::render::redact;
use crate::Failure;

/// How long `/readyz` waits for the database and for the broker, each.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// Histogram buckets, in seconds: from a millisecond to five minutes.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// What the endpoints read: the dispatcher's health, and what `/readyz` asks.
pub struct Endpoints {
    pub prometheus: PrometheusHandle,
    pub health: HealthProbe,
    pub store: MySqlStore,
    /// The cluster's servers and properties, for a producer of its own that only asks
    /// for metadata: made at the first `/readyz`, so that a relay nobody probes runs no
    /// second client.
    pub brokers: String,
    pub properties: Vec<(String, String)>,
    pub broker: std::sync::Mutex<Option<KafkaBroker>>,
    /// Texts never to serve (the database URL's password).
    pub secrets: Vec<String>,
}

/// Installs the Prometheus recorder, with buckets for the histograms.
pub fn install_recorder() -> Result<PrometheusHandle, Failure> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?;
    Ok(builder.install_recorder()?)
}

/// `addr` as a socket address: a port alone means 127.0.0.1.
pub fn address(addr: &str) -> String {
    if addr.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    }
}

/// Binds `addr` and serves the endpoints on a thread of its own; returns the address
/// bound (its port, when `addr` asked for port 0).
pub fn serve(addr: &str, endpoints: Endpoints) -> Result<String, Failure> {
    let server = Server::http(address(addr))
        .map_err(|e| format!("--metrics-addr {addr}: cannot listen: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    std::thread::Builder::new()
        .name("outbox-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                answer(&endpoints, request);
            }
        })?;
    Ok(bound)
}

fn answer(endpoints: &Endpoints, request: Request) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let (status, body, prometheus) = match (request.method(), path.as_str()) {
        (Method::Get, "/metrics") => {
            endpoints.prometheus.run_upkeep();
            (200, endpoints.prometheus.render(), true)
        }
        (Method::Get, "/healthz") => healthz(&endpoints.health),
        (Method::Get, "/readyz") => readyz(endpoints),
        (Method::Get, _) => (
            404,
            "not found: /metrics, /healthz, /readyz\n".into(),
            false,
        ),
        _ => (405, "only GET\n".into(), false),
    };
    let content_type = if prometheus {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response =
        Response::from_string(redact(&body, &endpoints.secrets)).with_status_code(status);
    if let Ok(header) = Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(header);
    }
    if let Err(e) = request.respond(response) {
        log::debug!("answering an HTTP request: {e}");
    }
}

/// 200 while every worker thread runs; 503 naming those that do not.
fn healthz(probe: &HealthProbe) -> (u16, String, bool) {
    let health = probe.health();
    if health.is_alive() {
        return (200, "ok\n".into(), false);
    }
    let dead: Vec<String> = health
        .workers
        .iter()
        .filter(|w| !w.alive)
        .map(|w| w.worker.to_string())
        .collect();
    (503, format!("not running: {}\n", dead.join(", ")), false)
}

/// Asks the cluster for its metadata through the readiness producer, made on first use.
fn broker_reachable(endpoints: &Endpoints) -> outbox::Result<()> {
    let mut broker = endpoints
        .broker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if broker.is_none() {
        *broker = Some(KafkaBroker::with_properties(
            &endpoints.brokers,
            endpoints.properties.clone(),
        )?);
    }
    match broker.as_ref() {
        Some(broker) => broker.reachable(READY_TIMEOUT),
        None => Ok(()),
    }
}

/// 200 when the database and the broker answered within [`READY_TIMEOUT`]; 503 with the
/// reason otherwise.
fn readyz(endpoints: &Endpoints) -> (u16, String, bool) {
    let mut problems = Vec::new();
    let database = endpoints
        .store
        .pool()
        .try_get_conn(READY_TIMEOUT)
        .and_then(|mut conn| mysql::prelude::Queryable::query_drop(&mut conn, "SELECT 1"));
    if let Err(e) = database {
        problems.push(format!("database: {e}"));
    }
    if let Err(e) = broker_reachable(endpoints) {
        problems.push(format!("broker: {e}"));
    }
    if problems.is_empty() {
        (200, "ready\n".into(), false)
    } else {
        (503, format!("{}\n", problems.join("\n")), false)
    }
}
