//! Faults the outbox survives: an exhausted pool, a broker that goes away and comes back.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::{Error, Message, MySqlStore};

#[test]
fn exhausted_pool_is_reported_and_the_dispatcher_recovers_without_touching_app_transactions() {
    let table = TestTable::new("pool");
    let topic = unique("pool");
    // The dispatcher shares a two-connection pool with the application.
    let url = format!(
        "{}?pool_min=1&pool_max=2",
        database_url().split('?').next().unwrap()
    );
    let shared = mysql::Pool::new(url.as_str()).unwrap();
    let store = MySqlStore::with_table(shared.clone(), &table.name).unwrap();

    // The application holds both connections, each in a transaction of its own.
    let mut app_a = shared.start_transaction(TxOpts::default()).unwrap();
    let mut app_b = shared.start_transaction(TxOpts::default()).unwrap();
    app_a.query_drop(format!("INSERT INTO `{}` (message_id, topic, payload) VALUES (UNHEX(REPLACE(UUID(),'-','')), '{topic}', 'from app a')", table.name)).unwrap();
    app_b.query_drop(format!("INSERT INTO `{}` (message_id, topic, payload) VALUES (UNHEX(REPLACE(UUID(),'-','')), '{topic}', 'from app b')", table.name)).unwrap();

    let ids = table.commit(&[Message::new(&topic, "queued")]);
    let outbox_handle = outbox::Dispatcher::new(store, broker(), fast_settings(), "pool")
        .unwrap()
        .start()
        .unwrap();
    let reported = outbox_handle
        .errors()
        .recv_timeout(Duration::from_secs(20))
        .expect("the exhausted pool is reported");
    assert!(
        matches!(reported, Error::PoolExhausted { .. }),
        "{reported}"
    );
    assert!(reported.is_retryable());
    assert_eq!(
        table.count("state = 1"),
        0,
        "nothing delivered while it had no connection"
    );

    // The application's transactions are still its own: one commits, one rolls back.
    app_a.commit().unwrap();
    app_b.rollback().unwrap();
    assert_eq!(table.count("payload = 'from app a'"), 1);
    assert_eq!(table.count("payload = 'from app b'"), 0);

    let got = consume(
        &topic,
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    let read: HashSet<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(
        read,
        HashSet::from([b"queued".to_vec(), b"from app a".to_vec()])
    );
    assert_eq!(
        got.iter()
            .filter(|r| r.payload == b"queued")
            .map(|r| r.message_id())
            .collect::<Vec<_>>(),
        ids
    );
    drop(outbox_handle);
}
