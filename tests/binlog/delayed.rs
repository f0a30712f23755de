//! Delayed messages: published when due and not before, the later messages of their key
//! waiting for them, across a restart that resumes past their events.

use super::*;

fn a_delayed_message_goes_when_due_after_a_restart_too_and_its_key_waits(server: Server) {
    let f = fixture(server, "binlog_delayed");
    let (url, pool, store, table, topic) = f.parts();
    let mut relay = start_relay(url, table, "binlog-delayed").unwrap();
    wait_until_following(pool, table);
    let delay = Duration::from_secs(6);
    let added = Instant::now();
    commit(
        pool,
        store,
        &[
            outbox::Message::new(topic, "late")
                .with_key("k")
                .deliver_after(delay),
            outbox::Message::new(topic, "late, no key").deliver_after(delay),
        ],
    );
    commit(
        pool,
        store,
        &[
            outbox::Message::new(topic, "after").with_key("k"),
            outbox::Message::new(topic, "other").with_key("o"),
        ],
    );
    // The other key goes at once; the delayed rows, and the row of k after one, wait.
    assert!(delivered(pool, table, 1), "the other key's message");
    assert!(added.elapsed() < delay, "in time to see the others wait");
    assert_eq!(count(pool, table, "state = 1 AND payload = 'other'"), 1);
    // Stopped now, it has saved a position past the delayed rows' events (with the
    // mark of the row after them): the next session learns of them from the table.
    relay.stop().unwrap();
    let mut relay = start_relay(url, table, "binlog-delayed-again").unwrap();
    // Soon after they are due: not a minute later, by the sweep's safety net.
    assert!(
        wait_for(delay + Duration::from_secs(10), || count(
            pool,
            table,
            "state = 1"
        ) == 4),
        "all delivered when due"
    );
    assert_eq!(
        count(
            pool,
            table,
            "payload LIKE 'late%' AND processed_on < created_on + INTERVAL 6 SECOND"
        ),
        0,
        "no delayed message before its time"
    );
    assert!(added.elapsed() >= delay);
    let got = consume(topic, 4, Duration::from_secs(30), Duration::from_secs(1));
    let of_k: Vec<String> = payloads(&got)
        .into_iter()
        .filter(|p| p == "late" || p == "after")
        .collect();
    assert_eq!(of_k, ["late", "after"], "k's order holds");
    assert_eq!(got.len(), 4, "each once: {:?}", payloads(&got));
    let errors: Vec<Error> = relay.errors().try_iter().collect();
    assert!(errors.is_empty(), "no error: {errors:?}");
    relay.stop().unwrap();
}

fn a_delayed_message_waits_while_the_relay_follows(server: Server) {
    let f = fixture(server, "binlog_delayed_live");
    let (url, pool, store, table, topic) = f.parts();
    let mut relay = start_relay(url, table, "binlog-delayed-live").unwrap();
    wait_until_following(pool, table);
    let delay = Duration::from_secs(3);
    commit(
        pool,
        store,
        &[outbox::Message::new(topic, "late")
            .with_key("k")
            .deliver_after(delay)],
    );
    commit(
        pool,
        store,
        &[outbox::Message::new(topic, "after").with_key("k")],
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(pool, table, "state = 1"),
        0,
        "k waits for its delayed row"
    );
    assert!(delivered(pool, table, 2));
    assert_eq!(
        count(
            pool,
            table,
            "payload = 'late' AND processed_on >= created_on + INTERVAL 3 SECOND"
        ),
        1,
        "not before its time"
    );
    let got = consume(topic, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(payloads(&got), ["late", "after"]);
    relay.stop().unwrap();
}

fn a_first_catch_up_leaves_delayed_messages_to_their_time_and_finishes(server: Server) {
    let f = fixture(server, "binlog_delayed_catch_up");
    let (url, pool, store, table, topic) = f.parts();
    // Written before any relay ran: the first session catches up from the table.
    let delay = Duration::from_secs(5);
    let added = Instant::now();
    commit(
        pool,
        store,
        &[
            outbox::Message::new(topic, "late")
                .with_key("k")
                .deliver_after(delay),
            outbox::Message::new(topic, "after").with_key("k"),
            outbox::Message::new(topic, "other").with_key("o"),
        ],
    );
    let mut relay = start_relay(url, table, "binlog-delayed-catch-up").unwrap();
    // The catch-up publishes what may go and ends: the relay follows the log while the
    // delayed row and the row behind it wait.
    wait_until_following(pool, table);
    // (A position of server 0 is one written before a first catch-up finished.)
    assert!(
        wait_for(Duration::from_secs(20), || count(
            pool,
            POSITION_TABLE,
            &format!("outbox_table = '{table}' AND server_id <> 0")
        ) == 1),
        "the catch-up finishes"
    );
    assert!(
        added.elapsed() < delay,
        "the catch-up finished before the delayed row was due"
    );
    assert!(delivered(pool, table, 1), "the other key's message");
    assert_eq!(count(pool, table, "state = 1 AND payload = 'other'"), 1);
    assert!(
        wait_for(delay + Duration::from_secs(10), || count(
            pool,
            table,
            "state = 1"
        ) == 3),
        "the delayed row and the row behind it, when due"
    );
    assert_eq!(
        count(
            pool,
            table,
            "payload = 'late' AND processed_on < created_on + INTERVAL 5 SECOND"
        ),
        0,
        "not before its time"
    );
    let got = consume(topic, 3, Duration::from_secs(30), Duration::from_secs(1));
    let of_k: Vec<String> = payloads(&got)
        .into_iter()
        .filter(|p| p != "other")
        .collect();
    assert_eq!(of_k, ["late", "after"], "k's order holds");
    relay.stop().unwrap();
}

on_both_servers!(
    a_delayed_message_goes_when_due_after_a_restart_too_and_its_key_waits,
    a_delayed_message_waits_while_the_relay_follows,
    a_first_catch_up_leaves_delayed_messages_to_their_time_and_finishes,
);
