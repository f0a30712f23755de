//! The metrics a dispatcher reports through the `metrics` facade, and its health, checked
//! against the table after a drain with failures, on the real MariaDB and broker.

mod common;

use std::time::{Duration, Instant};

use common::recorder::kept;
use common::*;
use mysql::prelude::Queryable;
use outbox::{DispatcherSettings, Message, Worker};

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
    let committed = Instant::now();
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

    // Every message at least a second old before the relay starts: its latency, from
    // its add to Kafka's acknowledgement, is at least that.
    assert!(wait_for(Duration::from_secs(10), || table
        .count("created_on > UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
        == 0));
    let settings = DispatcherSettings {
        max_attempts: Some(2),
        gauge_interval: Some(Duration::from_millis(100)),
        ..fast_settings()
    };
    let started = Instant::now();
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
    let ran = started.elapsed().as_secs_f64();
    let since_added = committed.elapsed().as_secs_f64();
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

    // A latency per message published: from its add (at least a second before the relay
    // started) to its acknowledgement (before the relay stopped).
    let latencies = kept.values(&format!("outbox_delivery_latency_seconds{{{labels}}}"));
    assert_eq!(latencies.len() as u64, published);
    assert!(
        latencies.iter().all(|s| (1.0..=since_added).contains(s)),
        "within 1 s and {since_added} s: {latencies:?}"
    );
    // A time per batch and stage, each within the relay's run. Claims run one after the
    // other on the relay's thread, marks on the settler's: each stage's times add up to
    // less than the run. (A batch's publish time counts its wait behind the batch before,
    // so those overlap.) Each batch published is marked once.
    let stage = |stage: &str| {
        kept.values(&format!(
            "outbox_stage_seconds{{instance={instance},stage={stage}}}"
        ))
    };
    let (claims, publishes, marks) = (stage("claim"), stage("publish"), stage("mark"));
    for (name, times) in [
        ("claim", &claims),
        ("publish", &publishes),
        ("mark", &marks),
    ] {
        assert!(
            !times.is_empty() && times.iter().all(|s| *s > 0.0 && *s <= ran),
            "{name}: {times:?} in a run of {ran} s"
        );
    }
    assert!(claims.iter().sum::<f64>() <= ran, "{claims:?}");
    assert!(marks.iter().sum::<f64>() <= ran, "{marks:?}");
    assert_eq!(publishes.len(), marks.len());
    assert!(claims.len() >= marks.len());

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
fn the_table_wide_gauges_are_set_at_start_not_after_the_first_gauge_interval() {
    let kept = kept();
    let settings = DispatcherSettings {
        // Far longer than the test: only the read at start can set the gauges.
        gauge_interval: Some(Duration::from_secs(3600)),
        ..fast_settings()
    };

    // An empty table: no topic has a gauge, the table-wide ones read 0.
    let empty = TestTable::new("gauges_empty");
    let instance = unique("gauges_empty");
    let mut handle = empty.dispatch(broker(), settings.clone(), &instance);
    let pending = format!("outbox_table_pending_messages{{instance={instance}}}");
    let lag = format!("outbox_table_lag_seconds{{instance={instance}}}");
    assert!(
        wait_for(Duration::from_secs(10), || kept.gauge(&pending)
            == Some(0.0)
            && kept.gauge(&lag) == Some(0.0)),
        "pending {:?}, lag {:?}",
        kept.gauge(&pending),
        kept.gauge(&lag)
    );
    handle.stop().unwrap();

    // Rows of two topics backing off for an hour, two seconds old, one of them behind a
    // dead message of its key: the first read sums them, gives the oldest's age, and
    // counts the key held back.
    let table = TestTable::new("gauges_start");
    let (a, b) = (unique("gauges_a"), unique("gauges_b"));
    table.commit(&[
        Message::new(&a, "1"),
        Message::new(&a, "2"),
        Message::new(&a, "3"),
        Message::new(&b, "4"),
        Message::new(&b, "5"),
        Message::new(&a, "dead").with_key("kd"),
        Message::new(&a, "behind the dead").with_key("kd"),
    ]);
    table.exec(
        "UPDATE {t} SET available_on = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR, \
         number_of_attempts = 1",
    );
    // And one of b delayed by an hour: pending, scheduled, and not late.
    table.commit(&[Message::new(&b, "reminder").deliver_after(Duration::from_secs(3_600))]);
    table.exec("UPDATE {t} SET state = 2, processed_on = UTC_TIMESTAMP(6) WHERE payload = 'dead'");
    std::thread::sleep(Duration::from_secs(2));
    let instance = unique("gauges_start");
    let mut handle = table.dispatch(broker(), settings, &instance);
    let pending = format!("outbox_table_pending_messages{{instance={instance}}}");
    let lag = format!("outbox_table_lag_seconds{{instance={instance}}}");
    assert!(
        wait_for(Duration::from_secs(10), || kept.gauge(&pending)
            == Some(7.0)),
        "pending {:?}",
        kept.gauge(&pending)
    );
    let lag = kept.gauge(&lag).unwrap();
    assert!((2.0..60.0).contains(&lag), "lag {lag}");
    let by_topic = |name: &str, topic: &str| {
        kept.gauge(&format!("{name}{{instance={instance},topic={topic}}}"))
    };
    assert_eq!(by_topic("outbox_pending_messages", &a), Some(4.0));
    assert_eq!(by_topic("outbox_pending_messages", &b), Some(3.0));
    assert_eq!(by_topic("outbox_scheduled_messages", &b), Some(1.0));
    assert_eq!(by_topic("outbox_scheduled_messages", &a), Some(0.0));
    // One key of a held back by its dead message; none of b.
    assert_eq!(by_topic("outbox_blocked_keys", &a), Some(1.0));
    assert_eq!(by_topic("outbox_blocked_keys", &b), Some(0.0));
    handle.stop().unwrap();
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
    let added = Instant::now();
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
    // Every record's timestamp is its add's: a second old at least when the consumer
    // starts.
    assert!(wait_for(Duration::from_secs(10), || table
        .count("created_on > UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
        == 0));

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
    let started = Instant::now();
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
    let (ran, since_added) = (
        started.elapsed().as_secs_f64(),
        added.elapsed().as_secs_f64(),
    );
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
    // Batches one after the other on the consumer's thread, within its run.
    assert!(
        !batches.is_empty()
            && batches.iter().all(|s| *s > 0.0)
            && batches.iter().sum::<f64>() <= ran,
        "{batches:?} in a run of {ran} s"
    );
    // The last record's age when it was applied: at least the second it waited before
    // the consumer started, at most the time since it was added.
    let lag = kept
        .gauge(&format!(
            "outbox_inbox_lag_seconds{{consumer={consumer},topic={topic}}}"
        ))
        .expect("a lag for the topic");
    // (Record timestamps are whole milliseconds: a millisecond of slack.)
    assert!((1.0..=since_added + 0.001).contains(&lag), "{lag}");
    let t = inbox.table();
    table
        .conn()
        .query_drop(format!("DROP TABLE `{t}`, `{t}_dead`, `{t}_offsets`"))
        .unwrap();
}
