//! Each record applied once: duplicates, a handler that fails, panics or is poisoned, a record without an id, the caller's own transaction, concurrent batches, retention and bad settings.

use super::*;

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
