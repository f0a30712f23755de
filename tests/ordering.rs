//! Per-key order across many dispatchers, failures and retries; fencing; partitioning.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{
    Broker, DispatcherSettings, Error, KafkaBroker, Message, MySqlStore, Outbox, Record, Store,
};

/// The real broker, with a random share of sends failed before they reach it.
struct FlakyBroker {
    inner: KafkaBroker,
    rng: Rng,
    percent: u64,
    failed: Arc<AtomicUsize>,
}

impl Broker for FlakyBroker {
    /// Fails a random share of records before sending them, and, as the `Broker`
    /// contract asks, also fails the later records of a key whose record failed.
    fn publish(&mut self, records: &[Record]) -> Vec<outbox::Result<()>> {
        let mut failed_keys = HashSet::new();
        let fail: Vec<bool> = records
            .iter()
            .map(|r| {
                let key = r.message.key().map(|k| (r.message.topic(), k));
                let fail = key.is_some_and(|k| failed_keys.contains(&k))
                    || self.rng.below(100) < self.percent;
                if fail {
                    failed_keys.extend(key);
                }
                fail
            })
            .collect();
        let passed: Vec<Record> = records
            .iter()
            .zip(&fail)
            .filter(|(_, &f)| !f)
            .map(|(r, _)| r.clone())
            .collect();
        let mut outcomes = self.inner.publish(&passed).into_iter();
        fail.iter()
            .map(|&f| {
                if f {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    Err(Error::Broker("injected failure".into()))
                } else {
                    outcomes
                        .next()
                        .unwrap_or_else(|| Err(Error::Broker("missing outcome".into())))
                }
            })
            .collect()
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}

#[test]
fn per_key_commit_order_holds_with_concurrent_writers_dispatchers_and_failures() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Warn)
        .try_init();
    const KEYS: usize = 200;
    const WRITERS: u64 = 4;
    const PER_WRITER: usize = 5_000;
    let table = TestTable::new("order_stress");
    let topic = unique("order_stress");
    let aggregates = Arc::new(Aggregates::new(&table.pool, KEYS));
    let outbox = Outbox::new(&table.store);

    // Four dispatchers, each failing 5% of its sends, running while the writers write.
    let failed = Arc::new(AtomicUsize::new(0));
    let settings = DispatcherSettings {
        batch_size: 100,
        ..fast_settings()
    };
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let broker = FlakyBroker {
                inner: broker(),
                rng: Rng::new(7 + i),
                percent: 5,
                failed: failed.clone(),
            };
            table.dispatch(broker, settings.clone(), &format!("d{i}"))
        })
        .collect();

    // Four writers: small transactions of 1 to 3 events on a random aggregate, one in ten
    // rolled back. A transaction that hits a deadlock or lock wait timeout is retried.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (pool, outbox, topic, aggregates) = (
                table.pool.clone(),
                outbox.clone(),
                topic.clone(),
                aggregates.clone(),
            );
            thread::spawn(move || {
                let mut rng = Rng::new(1000 + w);
                let (mut committed, mut rolled_back, mut retries) = (0, Vec::new(), 0);
                while committed < PER_WRITER {
                    let key = format!("k{}", rng.below(KEYS as u64));
                    let n = (1 + rng.below(3) as u32).min((PER_WRITER - committed) as u32);
                    let commit = rng.below(10) != 0;
                    // Half the writers add on the transaction, half on the commit.
                    let written = if w % 2 == 0 {
                        aggregates.write(&pool, &outbox, &topic, &key, n, commit)
                    } else {
                        aggregates.write_on_commit(&outbox, &topic, &key, n, commit)
                    };
                    match written {
                        Ok(ids) if commit => committed += ids.len(),
                        Ok(ids) => rolled_back.extend(ids),
                        Err(e) if e.is_retryable() => retries += 1,
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
                (rolled_back, retries)
            })
        })
        .collect();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let (ids, _retries) = writer.join().unwrap();
        rolled_back.extend(ids);
    }
    let total = WRITERS as usize * PER_WRITER;
    assert!(!rolled_back.is_empty());

    let got = consume(
        &topic,
        total,
        Duration::from_secs(240),
        Duration::from_secs(2),
    );
    let counts = id_counts(&got);
    assert_eq!(got.len(), total, "every committed message, once");
    assert_eq!(counts.len(), total, "no duplicates");
    assert!(
        counts.keys().all(|id| !rolled_back.contains(id)),
        "nothing rolled back was published"
    );
    assert_commit_order(
        &versions_read(&got),
        &aggregates.versions(&table.pool),
        false,
    );
    assert!(failed.load(Ordering::Relaxed) > 0, "failures were injected");
    assert!(
        handles.iter().any(|h| h.errors().try_recv().is_ok()),
        "and reported"
    );
    drop(handles);
    aggregates.drop_table(&table.pool);
}

/// A message larger than the producer's `message.max.bytes`: librdkafka refuses it on
/// every attempt.
fn poison_broker() -> KafkaBroker {
    let mut properties = test_properties();
    properties.push(("message.max.bytes".into(), "10000".into()));
    KafkaBroker::with_properties(&brokers(), properties).unwrap()
}

/// Adds, in one transaction: key `poisoned` with a good message, the poison message and
/// two more good ones; five good messages on each of keys `a`..`e`; five without key.
/// Returns their message ids in that order.
fn add_poisoned_backlog(table: &TestTable, topic: &str) -> Vec<String> {
    let mut messages = vec![
        Message::new(topic, "poisoned:1").with_key("poisoned"),
        Message::new(topic, vec![b'x'; 20_000]).with_key("poisoned"),
        Message::new(topic, "poisoned:3").with_key("poisoned"),
        Message::new(topic, "poisoned:4").with_key("poisoned"),
    ];
    for key in ["a", "b", "c", "d", "e"] {
        messages.extend((1..=5).map(|v| Message::new(topic, format!("{key}:{v}")).with_key(key)));
    }
    messages.extend((1..=5).map(|v| Message::new(topic, format!("none:{v}"))));
    table.commit(&messages)
}

fn payloads(records: &[Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

#[test]
fn poison_message_holds_back_only_its_own_key() {
    let table = TestTable::new("poison");
    let topic = unique("poison");
    add_poisoned_backlog(&table, &topic);
    let handle = table.dispatch(poison_broker(), fast_settings(), "poison");

    // Everything but the poison message and the two behind it: 1 + 25 + 5.
    let got = consume(&topic, 31, Duration::from_secs(30), Duration::from_secs(1));
    let read = payloads(&got);
    assert_eq!(got.len(), 31, "{read:?}");
    assert!(read.contains(&"poisoned:1".to_string()));
    assert!(
        !read.iter().any(|p| p == "poisoned:3" || p == "poisoned:4"),
        "{read:?}"
    );
    assert!(wait_for(Duration::from_secs(30), || table
        .count("LENGTH(payload) = 20000 AND number_of_attempts >= 3")
        == 1));
    assert_eq!(
        table.count(
            "payload IN ('poisoned:3', 'poisoned:4') AND state = 0 AND number_of_attempts = 0"
        ),
        2,
        "the key's later messages wait, never tried"
    );
    drop(handle);
}

#[test]
fn dead_message_releases_its_key_by_default() {
    let table = TestTable::new("dead_release");
    let topic = unique("dead_release");
    add_poisoned_backlog(&table, &topic);
    let settings = DispatcherSettings {
        max_attempts: Some(2),
        ..fast_settings()
    };
    let handle = table.dispatch(poison_broker(), settings, "dead_release");
    let got = consume(&topic, 33, Duration::from_secs(30), Duration::from_secs(1));
    let poisoned: Vec<String> = payloads(&got)
        .into_iter()
        .filter(|p| p.starts_with("poisoned"))
        .collect();
    assert_eq!(
        poisoned,
        vec!["poisoned:1", "poisoned:3", "poisoned:4"],
        "in order, with a gap"
    );
    assert_eq!(table.count("state = 2 AND LENGTH(payload) = 20000"), 1);
    drop(handle);
}

#[test]
fn dead_message_holds_its_key_when_configured_until_replayed() {
    let table = TestTable::new("dead_block");
    let topic = unique("dead_block");
    let ids = add_poisoned_backlog(&table, &topic);
    let settings = DispatcherSettings {
        max_attempts: Some(2),
        dead_blocks_key: true,
        ..fast_settings()
    };
    let handle = table.dispatch(poison_broker(), settings.clone(), "dead_block");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 1));
    let got = consume(&topic, 31, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(got.len(), 31, "everything else arrived");
    assert_eq!(
        table.count("payload IN ('poisoned:3', 'poisoned:4') AND state = 0"),
        2
    );
    drop(handle);

    // An operator replays the dead message with the README's statement, to a dispatcher
    // whose broker takes it: it goes out, and then the two it held back, in key order.
    let replay = format!(
        "UPDATE `{}` SET state = 0, number_of_attempts = 0, available_on = UTC_TIMESTAMP(6), \
         processed_on = '1970-01-01' WHERE message_id = UNHEX(REPLACE(?, '-', ''))",
        table.name
    );
    table.conn().exec_drop(replay, (&ids[1],)).unwrap();
    let handle = table.dispatch(broker(), settings, "dead_block_replay");
    let got = consume(&topic, 34, Duration::from_secs(30), Duration::from_secs(1));
    let poisoned: Vec<String> = got
        .iter()
        .filter(|r| r.key.as_deref() == Some("poisoned"))
        .map(|r| r.message_id())
        .collect();
    assert_eq!(poisoned, ids[..4], "the key's four messages, in order");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 34));
    drop(handle);
}

#[test]
fn later_messages_of_a_key_wait_while_another_dispatcher_holds_an_earlier_one() {
    let table = TestTable::new("held");
    let outbox = Outbox::new(&table.store);
    let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
    let batch = [
        Message::new("t", "k:1").with_key("k"),
        Message::new("t", "k:2").with_key("k"),
        Message::new("t", "j:1").with_key("j"),
    ];
    outbox.add_all(&mut tx, &batch).unwrap();
    tx.commit().unwrap();

    let store = &table.store;
    let a = store.claim("A#1", 1, false).unwrap();
    assert_eq!(
        a.records
            .iter()
            .map(|r| r.message.payload())
            .collect::<Vec<_>>(),
        vec![b"k:1"]
    );
    assert!(
        a.more,
        "the claim stopped at its limit with rows left to take"
    );
    let b = store.claim("B#1", 10, false).unwrap();
    assert_eq!(
        b.records
            .iter()
            .map(|r| r.message.payload())
            .collect::<Vec<_>>(),
        vec![b"j:1"],
        "k:2 is held back"
    );
    assert!(!b.more, "what is left waits behind a message in flight");
    assert_eq!(
        store.claim("B#1", 10, false).unwrap(),
        outbox::Claim::default(),
        "still held"
    );
    assert_eq!(
        store.mark_delivered(a.lease, &[a.records[0].id]).unwrap(),
        1
    );
    let b = store.claim("B#1", 10, false).unwrap().records;
    assert_eq!(
        b.iter().map(|r| r.message.payload()).collect::<Vec<_>>(),
        vec![b"k:2"],
        "released once k:1 is delivered"
    );
}

#[test]
fn a_stale_lease_holder_cannot_mark_fail_or_unlock_a_row_taken_over() {
    let table = TestTable::new("fencing");
    let batch: Vec<_> = (0..3).map(|i| Message::new("t", format!("m{i}"))).collect();
    table.commit(&batch);
    let store = &table.store;

    let stale = store.claim("stale#1", 10, false).unwrap();
    assert_eq!(stale.records.len(), 3);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(
        store.release_expired(Duration::ZERO).unwrap(),
        3,
        "the lock checker releases the leases"
    );
    let current = store.claim("current#1", 10, false).unwrap();
    let ids: Vec<u64> = stale.records.iter().map(|r| r.id).collect();
    assert_eq!(
        current.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids
    );
    assert_stale_lease_changes_nothing(&table, stale.lease, &ids, current.lease);
    assert_eq!(store.mark_delivered(current.lease, &ids).unwrap(), 3);
}

#[test]
fn an_earlier_claim_of_the_same_owner_cannot_touch_rows_a_later_claim_took() {
    let table = TestTable::new("fence_claim");
    let batch: Vec<_> = (0..3).map(|i| Message::new("t", format!("m{i}"))).collect();
    table.commit(&batch);
    let store = &table.store;

    // The same dispatcher claims, releases (its batch was not published), and claims the
    // same rows again; a late write of the first claim must not reach the second's rows.
    let first = store.claim("same#1", 10, false).unwrap();
    let ids: Vec<u64> = first.records.iter().map(|r| r.id).collect();
    assert_eq!(store.release(first.lease, &ids).unwrap(), 3);
    let second = store.claim("same#1", 10, false).unwrap();
    assert_eq!(second.records.len(), 3);
    assert_ne!(first.lease, second.lease, "every claim has its own lease");
    assert!(MySqlStore::leases_of("same#1").contains(&second.lease));
    assert_stale_lease_changes_nothing(&table, first.lease, &ids, second.lease);
}

/// Writes of `stale` to `ids` change nothing: the rows stay pending, untried and held
/// by `current`.
fn assert_stale_lease_changes_nothing(table: &TestTable, stale: u64, ids: &[u64], current: u64) {
    let store = &table.store;
    assert_eq!(store.mark_delivered(stale, ids).unwrap(), 0);
    let failures: Vec<_> = ids
        .iter()
        .map(|&id| outbox::Failure {
            id,
            error: "stale".into(),
            retry_in: Duration::ZERO,
            dead: true,
        })
        .collect();
    assert_eq!(store.mark_failed(stale, &failures).unwrap(), 0);
    assert_eq!(store.release(stale, ids).unwrap(), 0);
    assert_eq!(
        table.count(&format!(
            "state = 0 AND locked_by = {current} AND number_of_attempts = 0 AND error IS NULL"
        )),
        ids.len() as u64,
        "the rows are untouched and still leased to the current holder"
    );
}

/// Kafka's murmur2 (as in the JVM client's `Utils.murmur2`), written from the algorithm.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= (b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[test]
fn murmur2_matches_the_jvm_clients_values() {
    // Values from Kafka's own UtilsTest.
    let cases: [(&str, i32); 6] = [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ];
    for (key, hash) in cases {
        assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
    }
}

#[test]
fn each_key_lands_in_the_partition_a_jvm_producer_would_choose() {
    let table = TestTable::new("partitions");
    let topic = unique("partitions");
    // Text keys, and binary ones framed as a schema registry frames them: a 0x00 magic
    // byte and a 4-byte schema id before the serialized key.
    let mut keys: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("customer-{i}").into_bytes())
        .collect();
    keys.extend((0..20u8).map(|i| vec![0, 0, 0, 0, 42, 2, i, 0xff]));
    let batch: Vec<_> = keys
        .iter()
        .map(|k| Message::new(&topic, k.clone()).with_key(k.clone()))
        .collect();
    table.commit(&batch);
    let handle = table.dispatch(broker(), fast_settings(), "partitions");
    let got = consume(
        &topic,
        keys.len(),
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    assert_eq!(got.len(), keys.len());
    let partitions = partition_count(&topic);
    assert!(
        partitions > 1,
        "the test needs auto-created topics with several partitions (num.partitions)"
    );
    for record in &got {
        let key = record.key_bytes.as_deref().unwrap();
        assert_eq!(key, &record.payload[..], "the key read back byte for byte");
        let expected = (murmur2(key) & 0x7fff_ffff) % partitions as i32;
        assert_eq!(record.partition, expected, "{key:?}");
    }
    assert!(
        got.iter()
            .map(|r| r.partition)
            .collect::<HashSet<_>>()
            .len()
            > 1,
        "keys spread over partitions"
    );
    drop(handle);
}

#[test]
fn a_claim_takes_unbroken_runs_of_a_key_and_stops_at_a_gap() {
    let table = TestTable::new("runs");
    let batch: Vec<_> = ["k:1", "j:1", "k:2", "k:3", "j:2", "k:4"]
        .iter()
        .map(|p| Message::new("t", *p).with_key(&p[..1]))
        .collect();
    table.commit(&batch);
    // k:3 is backing off: the run of k must stop before it, and k:4 must not jump it.
    table.exec(
        "UPDATE {t} SET available_on = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR WHERE payload = 'k:3'",
    );

    let claim = table.store.claim("A#1", 100, false).unwrap();
    let claim_lease = claim.lease;
    assert!(!claim.more, "the rest waits behind k:3");
    let claimed = claim.records;
    let payloads: Vec<_> = claimed
        .iter()
        .map(|r| String::from_utf8_lossy(r.message.payload()).into_owned())
        .collect();
    assert_eq!(
        payloads,
        vec!["k:1", "j:1", "k:2", "j:2"],
        "in id order, whole runs up to the gap"
    );
    assert_eq!(
        table.store.claim("B#1", 100, false).unwrap(),
        outbox::Claim::default(),
        "nothing is left for another claimer"
    );

    let ids: Vec<u64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(
        table.store.release(claim_lease + 1, &ids).unwrap(),
        0,
        "only the claim's lease can release"
    );
    assert_eq!(table.store.release(claim_lease, &ids).unwrap(), 4);
    assert_eq!(table.count("locked_by = 0 AND number_of_attempts = 0"), 6);
}

#[test]
fn a_claim_looks_past_a_window_held_by_stale_leases_but_not_by_fresh_ones() {
    let table = TestTable::new("stale_head");
    // 1,000 rows of ten keys fill the claim's first window (limit 10 reads 1,000 rows),
    // all leased to a dispatcher; behind them, a key nobody holds.
    let held: Vec<Message> = (0..1_000)
        .map(|i| Message::new("t", format!("held:{i}")).with_key(format!("h{}", i % 10)))
        .collect();
    table.commit(&held);
    let free: Vec<Message> = (0..3)
        .map(|i| Message::new("t", format!("free:{i}")).with_key("free"))
        .collect();
    table.commit(&free);
    let holder = MySqlStore::leases_of("holder#1").start() + 1;
    table.exec(&format!(
        "UPDATE {{t}} SET locked_by = {holder}, locked_on = UTC_TIMESTAMP(6) WHERE payload LIKE 'held:%'"
    ));
    assert_eq!(
        table.store.claim("B#1", 10, false).unwrap(),
        outbox::Claim::default(),
        "a fresh lease's deliveries are about to free its keys: no digging"
    );
    // The holder died a minute ago: its leases are stale long before the lock checker
    // (max_lock_duration) releases them, and the rest of the table goes on meanwhile.
    table.exec("UPDATE {t} SET locked_on = UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE WHERE payload LIKE 'held:%'");
    let claimed: Vec<String> = table
        .store
        .claim("B#1", 10, false)
        .unwrap()
        .records
        .iter()
        .map(|r| String::from_utf8_lossy(r.message.payload()).into_owned())
        .collect();
    assert_eq!(
        claimed,
        vec!["free:0", "free:1", "free:2"],
        "past the first window, a key with no older row held takes its whole run"
    );
}
