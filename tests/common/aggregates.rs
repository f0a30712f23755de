//! Writers of business rows and their events, and the checks of the order consumers
//! read them in.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use outbox::MySqlStore;

use super::*;

/// A small deterministic random number generator (xorshift64*), so tests need no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// A business table of aggregates `k0..k{n-1}`, each with a version. Every event is
/// written in the transaction that bumps its aggregate's version under a row lock, as an
/// application would: per key, version order is commit order.
pub struct Aggregates {
    pub table: String,
}

impl Aggregates {
    pub fn new(pool: &mysql::Pool, keys: usize) -> Aggregates {
        let table = unique("agg");
        let mut conn = pool.get_conn().unwrap();
        conn.query_drop(format!(
            "CREATE TABLE `{table}` (k VARCHAR(64) PRIMARY KEY, version INT UNSIGNED NOT NULL) ENGINE=InnoDB"
        ))
        .unwrap();
        let rows: Vec<String> = (0..keys).map(|i| format!("('k{i}', 0)")).collect();
        conn.query_drop(format!("INSERT INTO `{table}` VALUES {}", rows.join(", ")))
            .unwrap();
        Aggregates { table }
    }

    /// One business transaction on `key`: `n` events with the next versions, committed
    /// or rolled back, through `Outbox::add_all`. Returns the message ids. The payload of
    /// each event is `key:version`.
    pub fn write(
        &self,
        pool: &mysql::Pool,
        outbox: &outbox::Outbox,
        topic: &str,
        key: &str,
        n: u32,
        commit: bool,
    ) -> Result<Vec<String>, outbox::Error> {
        let mut tx = pool.start_transaction(mysql::TxOpts::default())?;
        let ids = self.bump(&mut tx, topic, key, n, |tx, messages| {
            outbox.add_all(tx, messages)
        })?;
        if commit {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(ids)
    }

    /// As [`write`](Aggregates::write), in an `OutboxTransaction` (the messages ride on
    /// the COMMIT) on a connection from `outbox`'s store.
    pub fn write_on_commit(
        &self,
        outbox: &outbox::Outbox,
        topic: &str,
        key: &str,
        n: u32,
        commit: bool,
    ) -> Result<Vec<String>, outbox::Error> {
        let mut tx = outbox.start_transaction(mysql::TxOpts::default())?;
        let ids = self.bump(&mut tx, topic, key, n, |tx, messages| tx.add_all(messages))?;
        if commit {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(ids)
    }

    /// Locks `key`'s row, adds `n` events with the next versions through `add`, and
    /// writes the new version.
    fn bump<Q: Queryable>(
        &self,
        tx: &mut Q,
        topic: &str,
        key: &str,
        n: u32,
        add: impl FnOnce(&mut Q, &[outbox::Message]) -> outbox::Result<Vec<uuid::Uuid>>,
    ) -> Result<Vec<String>, outbox::Error> {
        let version: u32 = tx
            .exec_first(
                format!(
                    "SELECT version FROM `{}` WHERE k = ? FOR UPDATE",
                    self.table
                ),
                (key,),
            )?
            .unwrap_or(0);
        let messages: Vec<_> = (1..=n)
            .map(|i| outbox::Message::new(topic, format!("{key}:{}", version + i)).with_key(key))
            .collect();
        let ids = add(tx, &messages)?;
        tx.exec_drop(
            format!("UPDATE `{}` SET version = ? WHERE k = ?", self.table),
            (version + n, key),
        )?;
        Ok(ids
            .into_iter()
            .map(|id| id.hyphenated().to_string())
            .collect())
    }

    /// Final version of every key.
    pub fn versions(&self, pool: &mysql::Pool) -> HashMap<String, u32> {
        pool.get_conn()
            .unwrap()
            .query_map(
                format!("SELECT k, version FROM `{}`", self.table),
                |(k, v)| (k, v),
            )
            .unwrap()
            .into_iter()
            .collect()
    }

    pub fn drop_table(&self, pool: &mysql::Pool) {
        let _ = pool
            .get_conn()
            .map(|mut c| c.query_drop(format!("DROP TABLE IF EXISTS `{}`", self.table)));
    }
}

/// Writes on `aggregates` from a thread of its own, a transaction every few
/// milliseconds, until `stop` is set; the ids committed.
pub fn keep_writing(
    pool: &mysql::Pool,
    store: &MySqlStore,
    aggregates: &Arc<Aggregates>,
    topic: &str,
    keys: u64,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<HashSet<String>> {
    let (pool, store, aggregates, topic, stop) = (
        pool.clone(),
        store.clone(),
        aggregates.clone(),
        topic.to_string(),
        stop.clone(),
    );
    std::thread::spawn(move || {
        let outbox = outbox::Outbox::new(&store);
        let mut rng = Rng::new(7);
        let mut committed = HashSet::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let key = format!("k{}", rng.below(keys));
            let ids = aggregates
                .write(&pool, &outbox, &topic, &key, 1 + rng.below(2) as u32, true)
                .unwrap();
            committed.extend(ids);
            std::thread::sleep(Duration::from_millis(20));
        }
        committed
    })
}

/// Versions per key in the order consumers read them, from `key:version` payloads.
pub fn versions_read(records: &[Consumed]) -> HashMap<String, Vec<u32>> {
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for r in records {
        let text = String::from_utf8(r.payload.clone()).unwrap();
        let (key, version) = text.rsplit_once(':').expect("key:version payload");
        assert_eq!(
            r.key.as_deref(),
            Some(key),
            "record key matches its payload"
        );
        per_key
            .entry(key.to_string())
            .or_default()
            .push(version.parse().unwrap());
    }
    per_key
}

/// Checks that each key's versions were read as 1, 2, ..., final, in order. With
/// `duplicates_allowed`, the sequence may also go back, to re-send a suffix: the only
/// step forward is always +1, so a re-sent suffix replays in order and nothing is
/// skipped (1 2 3 4 2 3 4 5 passes; 1 2 4 3 does not).
pub fn assert_commit_order(
    read: &HashMap<String, Vec<u32>>,
    finals: &HashMap<String, u32>,
    duplicates_allowed: bool,
) {
    for (key, &last) in finals {
        let seen = read.get(key).cloned().unwrap_or_default();
        if last == 0 {
            assert!(
                seen.is_empty(),
                "{key}: nothing was committed, read {seen:?}"
            );
            continue;
        }
        assert_eq!(
            seen.first(),
            Some(&1),
            "{key}: starts at version 1: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&last),
            "{key}: ends at version {last}: {seen:?}"
        );
        for pair in seen.windows(2) {
            let step = pair[1] as i64 - pair[0] as i64;
            let ok = step == 1 || (duplicates_allowed && step <= 0);
            assert!(ok, "{key}: read {} after {}: {seen:?}", pair[1], pair[0]);
        }
    }
}

/// Checks that each key's versions were first read as 1, 2, ..., final: nothing lost,
/// and no message published for the first time after a later one of its key. Copies
/// read again later (a batch whose publish outlived its relay's lock, say) pass.
pub fn assert_first_reads_in_order(
    read: &HashMap<String, Vec<u32>>,
    finals: &HashMap<String, u32>,
) {
    for (key, &last) in finals {
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u32> = read
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|v| seen.insert(*v))
            .collect();
        let expected: Vec<u32> = (1..=last).collect();
        assert_eq!(first, expected, "{key}: first reads, in order");
    }
}
