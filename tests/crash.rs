//! A dispatcher process killed with SIGKILL in the middle of a batch: the others finish
//! its work once its leases expire, nothing is lost and per-key order holds.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mysql::prelude::Queryable;
use outbox::{DispatcherSettings, Outbox};

#[test]
fn killed_dispatcher_process_loses_nothing_and_keeps_key_order() {
    const KEYS: usize = 50;
    const PER_KEY: u32 = 40;
    let table = TestTable::new("crash");
    let topic = unique("crash");
    let aggregates = Aggregates::new(&table.pool, KEYS);
    let outbox = Outbox::new(&table.store);
    let mut committed = HashSet::new();
    for _ in 0..PER_KEY / 10 {
        for k in 0..KEYS {
            committed.extend(
                aggregates
                    .write(&table.pool, &outbox, &topic, &format!("k{k}"), 10, true)
                    .unwrap(),
            );
        }
    }
    let total = KEYS * PER_KEY as usize;

    // The victim: a separate process, killed after Kafka acknowledged its batch and
    // before it could mark it: the test holds row locks on the batch, so the victim's
    // mark waits, and then the victim dies. Those messages must be published again.
    let (mut victim, owner) = spawn_relay(&table.name, "victim", "", &[]);
    assert!(owner.starts_with("victim#"), "{owner}");
    let mut blocker = table.conn();
    let mut leased_rows = 0;
    assert!(
        wait_for(Duration::from_secs(30), || {
            if table.count("state = 1") < 200 {
                return false;
            }
            blocker.query_drop("BEGIN").unwrap();
            let ids: Vec<u64> = blocker
                .exec(
                    format!(
                        "SELECT id FROM `{}` WHERE {} FOR UPDATE",
                        table.name,
                        leased_by(&owner)
                    ),
                    (),
                )
                .unwrap();
            leased_rows = ids.len();
            if leased_rows == 0 {
                blocker.query_drop("ROLLBACK").unwrap();
            }
            leased_rows > 0
        }),
        "the victim is draining"
    );
    let marking = format!("UPDATE `{}` SET state = 1%", table.name);
    let mut marker = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            marker = table
                .conn()
                // Held back by the blocker's locks, not merely running: a mark of an
                // earlier batch that is not blocked ends in milliseconds, and the victim
                // would finish it. (MariaDB does not list such a wait in INNODB_TRX.)
                .exec_first(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE ? AND TIME >= 1",
                    (&marking,),
                )
                .unwrap();
            marker.is_some()
        }),
        "the victim published its batch and waits to mark it"
    );
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    // The server would still run the dead client's waiting UPDATE: end it too, as a
    // crash before the statement reached the server would.
    let marker: u64 = marker.unwrap();
    table
        .conn()
        .query_drop(format!("KILL CONNECTION {marker}"))
        .unwrap();
    blocker.query_drop("ROLLBACK").unwrap();
    let in_flight: HashSet<String> = table
        .conn()
        .exec_map(
            format!(
                "SELECT HEX(message_id) FROM `{}` WHERE {}",
                table.name,
                leased_by(&owner)
            ),
            (),
            |hex: String| hex,
        )
        .unwrap()
        .into_iter()
        .map(|hex| {
            outbox::uuid::Uuid::parse_str(&hex)
                .unwrap()
                .hyphenated()
                .to_string()
        })
        .collect();
    assert!(!in_flight.is_empty(), "killed in the middle of a batch");
    let delivered_by_victim = table.count("state = 1");
    assert!((delivered_by_victim as usize) < total, "work was left");

    // The survivors: another process and a dispatcher thread.
    let (mut survivor, _) = spawn_relay(&table.name, "survivor", "", &[]);
    let settings = DispatcherSettings {
        batch_size: 50,
        ..fast_settings()
    };
    let thread_dispatcher = table.dispatch(broker(), settings, "survivor-thread");

    let got = consume_ids(
        &topic,
        &committed,
        Duration::from_secs(120),
        Duration::from_secs(2),
    );
    assert!(wait_for(Duration::from_secs(60), || table
        .count("state = 1")
        == total as u64));
    let counts = id_counts(&got);
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        committed,
        "every committed message arrived"
    );
    let duplicated: Vec<_> = counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        duplicated.iter().all(|id| in_flight.contains(id)),
        "only messages the victim had in flight may arrive twice: {duplicated:?} vs {in_flight:?}"
    );
    // The victim may hold two batches (one being marked, the next being published):
    // the first was acknowledged for sure, the second perhaps.
    assert!(
        !duplicated.is_empty() && duplicated.len() <= leased_rows,
        "the batch Kafka acknowledged but the victim never marked is published again \
         ({} of {leased_rows} leased)",
        duplicated.len()
    );
    assert_commit_order(
        &versions_read(&got),
        &aggregates.versions(&table.pool),
        true,
    );
    eprintln!(
        "killed with {} rows leased and {delivered_by_victim} delivered; {} messages arrived twice",
        in_flight.len(),
        duplicated.len()
    );

    drop(survivor.stdin.take()); // closing stdin is the graceful stop
    let status = survivor.wait().unwrap();
    assert!(status.success(), "the survivor stops cleanly: {status}");
    assert_eq!(table.count("locked_by <> 0"), 0);
    drop(thread_dispatcher);
    aggregates.drop_table(&table.pool);
}
