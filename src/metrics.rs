//! What a dispatcher reports through the [`metrics`](https://docs.rs/metrics) facade, so
//! that the application's own recorder (a Prometheus exporter, say) picks it up. Without a
//! recorder installed, each report is a call that does nothing.
//!
//! Every metric carries the label `instance` (the dispatcher's instance id, without the
//! random suffix of its lease owner); those about messages also carry `topic`. Nothing
//! else is a label: never a key or a message id.
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `outbox_messages_published_total` | counter | messages the broker acknowledged |
//! | `outbox_publish_failures_total` | counter | failed attempts to publish a message |
//! | `outbox_messages_dead_total` | counter | messages declared dead (out of attempts) |
//! | `outbox_rows_claimed_total` | counter | rows claimed (leased) by the relay |
//! | `outbox_rows_handed_total` | counter | rows commits in the dispatcher's process handed over, taken without a claim |
//! | `outbox_rows_expired_total` | counter | rows whose lease the lock checker released |
//! | `outbox_rows_deleted_total` | counter | rows deleted by retention |
//! | `outbox_delivery_latency_seconds` | histogram | from a message's `created_on` to its acknowledgement, on the database's clock |
//! | `outbox_stage_seconds` | histogram | each relay stage of a batch, label `stage`: `claim` (or `take`, for rows handed over), `publish`, `mark` |
//! | `outbox_pending_messages` | gauge | pending messages in the table |
//! | `outbox_dead_messages` | gauge | dead messages in the table |
//! | `outbox_lag_seconds` | gauge | how late the oldest pending message is, on the database's clock: from its add, or from the time a delayed message was due; scheduled messages are not late |
//! | `outbox_scheduled_messages` | gauge | pending messages delayed to a time not come yet (in `outbox_pending_messages` too) |
//! | `outbox_leased_rows` | gauge | pending rows leased by any dispatcher (no `topic`) |
//! | `outbox_blocked_keys` | gauge | keys whose oldest dead message has pending messages after it: held back while the relays run with `dead_blocks_key` |
//! | `outbox_table_pending_messages` | gauge | pending messages of every topic (no `topic`); 0, not absent, on an empty table |
//! | `outbox_table_lag_seconds` | gauge | the largest `outbox_lag_seconds` of any topic (no `topic`); 0 when no message is due |
//!
//! An [`InboxConsumer`](crate::inbox::InboxConsumer) reports under the label `consumer`
//! (its name), and `topic`:
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `outbox_inbox_records_total` | counter | records settled, label `outcome`: `applied`, `duplicate` (skipped) or `dead` |
//! | `outbox_inbox_handler_failures_total` | counter | failed handler attempts (transient database errors not counted) |
//! | `outbox_inbox_batch_seconds` | histogram | applying one batch, from its first record to its commit (no `topic`) |
//! | `outbox_inbox_lag_seconds` | gauge | from the timestamp of the last record settled to its settling (for the outbox's records, from the message's `created_on`), on this host's clock |
//! | `outbox_inbox_ids_deleted_total` | counter | processed ids deleted by retention (no `topic`) |
//!
//! The gauges describe the table, not one dispatcher: a worker refreshes them every
//! [`DispatcherSettings::gauge_interval`](crate::DispatcherSettings::gauge_interval)
//! (off by default), from queries that read only pending and dead rows through indexes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::metrics::{counter, gauge, histogram, SharedString};

use crate::record::Record;
use crate::time::micros_since_epoch;

/// Messages the broker acknowledged.
pub const MESSAGES_PUBLISHED: &str = "outbox_messages_published_total";
/// Failed attempts to publish a message.
pub const PUBLISH_FAILURES: &str = "outbox_publish_failures_total";
/// Messages declared dead.
pub const MESSAGES_DEAD: &str = "outbox_messages_dead_total";
/// Rows claimed by the relay.
pub const ROWS_CLAIMED: &str = "outbox_rows_claimed_total";
/// Rows commits in the dispatcher's process handed over, taken without a claim.
pub const ROWS_HANDED: &str = "outbox_rows_handed_total";
/// Rows whose expired lease the lock checker released.
pub const ROWS_EXPIRED: &str = "outbox_rows_expired_total";
/// Rows deleted by retention.
pub const ROWS_DELETED: &str = "outbox_rows_deleted_total";
/// Rows the binlog relay's sweep published: left pending behind it, their event passed
/// over.
pub const ROWS_SWEPT: &str = "outbox_binlog_rows_swept_total";
/// Seconds from a message's `created_on` to its acknowledgement.
pub const DELIVERY_LATENCY: &str = "outbox_delivery_latency_seconds";
/// Seconds each relay stage of a batch took, by `stage`.
pub const STAGE_SECONDS: &str = "outbox_stage_seconds";
/// Pending messages in the table, by topic.
pub const PENDING_MESSAGES: &str = "outbox_pending_messages";
/// Dead messages in the table, by topic.
pub const DEAD_MESSAGES: &str = "outbox_dead_messages";
/// How late the oldest pending message that is due is, by topic.
pub const LAG_SECONDS: &str = "outbox_lag_seconds";
/// Pending messages delayed to a time not come yet, by topic.
pub const SCHEDULED_MESSAGES: &str = "outbox_scheduled_messages";
/// Pending rows leased by any dispatcher.
pub const LEASED_ROWS: &str = "outbox_leased_rows";
/// Keys whose oldest dead message has pending messages after it, by topic.
pub const BLOCKED_KEYS: &str = "outbox_blocked_keys";
/// Pending messages of every topic: set from the first read, even on an empty table,
/// when no topic has a gauge yet.
pub const TABLE_PENDING_MESSAGES: &str = "outbox_table_pending_messages";
/// How late the oldest pending message of any topic is; 0 when none is due.
pub const TABLE_LAG_SECONDS: &str = "outbox_table_lag_seconds";

/// Records an inbox consumer settled, by `outcome`.
pub const INBOX_RECORDS: &str = "outbox_inbox_records_total";
/// Failed handler attempts of an inbox consumer.
pub const INBOX_HANDLER_FAILURES: &str = "outbox_inbox_handler_failures_total";
/// Seconds an inbox consumer took to apply a batch.
pub const INBOX_BATCH_SECONDS: &str = "outbox_inbox_batch_seconds";
/// Seconds from the last settled record's timestamp to its settling, by topic.
pub const INBOX_LAG_SECONDS: &str = "outbox_inbox_lag_seconds";
/// Processed ids deleted by an inbox's retention.
pub const INBOX_IDS_DELETED: &str = "outbox_inbox_ids_deleted_total";

/// One inbox consumer's reports, under its `consumer` label.
#[derive(Clone)]
pub(crate) struct InboxMeter {
    consumer: SharedString,
}

impl InboxMeter {
    pub fn new(consumer: &str) -> InboxMeter {
        InboxMeter {
            consumer: SharedString::from(consumer.to_string()),
        }
    }

    /// A record settled: `applied`, `duplicate` or `dead`; its timestamp (milliseconds
    /// since 1970) sets the lag.
    pub fn settled(&self, topic: &str, outcome: &'static str, timestamp: Option<i64>) {
        let topic = SharedString::from(topic.to_string());
        counter!(INBOX_RECORDS, "consumer" => self.consumer.clone(), "topic" => topic.clone(), "outcome" => outcome)
            .increment(1);
        if let Some(millis) = timestamp {
            let now = micros_since_epoch(SystemTime::now());
            let lag = (now - millis.saturating_mul(1_000)).max(0) as f64 / 1e6;
            gauge!(INBOX_LAG_SECONDS, "consumer" => self.consumer.clone(), "topic" => topic)
                .set(lag);
        }
    }

    /// A failed handler attempt on a record of `topic`.
    pub fn failed(&self, topic: &str) {
        counter!(INBOX_HANDLER_FAILURES, "consumer" => self.consumer.clone(), "topic" => topic.to_string())
            .increment(1);
    }

    /// How long a batch took to apply.
    pub fn batch(&self, took: Duration) {
        histogram!(INBOX_BATCH_SECONDS, "consumer" => self.consumer.clone())
            .record(took.as_secs_f64());
    }

    /// Processed ids deleted by retention.
    pub fn deleted(&self, ids: u64) {
        counter!(INBOX_IDS_DELETED, "consumer" => self.consumer.clone()).increment(ids);
    }
}

/// One dispatcher's reports: its `instance` label, and how far the database's clock is
/// ahead of this host's (learned by the gauge worker; 0 until then).
#[derive(Clone)]
pub(crate) struct Meter {
    instance: SharedString,
    clock_offset_micros: Arc<AtomicI64>,
}

impl Meter {
    /// The meter of the dispatcher whose lease owner is `owner` (`instance#suffix`).
    pub fn new(owner: &str) -> Meter {
        let instance = owner
            .rsplit_once('#')
            .map_or(owner, |(instance, _)| instance);
        Meter {
            instance: SharedString::from(instance.to_string()),
            clock_offset_micros: Arc::default(),
        }
    }

    fn labels(&self, topic: &str) -> [(&'static str, SharedString); 2] {
        [
            ("instance", self.instance.clone()),
            ("topic", SharedString::from(topic.to_string())),
        ]
    }

    /// Rows claimed, and how long the claim took.
    pub fn claimed(&self, rows: usize, took: Duration) {
        counter!(ROWS_CLAIMED, "instance" => self.instance.clone()).increment(rows as u64);
        self.stage("claim", took);
    }

    /// Rows handed over by commits and taken, and how long taking them took.
    pub fn handed(&self, rows: usize, took: Duration) {
        counter!(ROWS_HANDED, "instance" => self.instance.clone()).increment(rows as u64);
        self.stage("take", took);
    }

    /// How long a relay stage of a batch took.
    pub fn stage(&self, stage: &'static str, took: Duration) {
        histogram!(STAGE_SECONDS, "instance" => self.instance.clone(), "stage" => stage)
            .record(took.as_secs_f64());
    }

    /// A settled batch's outcomes: messages acknowledged at `acknowledged` (with their
    /// latency from `created_on`), failed attempts, and the messages declared dead.
    pub fn settled<'a>(
        &self,
        delivered: impl IntoIterator<Item = &'a Record>,
        acknowledged: SystemTime,
        failed: impl IntoIterator<Item = &'a Record>,
        dead: impl IntoIterator<Item = &'a Record>,
    ) {
        let on_database_clock = self.database_time(acknowledged);
        // One handle per topic for the batch: registering looks the series up.
        let mut published: HashMap<&str, (u64, ::metrics::Histogram)> = HashMap::new();
        for record in delivered {
            let topic = record.message.topic();
            let (count, latency) = published
                .entry(topic)
                .or_insert_with(|| (0, histogram!(DELIVERY_LATENCY, &self.labels(topic))));
            *count += 1;
            let age = on_database_clock
                .duration_since(record.created)
                .unwrap_or_default();
            latency.record(age.as_secs_f64());
        }
        for (topic, (n, _)) in published {
            counter!(MESSAGES_PUBLISHED, &self.labels(topic)).increment(n);
        }
        for (name, records) in [
            (PUBLISH_FAILURES, count_by_topic(failed)),
            (MESSAGES_DEAD, count_by_topic(dead)),
        ] {
            for (topic, n) in records {
                counter!(name, &self.labels(topic)).increment(n);
            }
        }
    }

    /// Rows whose expired lease the lock checker released.
    pub fn expired(&self, rows: u64) {
        counter!(ROWS_EXPIRED, "instance" => self.instance.clone()).increment(rows);
    }

    /// Rows deleted by retention.
    pub fn deleted(&self, rows: u64) {
        counter!(ROWS_DELETED, "instance" => self.instance.clone()).increment(rows);
    }

    /// Rows the binlog relay's sweep found left behind and published.
    pub fn swept(&self, rows: u64) {
        counter!(ROWS_SWEPT, "instance" => self.instance.clone()).increment(rows);
    }

    /// The table's backlog, as the gauges show it; topics that had gauges before and are
    /// no longer in `backlog` go to 0.
    pub fn backlog(&self, backlog: &Backlog, shown: &mut Vec<String>) {
        let mut topics: Vec<String> = backlog.topics.iter().map(|t| t.topic.clone()).collect();
        for gone in shown.iter().filter(|topic| !topics.contains(topic)) {
            let labels = self.labels(gone);
            gauge!(PENDING_MESSAGES, &labels).set(0.0);
            gauge!(DEAD_MESSAGES, &labels).set(0.0);
            gauge!(LAG_SECONDS, &labels).set(0.0);
            gauge!(SCHEDULED_MESSAGES, &labels).set(0.0);
            gauge!(BLOCKED_KEYS, &labels).set(0.0);
        }
        for topic in &backlog.topics {
            let labels = self.labels(&topic.topic);
            gauge!(PENDING_MESSAGES, &labels).set(topic.pending as f64);
            gauge!(DEAD_MESSAGES, &labels).set(topic.dead as f64);
            gauge!(LAG_SECONDS, &labels).set(topic.lag.map_or(0.0, |lag| lag.as_secs_f64()));
            gauge!(SCHEDULED_MESSAGES, &labels).set(topic.scheduled as f64);
            gauge!(BLOCKED_KEYS, &labels).set(topic.blocked_keys as f64);
        }
        gauge!(LEASED_ROWS, "instance" => self.instance.clone()).set(backlog.leased as f64);
        let pending: u64 = backlog.topics.iter().map(|topic| topic.pending).sum();
        let lag = backlog.topics.iter().filter_map(|topic| topic.lag).max();
        gauge!(TABLE_PENDING_MESSAGES, "instance" => self.instance.clone()).set(pending as f64);
        gauge!(TABLE_LAG_SECONDS, "instance" => self.instance.clone())
            .set(lag.map_or(0.0, |lag| lag.as_secs_f64()));
        topics.sort();
        *shown = topics;
        let offset = micros_since_epoch(backlog.database_now) - micros_since_epoch(backlog.read_at);
        self.clock_offset_micros.store(offset, Ordering::Relaxed);
    }

    /// `local`, a time of this host's clock, on the database's clock.
    fn database_time(&self, local: SystemTime) -> SystemTime {
        let offset = self.clock_offset_micros.load(Ordering::Relaxed);
        let shift = Duration::from_micros(offset.unsigned_abs());
        if offset >= 0 {
            local + shift
        } else {
            local.checked_sub(shift).unwrap_or(local)
        }
    }
}

fn count_by_topic<'a>(records: impl IntoIterator<Item = &'a Record>) -> HashMap<&'a str, u64> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for record in records {
        *counts.entry(record.message.topic()).or_default() += 1;
    }
    counts
}

/// What a [`Store`](crate::Store) reports of its table for the gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    /// By topic: only topics with pending or dead messages.
    pub topics: Vec<TopicBacklog>,
    /// Pending rows leased by any dispatcher.
    pub leased: u64,
    /// The database's clock when it was read.
    pub database_now: SystemTime,
    /// This host's clock at the middle of the read, to learn the offset between the two.
    pub read_at: SystemTime,
}

/// One topic's part of a [`Backlog`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicBacklog {
    /// The topic.
    pub topic: String,
    /// Pending messages.
    pub pending: u64,
    /// Dead messages.
    pub dead: u64,
    /// How late the oldest pending message that is due is, on the database's clock;
    /// `None` when no message is due.
    pub lag: Option<Duration>,
    /// Pending messages delayed to a time not come yet (counted in `pending` too).
    pub scheduled: u64,
    /// Keys whose oldest dead message has pending messages after it (held back while
    /// the relays run with `dead_blocks_key`).
    pub blocked_keys: u64,
}
