//! The polling relay cut off from the database (a dead host, a cut link: both sockets
//! open, nothing moving) in the middle of a claim, before its commit: it stops publishing
//! before its leases could be taken over, the database ends the claim's transaction
//! within a lease, and another dispatcher takes its rows over within seconds. While the
//! link holds, the leases of batches still being sent are renewed, so that a lease can
//! be shorter than a publish.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gate::SlowBroker;
use common::proxy::{CloseOnDrop, Proxy};
use common::*;
use mysql::prelude::Queryable;
use outbox::{Dispatcher, DispatcherSettings, Error, MySqlStore};

/// The leases of the rows still pending, and the transactions open on the server: what
/// holds them back.
fn what_holds(table: &TestTable, pending: &str) -> String {
    let mut conn = table.conn();
    let leases: Vec<(u64, u64, Option<String>)> = conn
        .query(format!(
            "SELECT locked_by, COUNT(*), CAST(MIN(locked_on) AS CHAR) FROM `{}` \
             WHERE {pending} GROUP BY locked_by",
            table.name
        ))
        .unwrap();
    let open: Vec<(u64, String, String, u64, Option<String>)> = conn
        .query(
            "SELECT trx_mysql_thread_id, trx_state, CAST(trx_started AS CHAR), \
             trx_rows_locked, trx_query FROM information_schema.INNODB_TRX",
        )
        .unwrap();
    format!("leases (locked_by, rows, oldest): {leases:?}; open transactions: {open:?}")
}

/// Rows locked by transactions open on the server.
fn locked_by_open_transactions(table: &TestTable) -> u64 {
    table
        .conn()
        .query_first("SELECT CAST(COALESCE(SUM(trx_rows_locked), 0) AS UNSIGNED) FROM information_schema.INNODB_TRX")
        .unwrap()
        .unwrap()
}

#[test]
fn a_dispatcher_cut_off_stops_publishing_and_another_takes_its_rows_over_within_seconds() {
    const KEYS: usize = 10;
    let table = TestTable::new("partition");
    let topic = unique("partition");
    let aggregates = Arc::new(Aggregates::new(&table.pool, KEYS));
    // A 3 s lease, and a broker that takes 2.5 s per publish: with three batches in
    // flight, a batch waits longer than its lease, and only renewals keep it; a batch
    // waiting when the link is cut is due after its lease could have been taken over.
    // The cleaner commits no transaction of its own after its first round: the claims
    // are the cut-off dispatcher's only transactions.
    let settings = DispatcherSettings {
        batch_size: 10,
        max_lock_duration: Duration::from_secs(3),
        lock_check_interval: Duration::from_millis(200),
        cleanup_interval: Duration::from_secs(3600),
        ..fast_settings()
    };
    let address = database_url()
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(&address);
    // Through the proxy (over loopback the `mysql` crate would take the server's socket
    // instead, unless told not to), with statements that give up rather than wait for
    // ever on a cut link.
    let cut_url = format!(
        "mysql://root@{}/test?prefer_socket=false&pool_min=1&pool_max=10",
        proxy.address()
    );
    let opts = mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&cut_url).unwrap())
        .read_timeout(Some(Duration::from_secs(20)))
        .write_timeout(Some(Duration::from_secs(20)));
    let cut_store = MySqlStore::with_table(mysql::Pool::new(opts).unwrap(), &table.name).unwrap();
    let slow = SlowBroker {
        inner: broker(),
        pause: Duration::from_millis(2_500),
    };
    let mut cut_off = Dispatcher::new(cut_store, slow, settings.clone(), "cut-off")
        .unwrap()
        .start()
        .unwrap();
    let _close = CloseOnDrop(&proxy);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(
        &table.pool,
        &table.store,
        &aggregates,
        &topic,
        KEYS as u64,
        &stop,
    );
    // Alone, the slow dispatcher publishes without a lease expiring.
    assert!(
        wait_for(Duration::from_secs(60), || table.count("state = 1") >= 40),
        "the slow dispatcher publishes"
    );
    let expired_before: Vec<Error> = cut_off.errors().try_iter().collect();
    assert!(
        expired_before.is_empty(),
        "no lease lost while renewed: {expired_before:?}"
    );
    // The link is cut as a claim is about to commit: its transaction, open on the
    // server, locks the rows it was taking, which have no lease another dispatcher could
    // see expire.
    proxy.cut_before(b"\x03COMMIT");
    assert!(
        wait_for(Duration::from_secs(20), || proxy.is_cut()),
        "a claim commits"
    );
    let cut = Instant::now();
    let held = locked_by_open_transactions(&table);
    assert!(
        held > 0,
        "the claim cut off holds rows: {}",
        what_holds(&table, "state = 0")
    );
    let other = table.dispatch(broker(), settings, "other");
    // Within the lease, the cut-off dispatcher stops publishing; once it is past, the
    // other one takes its rows over. Everything committed in the 15 s after the cut is
    // published within 30 s of it.
    std::thread::sleep(Duration::from_secs(15));
    let high: u64 = table
        .conn()
        .query_first(format!("SELECT MAX(id) FROM `{}`", table.name))
        .unwrap()
        .unwrap();
    let behind = format!("id <= {high} AND state = 0");
    assert!(
        wait_for(
            (cut + Duration::from_secs(30)).saturating_duration_since(Instant::now()),
            || table.count(&behind) == 0
        ),
        "published within 30 s of the cut: {} still pending; {}",
        table.count(&behind),
        what_holds(&table, &behind)
    );
    let published = cut.elapsed();
    let errors: Vec<Error> = cut_off.errors().try_iter().collect();
    assert!(
        errors.iter().any(|e| e
            .to_string()
            .contains("was not published: its lease could not be renewed")),
        "the cut-off dispatcher stopped publishing: {errors:?}"
    );

    // The link comes back: the cut-off dispatcher goes on, and finds its old leases gone.
    proxy.mend();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let committed = writer.join().unwrap();
    let got = consume_ids(
        &topic,
        &committed,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_all_read(&committed, &got);
    assert_first_reads_in_order(&versions_read(&got), &aggregates.versions(&table.pool));
    eprintln!(
        "cut off: a claim holding {held} rows; what was committed 15 s into the cut was \
         published {published:?} after it; {} messages committed, {} read",
        committed.len(),
        got.len()
    );
    cut_off.stop().unwrap();
    drop(other);
    aggregates.drop_table(&table.pool);
}
