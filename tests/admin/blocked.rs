//! The keys dead messages hold back: `outbox status` counts them and the messages behind
//! them, `outbox dead list --blocking` names the dead messages that hold any back, and the
//! store's backlog (the gauges' read) has them by topic.

use super::*;

/// Makes the rows with these payloads dead, as a relay out of attempts would.
fn kill(table: &TestTable, payloads: &[&str]) {
    let list: Vec<String> = payloads.iter().map(|p| format!("'{p}'")).collect();
    table.exec(&format!(
        "UPDATE {{t}} SET state = 2, processed_on = UTC_TIMESTAMP(6), number_of_attempts = 3, \
         error = 'broker said no' WHERE payload IN ({})",
        list.join(", ")
    ));
}

#[test]
fn status_and_dead_list_show_the_keys_dead_messages_hold_back_and_what_waits_behind() {
    let table = TestTable::new("admin_blocked");
    let (a, b) = (unique("blocked_a"), unique("blocked_b"));
    // In id order. Topic a: k1 dead then two pending; k2 pending, dead, pending (one
    // behind); k3 dead alone; a dead message with no key. Topic b: k4 dead then pending.
    // k5 pending alone.
    let rows = [
        (&a, Some("k1"), "a1-dead"),
        (&a, Some("k2"), "a2-before"),
        (&a, Some("k1"), "a1-behind-1"),
        (&a, Some("k2"), "a2-dead"),
        (&a, Some("k3"), "a3-dead"),
        (&a, None, "a-nokey-dead"),
        (&a, Some("k1"), "a1-behind-2"),
        (&a, Some("k2"), "a2-behind"),
        (&b, Some("k4"), "b4-dead"),
        (&b, Some("k4"), "b4-behind"),
        (&b, Some("k5"), "b5-alone"),
    ];
    let messages: Vec<Message> = rows
        .iter()
        .map(|(topic, key, payload)| {
            let message = Message::new(topic.as_str(), *payload);
            match key {
                Some(key) => message.with_key(*key),
                None => message,
            }
        })
        .collect();
    table.commit(&messages);
    kill(
        &table,
        &["a1-dead", "a2-dead", "a3-dead", "a-nokey-dead", "b4-dead"],
    );

    let admin = Admin::new(table.store.clone()).unwrap();
    let status = admin.status().unwrap();
    let counts = |topic: &str| {
        let found = status.topics.iter().find(|t| t.topic == topic).unwrap();
        (found.counts.blocked_keys, found.counts.blocked_pending)
    };
    assert_eq!(counts(&a), (2, 3), "k1 (two behind) and k2 (one behind)");
    assert_eq!(counts(&b), (1, 1), "k4");
    assert_eq!(
        (status.total.blocked_keys, status.total.blocked_pending),
        (3, 4)
    );

    let json = outbox_json(&table.name, &["status"]);
    assert_eq!(json["total"]["blocked_keys"], 3);
    assert_eq!(json["total"]["blocked_pending"], 4);
    let topic_a = json["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == a.as_str())
        .unwrap();
    assert_eq!(
        (&topic_a["blocked_keys"], &topic_a["blocked_pending"]),
        (&2.into(), &3.into())
    );
    let text = outbox(&table.name, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with(&b)).unwrap();
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[cells.len() - 2..], ["1", "1"], "{text}");

    // The dead messages that hold anything back, with how much.
    let listed = outbox_json(&table.name, &["dead", "list", "--blocking"]);
    let held: Vec<(String, u64)> = listed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap().to_string(),
                m["holds_back"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [("k1".into(), 2), ("k2".into(), 1), ("k4".into(), 1)],
        "oldest first; not k3, nor the message with no key"
    );
    let all = admin.dead(&Default::default()).unwrap();
    assert_eq!(all.len(), 5);
    let k3 = all
        .iter()
        .find(|m| m.key.as_deref() == Some(b"k3"))
        .unwrap();
    assert_eq!(k3.holds_back, 0);
    let text = outbox(&table.name, &["dead", "list", "--blocking", "--topic", &b]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("holds back"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("k4")).count(),
        1,
        "{text}"
    );

    // The gauges' read has the same keys by topic.
    let backlog = table.store.backlog().unwrap().unwrap();
    let blocked = |topic: &str| {
        backlog
            .topics
            .iter()
            .find(|t| t.topic == topic)
            .map(|t| t.blocked_keys)
    };
    assert_eq!((blocked(&a), blocked(&b)), (Some(2), Some(1)));

    // Replaying k1's dead message frees its key: one key fewer.
    let replayed = outbox(&table.name, &["replay", "--topic", &a, "--key", "k1"]);
    assert_eq!(replayed.status.code(), Some(0), "{}", printed(&replayed));
    let status = admin.status().unwrap();
    assert_eq!(
        (status.total.blocked_keys, status.total.blocked_pending),
        (2, 2)
    );

    // A replay of the blocking ones takes exactly those (k2 and k4 now), not k3's.
    let dry = outbox_json(&table.name, &["replay", "--blocking", "--dry-run"]);
    assert_eq!(dry["count"], 2, "{dry}");
    let keys: Vec<&str> = dry["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["k2", "k4"]);
}
