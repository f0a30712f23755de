//! What is pending and dead in the table, read through indexes only: the dispatcher's
//! gauges read it, and `outbox status` its pending part.

use std::collections::BTreeMap;
use std::time::SystemTime;

use mysql::prelude::{FromRow, Queryable};
use mysql::{FromRowError, Row};

use super::sql::{scheduled, DEAD, PENDING};

use crate::error::Result;
use crate::metrics::{Backlog, TopicBacklog};
use crate::time::{age, age_of, micros_of, time};

/// The pending rows of one topic under one lease owner, as [`pending_sql`] reads them.
/// Ages are in microseconds of the database's clock.
pub(crate) struct PendingGroup {
    pub topic: String,
    /// The owner part of the lease (0: not leased).
    pub owner: u32,
    pub rows: u64,
    /// Unleased rows waiting out a retry back-off.
    pub backing_off: u64,
    /// Delayed rows whose time has not come ([`scheduled`]).
    pub scheduled: u64,
    /// The age of the oldest row that is due: `None` when every row is scheduled.
    pub oldest_row: Option<i64>,
    pub oldest_lease: i64,
    pub newest_lease: i64,
}

impl FromRow for PendingGroup {
    fn from_row_opt(row: Row) -> std::result::Result<Self, FromRowError> {
        let (topic, owner, rows, backing_off, scheduled, oldest_row, oldest_lease, newest_lease) =
            mysql::from_row_opt(row)?;
        Ok(PendingGroup {
            topic,
            owner,
            rows,
            backing_off,
            scheduled,
            oldest_row,
            oldest_lease,
            newest_lease,
        })
    }
}

/// Pending rows by topic and lease owner, through the `(state, id)` index: without the
/// hint, the optimizer may prefer reading the whole per-key index in topic order (measured:
/// 28 s instead of 0.2 s on 1,000,000 rows). A row is late from the time it was due: its
/// add, or the time a delayed message was set for (or a replay, which makes a row new
/// again); a row tried before, from its add. Scheduled rows are not late at all.
pub(crate) fn pending_sql(table: &str) -> String {
    let scheduled = scheduled("");
    format!(
        "SELECT topic, locked_by >> 32, COUNT(*), \
           CAST(SUM(locked_by = 0 AND number_of_attempts > 0 AND available_on > UTC_TIMESTAMP(6)) \
             AS UNSIGNED), \
           CAST(SUM({scheduled}) AS UNSIGNED), \
           {}, {}, {} \
         FROM `{table}` FORCE INDEX (state_id) WHERE state = {PENDING} \
         GROUP BY topic, locked_by >> 32",
        age_of(&format!(
            "MIN(IF({scheduled}, NULL, \
               IF(number_of_attempts = 0, GREATEST(created_on, available_on), created_on)))"
        )),
        age_of("MIN(locked_on)"),
        age_of("MAX(locked_on)"),
    )
}

/// The table's backlog for the dispatcher's gauges: the pending rows' groups (through
/// `(state, id)`), the dead rows by topic (through `(state, processed_on)`) and the keys
/// they hold back ([`blocked_sql`]), never the delivered rows.
pub(crate) fn backlog(conn: &mut mysql::PooledConn, table: &str) -> Result<Backlog> {
    let before = SystemTime::now();
    let (database_now, groups) = pending_groups(conn, table)?;
    let after = SystemTime::now();
    let dead: Vec<(String, u64)> = conn.query(format!(
        "SELECT topic, COUNT(*) FROM `{table}` FORCE INDEX (state_processed) \
         WHERE state = {DEAD} GROUP BY topic"
    ))?;
    let blocked = blocked_keys(conn, table)?;
    let mut topics: BTreeMap<String, TopicBacklog> = BTreeMap::new();
    let mut leased = 0;
    for group in groups {
        let entry = topics
            .entry(group.topic.clone())
            .or_insert_with(|| TopicBacklog {
                topic: group.topic,
                ..Default::default()
            });
        entry.pending += group.rows;
        entry.scheduled += group.scheduled;
        if let Some(oldest) = group.oldest_row {
            let lag = age(oldest);
            entry.lag = Some(entry.lag.map_or(lag, |other| other.max(lag)));
        }
        if group.owner != 0 {
            leased += group.rows;
        }
    }
    for (topic, rows) in dead {
        topics
            .entry(topic.clone())
            .or_insert_with(|| TopicBacklog {
                topic,
                ..Default::default()
            })
            .dead = rows;
    }
    for held in blocked {
        topics
            .entry(held.topic.clone())
            .or_insert_with(|| TopicBacklog {
                topic: held.topic,
                ..Default::default()
            })
            .blocked_keys = held.keys;
    }
    let read_at = before + after.duration_since(before).unwrap_or_default() / 2;
    Ok(Backlog {
        topics: topics.into_values().collect(),
        leased,
        database_now,
        read_at,
    })
}

/// The database's clock, and the pending rows' groups.
pub(crate) fn pending_groups(
    conn: &mut mysql::PooledConn,
    table: &str,
) -> Result<(SystemTime, Vec<PendingGroup>)> {
    let now: Option<i64> = conn.query_first(format!("SELECT {}", micros_of("UTC_TIMESTAMP(6)")))?;
    let groups = conn.query(pending_sql(table))?;
    Ok((time(now.unwrap_or_default()), groups))
}

/// The keys of one topic held back by a dead message, as [`blocked_sql`] reads them.
pub(crate) struct BlockedKeys {
    pub topic: String,
    /// Keys whose oldest dead message has pending messages after it.
    pub keys: u64,
    /// Those pending messages.
    pub pending: u64,
}

/// Keys held back by a dead message, by topic: the keys whose oldest dead row has
/// pending rows after it, and how many. The dead rows are read through
/// `(state, processed_on)`, and each one's key through `(topic, msg_key, state, id)`: the
/// work grows with the dead rows, not the table. Such keys are held back while the relays
/// run with `dead_blocks_key`; without it, their later messages go on.
pub(crate) fn blocked_sql(table: &str) -> String {
    format!(
        "SELECT b.topic, COUNT(*), CAST(SUM(b.waiting) AS UNSIGNED) FROM ( \
           SELECT d.topic, (SELECT COUNT(*) FROM `{table}` p FORCE INDEX (key_order) \
               WHERE p.topic = d.topic AND p.msg_key = d.msg_key AND p.state = {PENDING} \
                 AND p.id > d.first) AS waiting \
           FROM (SELECT topic, msg_key, MIN(id) AS first FROM `{table}` \
                 FORCE INDEX (state_processed) WHERE state = {DEAD} AND msg_key IS NOT NULL \
                 GROUP BY topic, msg_key) d \
         ) b WHERE b.waiting > 0 GROUP BY b.topic"
    )
}

/// The keys held back by a dead message, by topic ([`blocked_sql`]).
pub(crate) fn blocked_keys(conn: &mut mysql::PooledConn, table: &str) -> Result<Vec<BlockedKeys>> {
    Ok(
        conn.query_map(blocked_sql(table), |(topic, keys, pending)| BlockedKeys {
            topic,
            keys,
            pending,
        })?,
    )
}
