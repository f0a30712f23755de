//! Every time the outbox writes or compares is UTC, whatever the `time_zone` of the
//! sessions that add messages or run the dispatcher.

mod common;

use std::time::Duration;

use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Failure, Message, MySqlStore, Outbox, Store};

/// A pool whose sessions all run at `zone` (as frameworks set it per session).
fn pool_in_zone(zone: &str) -> mysql::Pool {
    let opts = mysql::Opts::from_url(&small_pool_url()).unwrap();
    let builder =
        mysql::OptsBuilder::from_opts(opts).init(vec![format!("SET time_zone = '{zone}'")]);
    let pool = mysql::Pool::new(builder).unwrap();
    let now: String = pool
        .get_conn()
        .unwrap()
        .query_first("SELECT @@session.time_zone")
        .unwrap()
        .unwrap();
    assert_eq!(now, zone, "the pool's sessions run at {zone}");
    pool
}

/// Seconds between the rows' `created_on` and `available_on` and the database's UTC
/// clock, the largest of them.
fn largest_skew_from_utc(table: &TestTable) -> i64 {
    table
        .conn()
        .query_first(format!(
            "SELECT MAX(GREATEST(ABS(TIMESTAMPDIFF(SECOND, created_on, UTC_TIMESTAMP(6))), \
             ABS(TIMESTAMPDIFF(SECOND, available_on, UTC_TIMESTAMP(6))))) FROM `{}`",
            table.name
        ))
        .unwrap()
        .unwrap()
}

#[test]
fn messages_added_in_sessions_east_of_utc_are_published_by_a_relay_west_of_it() {
    let table = TestTable::new("tz_add");
    let topic = unique("tz_add");
    let east = pool_in_zone("+09:00");
    let outbox = Outbox::new(&MySqlStore::with_table(east.clone(), &table.name).unwrap());

    let mut tx = east.start_transaction(TxOpts::default()).unwrap();
    outbox.add(&mut tx, &Message::new(&topic, "add")).unwrap();
    outbox
        .add_all(&mut tx, &[Message::new(&topic, "add_all")])
        .unwrap();
    tx.commit().unwrap();
    let mut tx = outbox.start_transaction(TxOpts::default()).unwrap();
    tx.add(&Message::new(&topic, "on commit")).unwrap();
    tx.commit().unwrap();
    assert!(
        largest_skew_from_utc(&table) < 60,
        "rows added at +09:00 carry UTC times"
    );

    // The dispatcher's own sessions run at -07:00: sixteen hours behind the writers'.
    let west = MySqlStore::with_table(pool_in_zone("-07:00"), &table.name).unwrap();
    let handle = outbox::Dispatcher::new(west, broker(), fast_settings(), "tz")
        .unwrap()
        .start()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || table.count("state = 1") == 3),
        "all three published at once, not hours later: {} delivered",
        table.count("state = 1")
    );
    let got = consume(&topic, 3, Duration::from_secs(10), Duration::ZERO);
    assert_eq!(got.len(), 3);
    drop(handle);
}

#[test]
fn leases_and_backoffs_mean_the_same_in_every_session_zone() {
    let table = TestTable::new("tz_lease");
    table.commit(&[Message::new("t", "a"), Message::new("t", "b")]);
    let utc = MySqlStore::with_table(pool_in_zone("+00:00"), &table.name).unwrap();
    let east = MySqlStore::with_table(pool_in_zone("+09:00"), &table.name).unwrap();
    let west = MySqlStore::with_table(pool_in_zone("-07:00"), &table.name).unwrap();

    let claim = utc.claim("utc#1", 10, false).unwrap();
    assert_eq!(claim.records.len(), 2);
    for store in [&east, &west] {
        assert_eq!(
            store.release_expired(Duration::from_secs(60)).unwrap(),
            0,
            "a lease taken a moment ago is not a minute old in any zone"
        );
    }

    // A backoff of 1 s written from +09:00 is over after 1 s at -07:00, and not before.
    let failures: Vec<Failure> = claim
        .records
        .iter()
        .map(|r| Failure {
            id: r.id,
            error: "try again".into(),
            retry_in: Duration::from_secs(1),
            dead: false,
        })
        .collect();
    assert_eq!(east.mark_failed(claim.lease, &failures).unwrap(), 2);
    assert!(
        west.claim("west#1", 10, false).unwrap().records.is_empty(),
        "still backing off"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !west
            .claim("west#1", 10, false)
            .unwrap()
            .records
            .is_empty()),
        "due after its backoff, not sixteen hours later"
    );
}

#[test]
fn migrate_brings_the_time_defaults_of_an_earlier_table_to_utc() {
    let table = TestTable::new("tz_migrate");
    table.exec(
        "ALTER TABLE {t} MODIFY created_on DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
         MODIFY available_on DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
    );
    table.store.migrate().unwrap();
    // A row written by hand, without the times, in a session far from UTC.
    let mut conn = pool_in_zone("+09:00").get_conn().unwrap();
    conn.query_drop(format!(
        "INSERT INTO `{}` (message_id, topic, payload) VALUES (UNHEX(REPLACE(UUID(), '-', '')), 't', 'p')",
        table.name
    ))
    .unwrap();
    assert!(
        largest_skew_from_utc(&table) < 60,
        "the defaults are UTC after migrate"
    );
}
