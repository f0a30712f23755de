//! The inbox against the real MariaDB and broker: each message's effect applied once,
//! however often it arrives, whatever fails.

mod common;

use common::private_db::PrivateDatabase;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::recorder::kept;
use common::*;
use mysql::prelude::Queryable;
use mysql::Transaction;
use outbox::inbox::{
    Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxHandle, InboxSettings, Recorded,
};
use outbox::rdkafka::message::{Header, OwnedHeaders};
use outbox::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use outbox::rdkafka::ClientConfig;
use outbox::{Error, Message, MESSAGE_ID_HEADER};

/// An inbox, a business table and a topic of the test's own; the tables are dropped at
/// the end.
struct Fixture {
    pool: mysql::Pool,
    inbox: Inbox,
    effects: String,
    topic: String,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        Fixture::on(&small_pool_url(), prefix)
    }

    /// A fixture on the database at `url`.
    fn on(url: &str, prefix: &str) -> Fixture {
        let pool = mysql::Pool::new(url).expect("MariaDB (make services)");
        let name = unique(prefix);
        let inbox = Inbox::with_table(pool.clone(), &format!("{name}_inbox")).unwrap();
        inbox.migrate().unwrap();
        let effects = format!("{name}_effects");
        pool.get_conn()
            .unwrap()
            .query_drop(format!(
                "CREATE TABLE `{effects}` (seq BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
                 message_id CHAR(36) NOT NULL, msg_key VARCHAR(100) NULL, payload TEXT NOT NULL)"
            ))
            .unwrap();
        Fixture {
            pool,
            inbox,
            effects,
            topic: unique(prefix).replace('_', "."),
        }
    }

    /// A handler that writes one row per message into the business table.
    fn writer(&self) -> impl FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO `{}` (message_id, msg_key, payload) VALUES (?, ?, ?)",
            self.effects
        );
        move |tx, delivery| {
            tx.exec_drop(
                &sql,
                (
                    delivery.message_id().to_string(),
                    delivery
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    String::from_utf8_lossy(delivery.payload()).into_owned(),
                ),
            )?;
            Ok(())
        }
    }

    fn consumer(&self, assignment: Assignment, settings: InboxSettings) -> InboxConsumer {
        InboxConsumer::new(
            self.inbox.clone(),
            "effects",
            &brokers(),
            assignment,
            settings,
        )
        .unwrap()
    }

    fn explicit(&self, settings: InboxSettings) -> InboxConsumer {
        self.consumer(Assignment::Topics(vec![self.topic.clone()]), settings)
    }

    /// (rows, distinct message ids) in the business table.
    fn effects(&self) -> (u64, u64) {
        self.pool
            .get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM `{}`",
                self.effects
            ))
            .unwrap()
            .unwrap()
    }

    /// Each key's payloads, in the order their effects were written.
    fn payloads_by_key(&self) -> HashMap<String, Vec<String>> {
        let rows: Vec<(Option<String>, String)> = self
            .pool
            .get_conn()
            .unwrap()
            .query(format!(
                "SELECT msg_key, payload FROM `{}` ORDER BY seq",
                self.effects
            ))
            .unwrap();
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for (key, payload) in rows {
            by_key
                .entry(key.unwrap_or_default())
                .or_default()
                .push(payload);
        }
        by_key
    }

    /// Records read so far by the explicitly assigned consumer, by its saved offsets.
    fn records_read(&self) -> i64 {
        self.pool
            .get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COALESCE(SUM(next_offset), 0) FROM `{}_offsets`",
                self.inbox.table()
            ))
            .unwrap()
            .unwrap_or(0)
    }

    fn count(&self, sql: &str) -> u64 {
        let sql = sql.replace("{inbox}", self.inbox.table());
        self.pool
            .get_conn()
            .unwrap()
            .query_first(sql)
            .unwrap()
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(mut conn) = self.pool.get_conn() {
            let t = self.inbox.table();
            let _ = conn.query_drop(format!(
                "DROP TABLE IF EXISTS `{t}`, `{t}_dead`, `{t}_offsets`, `{}`",
                self.effects
            ));
        }
    }
}

/// Publishes `(key, payload, message id)` records to `topic` in order, straight through a
/// producer, and waits for them to be acknowledged.
fn produce(topic: &str, records: &[(String, String, uuid::Uuid)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (key, payload, id) in records {
        let id = id.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: MESSAGE_ID_HEADER,
            value: Some(&id),
        });
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(payload.as_str())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// `n` records over `keys` keys, payload `key:i` with `i` counting per key.
fn keyed_records(n: usize, keys: usize) -> Vec<(String, String, uuid::Uuid)> {
    let mut counts = vec![0; keys];
    (0..n)
        .map(|i| {
            let k = i % keys;
            counts[k] += 1;
            let key = format!("key-{k}");
            (
                key.clone(),
                format!("{key}:{}", counts[k]),
                uuid::Uuid::now_v7(),
            )
        })
        .collect()
}

/// Checks that each key's payloads are `key:1`, `key:2`, ... in order.
fn assert_key_order(by_key: &HashMap<String, Vec<String>>) {
    for (key, payloads) in by_key {
        let numbers: Vec<u64> = payloads
            .iter()
            .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, expected, "key {key}: effects out of order");
    }
}

fn fast() -> InboxSettings {
    InboxSettings {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        replay_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn stop(mut handle: InboxHandle) {
    handle.stop().unwrap();
}

#[test]
fn messages_published_twice_apply_once_in_key_order() {
    let f = Fixture::new("inbox_dup");
    let records = keyed_records(400, 8);
    produce(&f.topic, &records);
    // The same messages again, as a relay that died before marking them would send them:
    // the first 150, same ids, same order.
    produce(&f.topic, &records[..150]);
    // And one twice in a row, which lands in one batch (one transaction).
    produce(&f.topic, &[records[399].clone(), records[399].clone()]);
    let handle = f.explicit(fast()).start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || f.records_read() == 552),
        "read {} of 552 records",
        f.records_read()
    );
    stop(handle);
    assert_eq!(f.effects(), (400, 400), "each message applied once");
    assert_eq!(f.count("SELECT COUNT(*) FROM `{inbox}`"), 400);
    assert_key_order(&f.payloads_by_key());
}

#[test]
fn the_outbox_feeds_the_inbox_and_a_replayed_outbox_changes_nothing() {
    let f = Fixture::new("inbox_outbox");
    let table = TestTable::new("inbox_outbox_src");
    let messages: Vec<Message> = keyed_records(200, 5)
        .into_iter()
        .map(|(key, payload, _)| Message::new(&f.topic, payload).with_key(key))
        .collect();
    table.commit(&messages);
    let mut relay = table.dispatch(broker(), fast_settings(), "inbox-src");
    let handle = f.explicit(fast()).start(f.writer()).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.effects().0 == 200));
    // Every delivered row published again, with the same message ids.
    table.exec("UPDATE {t} SET state = 0");
    relay.wake();
    assert!(
        wait_for(Duration::from_secs(60), || f.records_read() == 400),
        "read {} of 400",
        f.records_read()
    );
    relay.stop().unwrap();
    stop(handle);
    assert_eq!(f.effects(), (200, 200));
    assert_key_order(&f.payloads_by_key());
}

#[test]
fn a_database_killed_and_restarted_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let mut db = PrivateDatabase::new();
    db.start();
    let f = Fixture::on(&db.url(), "inbox_dbkill");
    produce(&f.topic, &keyed_records(3_000, 10));
    let one = InboxSettings {
        batch_size: 1,
        ..fast()
    };
    // Every call of the handler is counted: a record is applied only in a call.
    let calls = Arc::new(AtomicUsize::new(0));
    let mut write = f.writer();
    let counted = calls.clone();
    let handler = move |tx: &mut Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
        counted.fetch_add(1, Ordering::SeqCst);
        write(tx, d)
    };
    let handle = f.explicit(one).start(handler).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.effects().0 >= 500));
    db.kill();
    let calls_at_kill = calls.load(Ordering::SeqCst);
    assert!(
        calls_at_kill < 3_000,
        "killed mid-stream: {calls_at_kill} handler calls, fewer than the records"
    );
    db.start();
    assert!(
        wait_for(Duration::from_secs(120), || f.records_read() == 3_000),
        "read {} of 3000",
        f.records_read()
    );
    assert!(handle.is_running(), "a database outage is waited out");
    let errors: Vec<Error> = handle.errors().try_iter().collect();
    stop(handle);
    assert!(
        errors.iter().any(|e| matches!(e, Error::Database(_))),
        "the outage was reported: {errors:?}"
    );
    assert!(
        !errors.iter().any(|e| matches!(e, Error::Handler(_))),
        "and never counted as the handler's failure: {errors:?}"
    );
    assert_eq!(f.effects(), (3_000, 3_000));
    assert_eq!(f.count("SELECT COUNT(*) FROM `{inbox}_dead`"), 0);
    assert_key_order(&f.payloads_by_key());
}

#[test]
fn a_handler_that_fails_three_times_then_succeeds_applies_once() {
    let f = Fixture::new("inbox_retry");
    let records = keyed_records(20, 2);
    let flaky = records[5].2;
    produce(&f.topic, &records);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut write = f.writer();
    let counted = calls.clone();
    let handler = move |tx: &mut Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
        write(tx, d)?;
        if d.message_id() == flaky && counted.fetch_add(1, Ordering::SeqCst) < 3 {
            return Err("the payment service is down".into());
        }
        Ok(())
    };
    let handle = f.explicit(fast()).start(handler).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 20));
    let failures: Vec<Error> = handle.errors().try_iter().collect();
    stop(handle);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "three failures, then the success"
    );
    assert_eq!(
        f.effects(),
        (20, 20),
        "the failed attempts' writes were rolled back"
    );
    assert_eq!(
        failures
            .iter()
            .filter(|e| matches!(e, Error::Handler(_)))
            .count(),
        3,
        "{failures:?}"
    );
    assert_eq!(f.count("SELECT COUNT(*) FROM `{inbox}_dead`"), 0);
    assert_key_order(&f.payloads_by_key());
}

#[test]
fn a_poison_message_goes_dead_the_partition_moves_on_and_a_replay_applies_it() {
    let f = Fixture::new("inbox_poison");
    let mut records = keyed_records(30, 1);
    records[10].1 = "poison".into();
    let poison = records[10].2;
    produce(&f.topic, &records);
    let fixed = Arc::new(AtomicBool::new(false));
    let mut write = f.writer();
    let healed = fixed.clone();
    let handler = move |tx: &mut Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
        if d.payload() == b"poison" && !healed.load(Ordering::SeqCst) {
            return Err("cannot parse the order".into());
        }
        write(tx, d)
    };
    let settings = InboxSettings {
        max_attempts: 3,
        ..fast()
    };
    let handle = f.explicit(settings).start(handler).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 30));
    assert_eq!(
        f.effects(),
        (29, 29),
        "every message after the poison was applied"
    );
    let dead = f.inbox.dead(Some("effects"), 0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].delivery.message_id(), poison);
    assert_eq!(dead[0].delivery.payload(), b"poison");
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].error.contains("cannot parse"), "{}", dead[0].error);
    assert_eq!(
        dead[0].delivery.header(MESSAGE_ID_HEADER),
        Some(poison.to_string().as_bytes())
    );
    assert!(!f.inbox.is_processed("effects", poison).unwrap());

    // The person on call sees it with the `outbox` command, fixes the cause and replays it.
    let listed = outbox_inbox(&f, &["dead", "--consumer", "effects", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["records"][0]["id"], dead[0].id);
    assert_eq!(listed["records"][0]["message_id"], poison.to_string());
    assert_eq!(listed["records"][0]["payload"], "poison");
    assert_eq!(listed["records"][0]["attempts"], 3);
    fixed.store(true, Ordering::SeqCst);
    let replayed = outbox_inbox(&f, &["replay", &dead[0].id.to_string()]);
    assert!(replayed.starts_with("1 of 1"), "{replayed}");
    assert!(wait_for(Duration::from_secs(30), || f.effects().0 == 30));
    assert!(wait_for(Duration::from_secs(10), || f
        .inbox
        .dead(None, 0, 10)
        .unwrap()
        .is_empty()));
    stop(handle);
    assert_eq!(f.effects(), (30, 30));
    assert!(f.inbox.is_processed("effects", poison).unwrap());
}

/// `outbox inbox --inbox-table <the fixture's> <args>`: its standard output, after
/// checking that it succeeded.
fn outbox_inbox(f: &Fixture, args: &[&str]) -> String {
    let output = Command::new(outbox_command())
        .args(["inbox", "--inbox-table", f.inbox.table()])
        .args(args)
        .env("OUTBOX_DATABASE_URL", database_url())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_handler_that_panics_is_a_failed_attempt_not_a_dead_consumer() {
    let f = Fixture::new("inbox_panic");
    let records = keyed_records(5, 1);
    // The first and the last of the batch: what is left on either side of them is empty.
    let doomed = [records[0].2, records[4].2];
    produce(&f.topic, &records);
    let mut write = f.writer();
    let handler = move |tx: &mut Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
        if doomed.contains(&d.message_id()) {
            panic!("index out of bounds");
        }
        write(tx, d)
    };
    let settings = InboxSettings {
        max_attempts: 2,
        ..fast()
    };
    let handle = f.explicit(settings).start(handler).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 5));
    assert!(handle.is_running());
    stop(handle);
    assert_eq!(f.effects(), (3, 3));
    let dead = f.inbox.dead(None, 0, 10).unwrap();
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert!(
            d.error.contains("handler panicked: index out of bounds"),
            "{}",
            d.error
        );
    }
}

#[test]
fn a_record_without_a_message_id_is_known_by_its_place() {
    let f = Fixture::new("inbox_noid");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for i in 0..5 {
        let payload = format!("plain:{i}");
        producer
            .send(BaseRecord::<(), str>::to(&f.topic).payload(&payload))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    // A transaction per record, this time.
    let one = InboxSettings {
        batch_size: 1,
        ..fast()
    };
    let handle = f.explicit(one.clone()).start(f.writer()).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 5));
    stop(handle);
    assert_eq!(f.effects(), (5, 5));
    // Read again from the start (offsets lost): every record is a duplicate by its place.
    f.pool
        .get_conn()
        .unwrap()
        .query_drop(format!("DELETE FROM `{}_offsets`", f.inbox.table()))
        .unwrap();
    let handle = f.explicit(one).start(f.writer()).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 5));
    stop(handle);
    assert_eq!(f.effects(), (5, 5));
}

#[test]
fn record_in_the_callers_transaction_commits_or_rolls_back_with_it() {
    let f = Fixture::new("inbox_record");
    let delivery = Delivery::new(
        &f.topic,
        0,
        7,
        None,
        b"x".to_vec(),
        vec![(
            MESSAGE_ID_HEADER.into(),
            uuid::Uuid::now_v7().to_string().into_bytes(),
        )],
        None,
    );
    let mut tx = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(
        f.inbox.record(&mut tx, "c", &delivery).unwrap(),
        Recorded::New
    );
    tx.rollback().unwrap();
    assert!(!f.inbox.is_processed("c", delivery.message_id()).unwrap());
    let mut tx = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(
        f.inbox.record(&mut tx, "c", &delivery).unwrap(),
        Recorded::New
    );
    tx.commit().unwrap();
    let mut tx = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(
        f.inbox.record(&mut tx, "c", &delivery).unwrap(),
        Recorded::Duplicate
    );
    assert_eq!(
        f.inbox.record(&mut tx, "another", &delivery).unwrap(),
        Recorded::New,
        "consumers share the table, each with its own ids"
    );
    tx.commit().unwrap();
    assert!(matches!(
        f.inbox.record(
            &mut f.pool.start_transaction(Default::default()).unwrap(),
            "",
            &delivery
        ),
        Err(Error::Config(_))
    ));
}

#[test]
fn recording_a_batch_sees_ids_recorded_meanwhile_by_another_transaction() {
    let f = Fixture::new("inbox_race");
    let delivery = |i: i64| {
        let id = uuid::Uuid::now_v7().to_string().into_bytes();
        Delivery::new(
            &f.topic,
            0,
            i,
            None,
            vec![],
            vec![(MESSAGE_ID_HEADER.into(), id)],
            None,
        )
    };
    let (x, y) = (delivery(1), delivery(2));
    // Within one batch, a repeated id is a duplicate.
    let mut tx = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(f.inbox.record_all(&mut tx, "c", &[]).unwrap(), Some(vec![]));
    let repeated = [x.clone(), y.clone(), x.clone()];
    assert_eq!(
        f.inbox.record_all(&mut tx, "c", &repeated).unwrap(),
        Some(vec![Recorded::New, Recorded::New, Recorded::Duplicate])
    );
    tx.rollback().unwrap();

    // Another transaction holds `x`, uncommitted; the batch waits on it, then finds that
    // one of its ids was recorded meanwhile.
    let mut other = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(f.inbox.record(&mut other, "c", &x).unwrap(), Recorded::New);
    let (session_tx, session) = crossbeam_channel::bounded(1);
    let batch = {
        let (inbox, pool, x, y) = (f.inbox.clone(), f.pool.clone(), x.clone(), y.clone());
        std::thread::spawn(move || {
            let mut tx = pool.start_transaction(Default::default()).unwrap();
            let id: u64 = tx.query_first("SELECT CONNECTION_ID()").unwrap().unwrap();
            session_tx.send(id).unwrap();
            inbox.record_all(&mut tx, "c", &[x, y]).unwrap()
        })
    };
    // The batch's statement waits for `other`'s row lock before `other` commits: its
    // session runs a statement, a query or a prepared one. (MySQL fails to read its
    // process list while a statement's text holds binary ids; its performance schema
    // reads the same.)
    let session = session.recv_timeout(Duration::from_secs(10)).unwrap();
    let running = || -> u64 {
        let mut conn = f.pool.get_conn().unwrap();
        let listed = conn.exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE ID = ? AND COMMAND <> 'Sleep'",
            (session,),
        );
        let listed = listed.or_else(|_| {
            conn.exec_first(
                "SELECT COUNT(*) FROM performance_schema.threads \
                 WHERE PROCESSLIST_ID = ? AND PROCESSLIST_COMMAND <> 'Sleep'",
                (session,),
            )
        });
        listed.unwrap().unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(10), || running() == 1),
        "the batch waits for the other transaction"
    );
    assert!(!batch.is_finished());
    other.commit().unwrap();
    assert_eq!(
        batch.join().unwrap(),
        None,
        "one of the ids was taken meanwhile"
    );

    // Already committed before the batch: a duplicate, found by the first statement.
    let mut tx = f.pool.start_transaction(Default::default()).unwrap();
    assert_eq!(
        f.inbox
            .record_all(&mut tx, "c", &[x.clone(), y.clone()])
            .unwrap(),
        Some(vec![Recorded::Duplicate, Recorded::New])
    );
    tx.commit().unwrap();
    assert!(f.inbox.is_processed("c", y.message_id()).unwrap());
}

#[test]
fn processed_ids_past_retention_are_deleted() {
    let f = Fixture::new("inbox_retention");
    produce(&f.topic, &keyed_records(10, 2));
    let settings = InboxSettings {
        retention: Duration::from_secs(2),
        cleanup_interval: Duration::from_millis(200),
        cleanup_batch_size: 3,
        ..fast()
    };
    let handle = f.explicit(settings).start(f.writer()).unwrap();
    assert!(wait_for(Duration::from_secs(60), || f.records_read() == 10));
    assert_eq!(f.count("SELECT COUNT(*) FROM `{inbox}`"), 10);
    assert!(
        wait_for(Duration::from_secs(30), || f
            .count("SELECT COUNT(*) FROM `{inbox}`")
            == 0),
        "ids older than 2 s deleted in chunks of 3"
    );
    stop(handle);
    assert_eq!(f.effects(), (10, 10), "the effects stay");
}

#[test]
fn bad_settings_and_properties_are_refused() {
    let f = Fixture::new("inbox_bad");
    let topics = Assignment::Topics(vec![f.topic.clone()]);
    let refused = |result: outbox::Result<InboxConsumer>| {
        assert!(matches!(result, Err(Error::Config(_))), "{result:?}");
    };
    refused(InboxConsumer::new(
        f.inbox.clone(),
        "",
        &brokers(),
        topics.clone(),
        fast(),
    ));
    refused(InboxConsumer::new(
        f.inbox.clone(),
        "c",
        &brokers(),
        Assignment::Group(vec![]),
        fast(),
    ));
    refused(InboxConsumer::new(
        f.inbox.clone(),
        "c",
        &brokers(),
        topics.clone(),
        InboxSettings {
            max_attempts: 0,
            ..fast()
        },
    ));
    refused(InboxConsumer::with_properties(
        f.inbox.clone(),
        "c",
        &brokers(),
        topics.clone(),
        fast(),
        [("enable.auto.offset.store", "true")],
    ));
    refused(InboxConsumer::new(
        f.inbox.clone(),
        "c",
        "no-such-host.invalid:9092",
        topics.clone(),
        fast(),
    ));
    assert!(matches!(
        InboxConsumer::with_properties(
            f.inbox.clone(),
            "c",
            &brokers(),
            topics,
            fast(),
            [("sasl.password", "hunter2"), ("no.such.property", "1")],
        ),
        Err(Error::Kafka(e)) if !e.to_string().contains("hunter2")
    ));
    assert!(matches!(
        Inbox::with_table(f.pool.clone(), "bad-name"),
        Err(Error::Config(_))
    ));
}

/// The billing service of `examples/inbox_pipeline.rs`, as its own process.
fn billing(topic: &str, tables: &str) -> Child {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("examples").join("inbox_pipeline");
    assert!(path.exists(), "{} (make test builds it)", path.display());
    let mut child = Command::new(path)
        .arg("billing")
        .env("OUTBOX_DATABASE_URL", database_url())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("PIPELINE_TOPIC", topic)
        .env("PIPELINE_TABLES", tables)
        // A transaction per record: slow enough to be killed mid-stream.
        .env("PIPELINE_BATCH", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("billing consumes"), "{line:?}");
    child
}

#[test]
fn a_consumer_killed_mid_stream_applies_every_message_once_after_a_restart() {
    const ORDERS: u64 = 3_000;
    let tables = unique("inbox_kill");
    let topic = tables.replace('_', ".");
    let pool = mysql::Pool::new(small_pool_url().as_str()).unwrap();
    let invoices = format!("{tables}_invoices");
    let records: Vec<(String, String, uuid::Uuid)> = (1..=ORDERS)
        .map(|order| {
            let customer = format!("customer-{}", order % 7);
            let body =
                serde_json::json!({"order": order, "customer": customer, "total_cents": order});
            (customer, body.to_string(), uuid::Uuid::now_v7())
        })
        .collect();
    produce(&topic, &records);
    // Some of them published twice, as after a relay's crash.
    produce(&topic, &records[1_000..1_500]);

    let counts = || -> (u64, u64) {
        pool.get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM `{invoices}`"
            ))
            .ok()
            .flatten()
            .unwrap_or((0, 0))
    };
    let mut killed = 0;
    let mut child = billing(&topic, &tables);
    for target in [300, 1_200, 2_000] {
        assert!(
            wait_for(Duration::from_secs(60), || counts().0 >= target),
            "{:?} invoices, waiting for {target}",
            counts()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(counts().1 < ORDERS, "killed mid-stream: {:?}", counts());
        killed += 1;
        child = billing(&topic, &tables);
    }
    assert!(
        wait_for(Duration::from_secs(120), || counts().1 == ORDERS),
        "{:?} of {ORDERS}",
        counts()
    );
    // Let it read the duplicates at the end too.
    let read = || -> i64 {
        pool.get_conn()
            .unwrap()
            .query_first(format!(
                "SELECT COALESCE(SUM(next_offset), 0) FROM `{tables}_inbox_offsets`"
            ))
            .unwrap()
            .unwrap_or(0)
    };
    assert!(wait_for(Duration::from_secs(60), || read() == 3_500));
    drop(child.stdin.take());
    assert!(
        child.wait().unwrap().success(),
        "stops when its input closes"
    );
    assert_eq!(killed, 3);
    assert_eq!(counts(), (ORDERS, ORDERS), "each order billed once");
    // Per customer, invoices in the order the orders were published.
    let rows: Vec<(String, u64)> = pool
        .get_conn()
        .unwrap()
        .query(format!(
            "SELECT customer, order_id FROM `{invoices}` ORDER BY id"
        ))
        .unwrap();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (customer, order) in rows {
        let before = last.insert(customer.clone(), order).unwrap_or(0);
        assert!(order > before, "{customer}: order {order} after {before}");
    }
    let _ = pool.get_conn().unwrap().query_drop(format!(
        "DROP TABLE IF EXISTS `{invoices}`, `{tables}_inbox`, `{tables}_inbox_dead`, \
         `{tables}_inbox_offsets`"
    ));
}

/// The offsets the consumer group `group` committed on `topic`, by partition.
fn committed(group: &str, topic: &str) -> HashMap<i32, i64> {
    use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
    use outbox::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let partitions = partition_count(topic);
    assert!(partitions > 0, "{topic} has partitions");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        list.add_partition(topic, p);
    }
    let list = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("the group's committed offsets");
    list.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(n) => Some((e.partition(), n)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_consumer_group_commits_the_offsets_of_what_it_applied() {
    let f = Fixture::new("inbox_group");
    let records = keyed_records(100, 4);
    produce(&f.topic, &records);
    // A group of its own: group ids are the cluster's, shared by every test.
    let name = unique("inbox_group");
    let group = Assignment::Group(vec![f.topic.clone()]);
    let consumer = InboxConsumer::new(f.inbox.clone(), &name, &brokers(), group, fast()).unwrap();
    let handle = consumer.start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 100),
        "{:?} effects",
        f.effects()
    );
    stop(handle);
    assert_eq!(f.effects(), (100, 100));
    let total: i64 = committed(&name, &f.topic).values().sum();
    assert_eq!(
        total, 100,
        "every applied record's offset committed on stop"
    );
}

#[test]
fn a_member_joining_the_group_takes_over_from_what_was_committed_on_revoke() {
    let kept = kept();
    let f = Fixture::new("inbox_rebalance");
    produce(&f.topic, &keyed_records(200, 8));
    let name = unique("inbox_rebalance");
    // No periodic commit within the test: only the revoke (and the stop) commit.
    let member = || {
        InboxConsumer::with_properties(
            f.inbox.clone(),
            &name,
            &brokers(),
            Assignment::Group(vec![f.topic.clone()]),
            fast(),
            [("auto.commit.interval.ms", "600000")],
        )
        .unwrap()
    };
    let first = member().start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 200),
        "{:?}",
        f.effects()
    );
    assert_eq!(
        committed(&name, &f.topic).values().sum::<i64>(),
        0,
        "nothing committed before the revoke"
    );
    let second = member().start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || committed(&name, &f.topic)
            .values()
            .sum::<i64>()
            == 200),
        "the first member commits what it applied when its partitions are revoked: {:?}",
        committed(&name, &f.topic)
    );
    produce(&f.topic, &keyed_records(100, 8));
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 300),
        "{:?}",
        f.effects()
    );
    stop(second);
    stop(first);
    assert_eq!(f.effects(), (300, 300));
    assert_eq!(committed(&name, &f.topic).values().sum::<i64>(), 300);
    // The inbox would hide a re-read (each id is applied once); its metrics do not. The
    // new member read from what was committed at the revoke: no record came twice.
    let records = |outcome: &str| {
        kept.counter(&format!(
            "outbox_inbox_records_total{{consumer={name},outcome={outcome},topic={}}}",
            f.topic
        ))
    };
    assert_eq!((records("applied"), records("duplicate")), (300, 0));
}
