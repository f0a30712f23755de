//! The metrics a dispatcher reports through the `metrics` facade, and its health, checked
//! against the table after a drain with failures, on the real MariaDB and broker.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use mysql::prelude::Queryable;
use outbox::{DispatcherSettings, Message, Worker};

/// A recorder that keeps every metric in memory: the test reads what the dispatcher
/// reported, as an exporter would.
#[derive(Default)]
struct Kept {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Values>>>,
}

#[derive(Default)]
struct Values(Mutex<Vec<f64>>);

impl HistogramFn for Values {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// `name{label=value,...}` with the labels in name order.
fn series(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Kept {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(series(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.gauges.lock().unwrap();
        Gauge::from_arc(gauges.entry(series(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(series(key)).or_default().clone())
    }
}

/// The process's recorder, installed once.
fn kept() -> &'static Kept {
    static KEPT: OnceLock<&'static Kept> = OnceLock::new();
    KEPT.get_or_init(|| {
        let kept: &'static Kept = Box::leak(Box::default());
        metrics::set_global_recorder(Forward(kept)).expect("the only recorder");
        kept
    })
}

struct Forward(&'static Kept);

impl Recorder for Forward {
    fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_counter(k, u, d)
    }
    fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_gauge(k, u, d)
    }
    fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_histogram(k, u, d)
    }
    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, m)
    }
    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, m)
    }
    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, m)
    }
}

impl Kept {
    fn counter(&self, series: &str) -> u64 {
        let counters = self.counters.lock().unwrap();
        counters
            .get(series)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn gauge(&self, series: &str) -> Option<f64> {
        let gauges = self.gauges.lock().unwrap();
        gauges
            .get(series)
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)))
    }

    fn values(&self, series: &str) -> Vec<f64> {
        let histograms = self.histograms.lock().unwrap();
        histograms
            .get(series)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }
}

#[test]
fn counters_histograms_and_gauges_agree_with_the_table_after_a_drain_with_failures() {
    let kept = kept();
    let table = TestTable::new("metrics");
    let topic = unique("metrics");
    let instance = unique("metrics_relay");
    let mut messages: Vec<Message> = (0..30)
        .map(|i| Message::new(&topic, format!("m{i}")).with_key(format!("k{}", i % 10)))
        .collect();
    messages.extend(
        (0..3).map(|i| Message::new(&topic, vec![b'x'; 20_000]).with_key(format!("big{i}"))),
    );
    table.commit(&messages);
    // Five rows under a lease an hour old, of a dispatcher that is gone.
    table.commit(
        &(0..5)
            .map(|i| Message::new(&topic, format!("stale{i}")))
            .collect::<Vec<_>>(),
    );
    table.exec(
        "UPDATE {t} SET locked_by = 4294967297, locked_on = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR \
         WHERE payload LIKE 'stale%'",
    );

    let settings = DispatcherSettings {
        max_attempts: Some(2),
        gauge_interval: Some(Duration::from_millis(100)),
        ..fast_settings()
    };
    let mut handle = table.dispatch(small_message_broker(), settings, &instance);
    assert!(wait_for(Duration::from_secs(60), || table
        .count("state = 1")
        == 35
        && table.count("state = 2") == 3));
    let labels = format!("instance={instance},topic={topic}");
    // The gauges follow the table: nothing pending, no lag, three dead.
    assert!(
        wait_for(Duration::from_secs(10), || {
            kept.gauge(&format!("outbox_pending_messages{{{labels}}}")) == Some(0.0)
                && kept.gauge(&format!("outbox_lag_seconds{{{labels}}}")) == Some(0.0)
        }),
        "pending {:?}, lag {:?}",
        kept.gauge(&format!("outbox_pending_messages{{{labels}}}")),
        kept.gauge(&format!("outbox_lag_seconds{{{labels}}}"))
    );
    assert_eq!(
        kept.gauge(&format!("outbox_dead_messages{{{labels}}}")),
        Some(3.0)
    );
    assert_eq!(
        kept.gauge(&format!("outbox_leased_rows{{instance={instance}}}")),
        Some(0.0)
    );

    let health = handle.health();
    assert!(health.is_alive(), "{health:?}");
    for worker in [
        Worker::Relay,
        Worker::Publisher,
        Worker::Settler,
        Worker::LockChecker,
        Worker::Cleaner,
        Worker::Gauges,
    ] {
        let found = health.workers.iter().find(|w| w.worker == worker);
        assert!(
            found.is_some_and(|w| w.alive && w.last_success.is_some()),
            "{worker}: {health:?}"
        );
    }
    assert!(
        health
            .last_error
            .as_ref()
            .is_some_and(|(_, e)| e.contains("MessageSizeTooLarge")),
        "{health:?}"
    );
    handle.stop().unwrap();
    assert!(!handle.health().is_alive());

    // The counters against the table.
    let published = kept.counter(&format!("outbox_messages_published_total{{{labels}}}"));
    assert_eq!(published, table.count("state = 1"));
    let dead = kept.counter(&format!("outbox_messages_dead_total{{{labels}}}"));
    assert_eq!(dead, table.count("state = 2"));
    let attempts: u64 = table
        .conn()
        .query_first::<u64, _>(format!(
            "SELECT CAST(SUM(number_of_attempts) AS UNSIGNED) FROM `{}` WHERE state = 2",
            table.name
        ))
        .unwrap()
        .unwrap();
    let failures = kept.counter(&format!("outbox_publish_failures_total{{{labels}}}"));
    assert_eq!((failures, attempts), (6, 6));
    let claimed = kept.counter(&format!("outbox_rows_claimed_total{{instance={instance}}}"));
    assert!(
        claimed >= 38 + 3,
        "every row at least once, the dead ones twice: {claimed}"
    );
    assert_eq!(
        kept.counter(&format!("outbox_rows_expired_total{{instance={instance}}}")),
        5
    );

    // A latency per message published, between 0 and the drain's length.
    let latencies = kept.values(&format!("outbox_delivery_latency_seconds{{{labels}}}"));
    assert_eq!(latencies.len() as u64, published);
    assert!(
        latencies.iter().all(|s| (0.0..60.0).contains(s)),
        "{latencies:?}"
    );
    for stage in ["claim", "publish", "mark"] {
        let times = kept.values(&format!(
            "outbox_stage_seconds{{instance={instance},stage={stage}}}"
        ));
        assert!(
            !times.is_empty() && times.iter().all(|s| *s >= 0.0),
            "{stage}: {times:?}"
        );
    }

    // Retention's deletions are counted too.
    let cleaner = unique("metrics_cleaner");
    let retention = DispatcherSettings {
        retention: Duration::from_millis(1),
        ..fast_settings()
    };
    let handle = table.dispatch(broker(), retention, &cleaner);
    assert!(wait_for(Duration::from_secs(10), || table
        .count("state = 1")
        == 0));
    drop(handle);
    assert_eq!(
        kept.counter(&format!("outbox_rows_deleted_total{{instance={cleaner}}}")),
        35
    );
}

#[test]
fn an_inbox_consumer_counts_what_it_applied_skipped_and_buried() {
    use outbox::inbox::{Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxSettings};

    let kept = kept();
    let table = TestTable::new("metrics_inbox_src");
    let topic = unique("metrics_inbox").replace('_', ".");
    let mut messages: Vec<Message> = (0..20)
        .map(|i| Message::new(&topic, format!("m{i}")).with_key(format!("k{}", i % 4)))
        .collect();
    messages.push(Message::new(&topic, "poison"));
    table.commit(&messages);
    let mut relay = table.dispatch(broker(), fast_settings(), "metrics-inbox");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 21));
    // Five of them published a second time, same message ids.
    table.exec("UPDATE {t} SET state = 0 ORDER BY id LIMIT 5");
    relay.wake();
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 21));
    relay.stop().unwrap();

    let inbox = Inbox::with_table(table.pool.clone(), &unique("metrics_inbox")).unwrap();
    inbox.migrate().unwrap();
    let consumer = unique("metrics_consumer");
    let settings = InboxSettings {
        max_attempts: 2,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..Default::default()
    };
    let handler = |_: &mut mysql::Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
        if d.payload() == b"poison" {
            return Err("cannot parse".into());
        }
        Ok(())
    };
    let mut handle = InboxConsumer::new(
        inbox.clone(),
        &consumer,
        &brokers(),
        Assignment::Topics(vec![topic.clone()]),
        settings,
    )
    .unwrap()
    .start(handler)
    .unwrap();
    let records = |outcome: &str| {
        kept.counter(&format!(
            "outbox_inbox_records_total{{consumer={consumer},outcome={outcome},topic={topic}}}"
        ))
    };
    assert!(
        wait_for(Duration::from_secs(60), || records("applied")
            + records("duplicate")
            + records("dead")
            == 26),
        "{} applied, {} duplicates, {} dead; errors: {:?}",
        records("applied"),
        records("duplicate"),
        records("dead"),
        handle.errors().try_iter().collect::<Vec<_>>()
    );
    handle.stop().unwrap();
    assert_eq!(
        (records("applied"), records("duplicate"), records("dead")),
        (20, 5, 1)
    );
    assert_eq!(
        kept.counter(&format!(
            "outbox_inbox_handler_failures_total{{consumer={consumer},topic={topic}}}"
        )),
        2
    );
    let batches = kept.values(&format!(
        "outbox_inbox_batch_seconds{{consumer={consumer}}}"
    ));
    assert!(!batches.is_empty() && batches.iter().all(|s| *s >= 0.0 && *s < 60.0));
    let lag = kept
        .gauge(&format!(
            "outbox_inbox_lag_seconds{{consumer={consumer},topic={topic}}}"
        ))
        .expect("a lag for the topic");
    assert!((0.0..600.0).contains(&lag), "{lag}");
    let t = inbox.table();
    table
        .conn()
        .query_drop(format!("DROP TABLE `{t}`, `{t}_dead`, `{t}_offsets`"))
        .unwrap();
}
