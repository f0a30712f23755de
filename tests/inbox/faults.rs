//! The database or the consumer killed mid-stream: nothing lost, nothing applied twice.

use super::*;

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
