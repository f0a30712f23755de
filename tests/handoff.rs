//! The hand-off: commits of an outbox with the waker of a dispatcher in the same process
//! write their rows leased to it, and it publishes them with no claim, keeping each key's
//! order. Real MariaDB (or MySQL, `make test-mysql`) and the real broker.

mod common;

use std::collections::HashMap;
use std::thread;
use std::time::Duration;

use common::gate::gated;
use common::recorder::kept;
use common::*;
use mysql::TxOpts;
use outbox::{DispatcherSettings, Message, Outbox};

const WAIT: Duration = Duration::from_secs(20);

/// Polls rarely: what arrives soon came through the hand-off, or a wake-up's claim.
fn settings() -> DispatcherSettings {
    DispatcherSettings {
        process_interval: Duration::from_secs(60),
        linger: Duration::from_millis(5),
        hand_off: true,
        ..fast_settings()
    }
}

/// Commits `messages` in one `OutboxTransaction` of `outbox`.
fn commit(outbox: &Outbox, messages: &[Message]) {
    let mut tx = outbox.start_transaction(TxOpts::default()).unwrap();
    tx.add_all(messages).unwrap();
    tx.commit().unwrap();
}

/// The payloads read from `topic` by key, in the order they were read.
fn payloads_by_key(topic: &str, expected: usize) -> HashMap<String, Vec<String>> {
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for record in consume(topic, expected, WAIT, Duration::from_millis(500)) {
        by_key
            .entry(record.key.unwrap_or_default())
            .or_default()
            .push(String::from_utf8(record.payload).unwrap());
    }
    by_key
}

/// The counter `name` of dispatcher `instance`.
fn counter(name: &str, instance: &str) -> u64 {
    kept().counter(&format!("{name}{{instance={instance}}}"))
}

#[test]
fn commits_hand_their_messages_over_and_the_relay_claims_none() {
    let table = TestTable::new("handoff");
    let topic = unique("handoff");
    let instance = unique("handing");
    kept();
    let handle = table.dispatch(broker(), settings(), &instance);
    let outbox = Outbox::new(&table.store).with_waker(handle.waker());
    // Its first poll, on an empty table, is over before the commits.
    thread::sleep(Duration::from_millis(300));
    let keys = ["a", "b", "c"];
    let mut sent = 0;
    for round in 0..20 {
        let messages: Vec<Message> = (0..=round % 3)
            .map(|i| {
                let key = keys[(round + i) % keys.len()];
                sent += 1;
                Message::new(&topic, format!("{key}-{round}-{i}")).with_key(key)
            })
            .collect();
        commit(&outbox, &messages);
    }
    let read = payloads_by_key(&topic, sent);
    assert_eq!(read.values().map(Vec::len).sum::<usize>(), sent);
    for (key, payloads) in &read {
        let mut in_order = payloads.clone();
        in_order.sort_by_key(|p| {
            let parts: Vec<usize> = p.split('-').skip(1).map(|n| n.parse().unwrap()).collect();
            (parts[0], parts[1])
        });
        assert_eq!(payloads, &in_order, "key {key} out of order");
    }
    assert!(wait_for(WAIT, || table.count("state = 1") == sent as u64));
    assert_eq!(
        counter("outbox_rows_handed_total", &instance),
        sent as u64,
        "every message was handed over"
    );
    assert_eq!(
        counter("outbox_rows_claimed_total", &instance),
        0,
        "and none claimed"
    );
    drop(handle);
}

#[test]
fn a_key_behind_a_row_held_elsewhere_waits_for_it_and_the_others_go() {
    let table = TestTable::new("handoff_held");
    let topic = unique("handoff_held");
    let instance = unique("held");
    kept();
    // k's first message is held by another dispatcher (a lease of someone else's).
    table.commit(&[Message::new(&topic, "k-1").with_key("k")]);
    table.exec("UPDATE {t} SET locked_by = 12345, locked_on = UTC_TIMESTAMP(6)");
    let handle = table.dispatch(
        broker(),
        DispatcherSettings {
            process_interval: Duration::from_millis(200),
            ..settings()
        },
        &instance,
    );
    let outbox = Outbox::new(&table.store).with_waker(handle.waker());
    commit(
        &outbox,
        &[
            Message::new(&topic, "k-2").with_key("k"),
            Message::new(&topic, "j-1").with_key("j"),
        ],
    );
    commit(&outbox, &[Message::new(&topic, "k-3").with_key("k")]);
    assert!(
        wait_for(WAIT, || table.count("payload = 'j-1' AND state = 1") == 1),
        "another key goes at once"
    );
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        table.count("payload IN ('k-2', 'k-3') AND state = 0 AND locked_by = 0"),
        2,
        "k's later messages wait, left to the claims"
    );
    // The other dispatcher lets go: the claims take k's messages in order.
    table.exec("UPDATE {t} SET locked_by = 0 WHERE payload = 'k-1'");
    let read = payloads_by_key(&topic, 4);
    assert_eq!(read["k"], ["k-1", "k-2", "k-3"]);
    assert_eq!(read["j"], ["j-1"]);
    assert_eq!(counter("outbox_rows_handed_total", &instance), 1);
    drop(handle);
}

#[test]
fn delayed_messages_and_other_tables_go_the_usual_way() {
    let table = TestTable::new("handoff_usual");
    let other = TestTable::new("handoff_other");
    let topic = unique("handoff_usual");
    let instance = unique("usual");
    kept();
    let (gate, entered, go) = gated(false);
    let handle = table.dispatch(gate, settings(), &instance);
    let owner = handle.owner().to_string();
    let outbox = Outbox::new(&table.store).with_waker(handle.waker());
    commit(
        &outbox,
        &[
            Message::new(&topic, "now"),
            Message::new(&topic, "later").deliver_after(Duration::from_secs(3600)),
        ],
    );
    let ids = entered.recv_timeout(WAIT).expect("a batch was taken");
    assert_eq!(ids.len(), 1, "the delayed message is not handed over");
    assert_eq!(counter("outbox_rows_handed_total", &instance), 1);
    assert_eq!(
        table.count(&format!("payload = 'now' AND {}", leased_by(&owner))),
        1,
        "written leased to the dispatcher"
    );
    assert_eq!(
        table.count("payload = 'later' AND locked_by = 0"),
        1,
        "the delayed message is written unleased"
    );
    // An outbox on another table, with this dispatcher's waker.
    commit(
        &Outbox::new(&other.store).with_waker(handle.waker()),
        &[Message::new(&topic, "elsewhere")],
    );
    assert_eq!(other.count("locked_by = 0 AND state = 0"), 1);
    go.send(()).unwrap();
    assert!(wait_for(WAIT, || table
        .count("payload = 'now' AND state = 1")
        == 1));
    drop(handle);
}

#[test]
fn a_stopping_dispatcher_releases_what_it_did_not_take_and_later_commits_are_not_leased() {
    let table = TestTable::new("handoff_stop");
    let topic = unique("handoff_stop");
    let instance = unique("stopping");
    kept();
    let (gate, entered, go) = gated(false);
    let mut handle = table.dispatch(gate, settings(), &instance);
    let owner = handle.owner().to_string();
    let outbox = Outbox::new(&table.store).with_waker(handle.waker());
    commit(&outbox, &[Message::new(&topic, "first")]);
    entered
        .recv_timeout(WAIT)
        .expect("the first commit's batch");
    assert_eq!(counter("outbox_rows_handed_total", &instance), 1);
    // Handed over while the first batch is in flight: not taken yet.
    commit(&outbox, &[Message::new(&topic, "second")]);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        table.count(&format!("payload = 'second' AND {}", leased_by(&owner))),
        1
    );
    let stopping = thread::spawn(move || {
        handle.stop().unwrap();
    });
    thread::sleep(Duration::from_millis(200));
    go.send(()).unwrap();
    stopping.join().unwrap();
    assert_eq!(table.count("payload = 'first' AND state = 1"), 1);
    assert_eq!(
        table.count("payload = 'second' AND state = 0 AND locked_by = 0"),
        1,
        "released as the dispatcher stopped"
    );
    commit(&outbox, &[Message::new(&topic, "third")]);
    assert_eq!(
        table.count("payload = 'third' AND locked_by = 0"),
        1,
        "no dispatcher takes it: written unleased"
    );
    // A dispatcher started later relays them.
    assert!(!fast_settings().hand_off, "off unless asked");
    let handle = table.dispatch(broker(), fast_settings(), "after");
    assert!(wait_for(WAIT, || table.count("state = 1") == 3));
    drop(handle);
    assert_eq!(table.count("locked_by <> 0"), 0);
}
