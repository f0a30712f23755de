//! How the polling relay paces its polls: soon again after a poll that found rows, once
//! per `process_interval` (one statement) while the table is idle.

mod common;

use std::time::{Duration, Instant};

use common::private_db::PrivateDatabase;
use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Dispatcher, DispatcherSettings, Message, MySqlStore, Outbox};

/// Statements the server has run for its clients (`Questions` counts neither pings nor
/// statement preparations), less the one that reads it.
fn questions(conn: &mut mysql::Conn) -> u64 {
    let row: Option<(String, u64)> = conn
        .query_first("SHOW GLOBAL STATUS LIKE 'Questions'")
        .unwrap();
    row.unwrap().1
}

#[test]
fn an_idle_table_costs_one_statement_per_process_interval_and_a_later_commit_still_goes() {
    // A server of its own: every statement it counts is the relay's or this test's.
    let mut db = PrivateDatabase::new();
    db.start();
    let pool = mysql::Pool::new(db.url().as_str()).unwrap();
    let store = MySqlStore::new(pool.clone());
    store.migrate().unwrap();
    let interval = Duration::from_millis(200);
    let settings = DispatcherSettings {
        process_interval: interval,
        ..Default::default()
    };
    let mut handle = Dispatcher::new(store.clone(), broker(), settings, "idle")
        .unwrap()
        .start()
        .unwrap();
    // Past the first polls and the other workers' first rounds.
    std::thread::sleep(Duration::from_secs(1));

    let mut own = mysql::Conn::new(db.url().as_str()).unwrap();
    let window = Duration::from_secs(4);
    let before = questions(&mut own);
    std::thread::sleep(window);
    let statements = questions(&mut own) - before - 1;
    let polls = (window.as_millis() / interval.as_millis()) as u64;
    assert!(
        statements <= polls + 2,
        "{statements} statements in {window:?} of an idle table polled every {interval:?}: \
         more than one a poll"
    );
    assert!(
        statements >= polls / 2,
        "{statements} statements in {window:?}: the relay is not polling every {interval:?}"
    );

    // The idle relay, not woken, still takes what is committed next.
    let topic = unique("idle");
    let mut tx = pool.start_transaction(TxOpts::default()).unwrap();
    Outbox::new(&store)
        .add(&mut tx, &Message::new(&topic, "after the idle spell"))
        .unwrap();
    tx.commit().unwrap();
    let got = consume(&topic, 1, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(got.len(), 1, "the message committed while idle: {got:?}");
    handle.stop().unwrap();
}

#[test]
fn after_a_poll_that_found_rows_the_next_comes_at_once_not_after_process_interval() {
    let table = TestTable::new("pace");
    let topic = unique("pace");
    let outbox = Outbox::new(&table.store);
    let interval = Duration::from_secs(10);
    let settings = DispatcherSettings {
        process_interval: interval,
        ..Default::default()
    };
    let commit = |i: usize| {
        let mut tx = table.pool.start_transaction(TxOpts::default()).unwrap();
        outbox
            .add(&mut tx, &Message::new(&topic, format!("{i}")))
            .unwrap();
        tx.commit().unwrap();
    };
    let delivered = |n: usize| {
        let count: Option<usize> = table
            .conn()
            .query_first(format!(
                "SELECT COUNT(*) FROM `{}` WHERE state = 1",
                table.name
            ))
            .unwrap();
        count == Some(n)
    };
    // The relay's first poll finds a row.
    commit(0);
    let mut handle = table.dispatch(broker(), settings, "pace");
    assert!(wait_for(interval * 2, || delivered(1)), "the first message");
    // Messages committed one at a time, each after the one before was delivered, with
    // no wake-up: a relay that waited `process_interval` between polls would take 10 s
    // for each.
    let started = Instant::now();
    let messages = 20;
    for i in 1..=messages {
        commit(i);
        assert!(
            wait_for(interval * 2, || delivered(i + 1)),
            "message {i} not delivered"
        );
    }
    let took = started.elapsed();
    assert!(
        took < interval,
        "{messages} messages, one after another, took {took:?}: the relay waited out \
         process_interval ({interval:?}) between polls that found rows"
    );
    handle.stop().unwrap();
}
