//! Delayed messages with the polling relay: none published before its time, the later
//! messages of its key waiting for it and the other keys not; a time too far away refused
//! at the add with nothing written; a time already past taken as now.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use mysql::prelude::Queryable;
use outbox::{Error, Message, Outbox};

#[test]
fn a_delayed_message_goes_when_due_and_its_key_waits_for_it_not_the_others() {
    let table = TestTable::new("delayed");
    let topic = unique("delayed");
    let delay = Duration::from_secs(4);
    let added = Instant::now();
    table.commit(&[
        Message::new(&topic, "late")
            .with_key("k")
            .deliver_after(delay),
        Message::new(&topic, "late, no key").deliver_after(delay),
    ]);
    table.commit(&[
        Message::new(&topic, "after").with_key("k"),
        Message::new(&topic, "other").with_key("o"),
        Message::new(&topic, "no key"),
    ]);
    let handle = table.dispatch(broker(), fast_settings(), "delayed");
    assert!(wait_for(Duration::from_secs(10), || table
        .count("state = 1")
        == 2));
    std::thread::sleep(Duration::from_millis(500));
    assert!(added.elapsed() < delay, "in time to see the others wait");
    assert_eq!(
        table.count("state = 1 AND payload IN ('other', 'no key')"),
        2,
        "only the messages neither delayed nor behind a delayed one went"
    );
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 5));
    drop(handle);
    assert_eq!(
        table.count("payload LIKE 'late%' AND processed_on < created_on + INTERVAL 4 SECOND"),
        0,
        "no delayed message before its time"
    );
    let got = consume(&topic, 5, Duration::from_secs(30), Duration::from_secs(1));
    let of_k: Vec<String> = got
        .iter()
        .map(|c| String::from_utf8_lossy(&c.payload).into_owned())
        .filter(|p| p == "late" || p == "after")
        .collect();
    assert_eq!(of_k, ["late", "after"], "k's order holds");
    assert_eq!(got.len(), 5, "each once");
}

#[test]
fn a_delivery_time_too_far_away_is_refused_at_the_add_and_nothing_is_written() {
    let table = TestTable::new("delayed_bad");
    let outbox = Outbox::new(&table.store);
    let decade = Duration::from_secs(3_700 * 86_400);
    let mut tx = table
        .pool
        .start_transaction(mysql::TxOpts::default())
        .unwrap();
    for bad in [
        Message::new("t", "p").deliver_after(decade),
        Message::new("t", "p").deliver_after(Duration::MAX),
        Message::new("t", "p").deliver_at(SystemTime::now() + decade),
        Message::new("t", "p").deliver_at(SystemTime::UNIX_EPOCH),
    ] {
        match outbox.add_all(&mut tx, &[Message::new("t", "fine"), bad]) {
            Err(Error::InvalidMessage(reason)) => assert!(reason.contains("years"), "{reason}"),
            other => panic!("refused, not {other:?}"),
        }
    }
    // The transaction goes on: what it adds after is written.
    outbox.add(&mut tx, &Message::new("t", "fine")).unwrap();
    tx.commit().unwrap();
    assert_eq!(table.count("TRUE"), 1, "only the message added after");
}

#[test]
fn a_time_already_past_is_now_and_a_time_ahead_is_stored_on_the_databases_clock() {
    let table = TestTable::new("delayed_at");
    let in_an_hour = SystemTime::now() + Duration::from_secs(3_600);
    table.commit(&[
        Message::new("t", "past").deliver_at(SystemTime::now() - Duration::from_secs(3_600)),
        Message::new("t", "ahead").deliver_at(in_an_hour),
        Message::new("t", "after").deliver_after(Duration::from_secs(60)),
    ]);
    assert_eq!(
        table.count("payload = 'past' AND available_on = created_on"),
        1
    );
    let ahead: i64 = table
        .conn()
        .query_first(format!(
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', available_on) FROM `{}` \
             WHERE payload = 'ahead'",
            table.name
        ))
        .unwrap()
        .unwrap();
    let wanted = in_an_hour
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!((ahead - wanted).abs() <= 1, "{ahead} vs {wanted}");
    assert_eq!(
        table.count("payload = 'after' AND available_on = created_on + INTERVAL 60 SECOND"),
        1
    );
}

#[test]
fn a_delayed_message_is_late_from_its_time_not_its_add_and_not_late_before_it() {
    let table = TestTable::new("delayed_lag");
    let topic = unique("delayed_lag");
    let admin = outbox::admin::Admin::new(table.store.clone()).unwrap();
    table.commit(&[
        Message::new(&topic, "soon").deliver_after(Duration::from_secs(2)),
        Message::new(&topic, "later").deliver_after(Duration::from_secs(3_600)),
    ]);
    let counts = |status: &outbox::admin::Status| {
        status
            .topics
            .iter()
            .find(|t| t.topic == topic)
            .map(|t| t.counts.clone())
            .unwrap()
    };
    let before = counts(&admin.status().unwrap());
    assert_eq!((before.pending, before.scheduled), (2, 2));
    assert_eq!(before.lag, None, "nothing due, nothing late");
    std::thread::sleep(Duration::from_secs(4));
    let after = counts(&admin.status().unwrap());
    assert_eq!((after.pending, after.scheduled), (2, 1));
    let lag = after.lag.expect("one is due");
    assert!(
        lag >= Duration::from_secs(1) && lag < Duration::from_secs(3),
        "late by about 2 s (due 2 s after an add 4 s ago): {lag:?}"
    );
}

#[test]
fn a_backlog_behind_many_delayed_messages_is_claimed_batch_after_batch() {
    use outbox::Store;
    // More delayed rows than a claim's first read takes (1,000), then a backlog of three
    // keys: every claim must find the backlog's next rows, as it would with no delayed
    // row ahead, and none of the delayed ones.
    let table = TestTable::new("delayed_ahead");
    let later: Vec<Message> = (0..1_500)
        .map(|i| {
            Message::new("t", "later")
                .with_key(format!("r{i}"))
                .deliver_after(Duration::from_secs(3_600))
        })
        .collect();
    table.commit(&later);
    let now: Vec<Message> = (0..3_000)
        .map(|i| Message::new("t", format!("now{i}")).with_key(format!("k{}", i % 3)))
        .collect();
    table.commit(&now);
    for round in 0..10 {
        let claim = table.store.claim("ahead#1", 100, false).unwrap();
        assert_eq!(claim.records.len(), 100, "round {round}");
        assert!(claim
            .records
            .iter()
            .all(|r| r.message.payload().starts_with(b"now")));
        let ids: Vec<u64> = claim.records.iter().map(|r| r.id).collect();
        table.store.mark_delivered(claim.lease, &ids).unwrap();
    }
    assert_eq!(table.count("state = 1"), 1_000);
    assert_eq!(table.count("state = 0 AND payload = 'later'"), 1_500);
}
