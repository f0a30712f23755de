//! Dead messages: listed in pages, shown whole, replayed in key order, discarded.

use super::*;

#[test]
fn replay_by_id_and_by_filter_delivers_in_key_order_with_a_dispatcher_running() {
    let table = TestTable::new("admin_replay");
    let topic = unique("admin_replay");
    // Two keys, each with a message that dies second in line; dead messages hold their
    // keys back, so the two behind each wait.
    let mut messages = Vec::new();
    for key in ["p", "q"] {
        messages.push(Message::new(&topic, format!("{key}1")).with_key(key));
        messages.push(too_large(&topic, key));
        messages.push(Message::new(&topic, format!("{key}3")).with_key(key));
        messages.push(Message::new(&topic, format!("{key}4")).with_key(key));
    }
    let ids = table.commit(&messages);
    let handle = table.dispatch(small_message_broker(), settings(1, true), "admin_replay");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 2
        && table.count("state = 1") == 2));
    drop(handle);

    // A dispatcher that can send them runs; the dead messages still hold their keys.
    let handle = table.dispatch(broker(), settings(1, true), "admin_replay_ok");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(table.count("state = 1"), 2);

    // A dry run says which, and changes nothing.
    let before = checksum(&table);
    let dry = outbox_json(&table.name, &["replay", "--id", &ids[1], "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["count"], 1);
    assert_eq!(dry["messages"][0]["message_id"], ids[1].as_str());
    assert_eq!(
        dry["messages"][0]["error"].as_str().map(|e| !e.is_empty()),
        Some(true)
    );
    let all = outbox_json(&table.name, &["replay", "--all", "--dry-run"]);
    assert_eq!(all["count"], 2);
    assert_eq!(checksum(&table), before, "a dry run changes nothing");

    // By message id: key p's three go out, in order.
    let replayed = outbox_json(&table.name, &["replay", "--id", &ids[1]]);
    assert_eq!(replayed["count"], 1);
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 5));
    assert_eq!(
        table.count("msg_key = 'q' AND state = 0"),
        2,
        "q still waits"
    );

    // By filter (its key and a word of its error): key q's.
    let row = row_id(&table, &ids[5]).to_string();
    let listed = outbox_json(&table.name, &["dead", "list", "--key", "q"]);
    assert_eq!(listed["messages"][0]["id"].to_string(), row);
    let replayed = outbox_json(&table.name, &["replay", "--key", "q", "--error", "SIZE"]);
    assert_eq!(replayed["count"], 1, "{replayed}");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 8));
    drop(handle);

    let got = consume(
        &topic,
        8,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    for (key, expected) in [("p", &ids[..4]), ("q", &ids[4..])] {
        let sent: Vec<String> = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .map(|r| r.message_id())
            .collect();
        assert_eq!(sent, expected, "key {key}'s messages, once each, in order");
    }
    // The replayed rows started over: one attempt, the one that delivered them.
    assert_eq!(
        table.count("state = 1 AND LENGTH(payload) = 20000 AND number_of_attempts = 1"),
        2
    );
}

#[test]
fn discard_takes_dead_messages_out_of_the_work_and_retention_deletes_them() {
    let table = TestTable::new("admin_discard");
    let topic = unique("admin_discard");
    let ids = table.commit(&[
        too_large(&topic, "k"),
        Message::new(&topic, "after").with_key("k"),
        too_large(&topic, "other"),
    ]);
    let handle = table.dispatch(small_message_broker(), settings(1, true), "admin_discard");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 2));
    assert_eq!(table.count("state = 0"), 1, "k's later message waits");

    let before = outbox_json(&table.name, &["status"]);
    assert_eq!(before["total"]["dead"], 2);
    let discarded = outbox_json(&table.name, &["discard", "--id", &ids[0]]);
    assert_eq!(discarded["count"], 1);
    // The key's held message goes on; the discarded one is no work and not dead.
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 1")
        == 1));
    drop(handle);
    let after = outbox_json(&table.name, &["status"]);
    assert_eq!(after["total"]["dead"], 1);
    assert_eq!(after["total"]["discarded"], 1);
    assert_eq!(after["total"]["pending"], 0);
    assert_eq!(after["total"]["lag_seconds"], Json::Null);
    assert_eq!(
        table.count("state = 3 AND processed_on > UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE"),
        1
    );
    let dead = outbox_json(&table.name, &["dead", "list"]);
    assert_eq!(dead["messages"].as_array().unwrap().len(), 1);
    assert_eq!(dead["messages"][0]["message_id"], ids[2].as_str());

    // A discarded message cannot be replayed by id: it is not dead.
    let refused = outbox(&table.name, &["replay", "--id", &ids[0]]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        printed(&refused).contains("is discarded, not dead"),
        "{}",
        printed(&refused)
    );

    // Retention deletes it with the delivered rows; the dead one stays.
    let deleted = table.store.purge_delivered(Duration::ZERO, 100).unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(table.count("state = 2"), 1);
    assert_eq!(table.count("state <> 2"), 0);
}

#[test]
fn dead_messages_list_in_pages_and_show_whole() {
    let table = TestTable::new("admin_show");
    let topic = unique("admin_show");
    let message = too_large(&topic, "k\u{e9}y")
        .with_header("event-type", "OrderCreated")
        .with_header("binary", vec![0u8, 255]);
    let mut messages = vec![message];
    messages.extend((0..4).map(|i| too_large(&topic, &format!("k{i}"))));
    let ids = table.commit(&messages);
    let handle = table.dispatch(small_message_broker(), settings(1, false), "admin_show");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 5));
    drop(handle);

    // Pages of two: 2, 2, 1, each after the last id of the one before.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["dead", "list", "--limit", "2"];
        if let Some(after) = &after {
            args.extend(["--after-id", after.as_str()]);
        }
        let page = outbox_json(&table.name, &args);
        seen.extend(
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["message_id"].as_str().unwrap().to_string()),
        );
        match page["next_after_id"].as_u64() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let shown = outbox_json(&table.name, &["dead", "show", &ids[0]]);
    assert_eq!(shown["state"], "dead");
    assert_eq!(shown["key"], "k\u{e9}y");
    assert_eq!(shown["payload_bytes"], 20_000);
    assert_eq!(shown["payload"].as_str().map(str::len), Some(20_000));
    assert_eq!(
        shown["headers"],
        serde_json::json!([["event-type", "OrderCreated"], ["binary", [0, 255]]])
    );
    assert_eq!(shown["attempts"], 1);
    assert!(shown["processed"].is_string() && shown["locked_on"].is_string());
    let by_row = outbox_json(
        &table.name,
        &["dead", "show", &row_id(&table, &ids[0]).to_string()],
    );
    assert_eq!(by_row, shown);
    let text = outbox(&table.name, &["dead", "show", &ids[0]]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("event-type: OrderCreated") && text.contains("state           dead"),
        "{text}"
    );
}
