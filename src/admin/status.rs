//! How far behind the outbox is, in all and per topic, and who holds leases.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

use mysql::prelude::Queryable;
use serde_json::{json, Value as Json};

use super::Admin;
use crate::error::{Error, Result};
use crate::store::backlog::{blocked_keys, blocked_sql, pending_groups, pending_sql};
use crate::store::sql::{micros, release_leased, DEAD, DELIVERED, DISCARDED, PENDING};
use crate::store::MySqlStore;
use crate::time::{age, age_of, rfc3339, seconds};

/// How many messages are in each state, and how old the oldest pending one is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Not yet delivered, dead or discarded: the work to do.
    pub pending: u64,
    /// Of the pending: unleased and waiting out the backoff after a failed send.
    pub backing_off: u64,
    /// Of the pending: delayed messages whose time has not come
    /// ([`Message::deliver_after`](crate::Message::deliver_after)).
    pub scheduled: u64,
    /// Of the pending: leased by a dispatcher, being published.
    pub leased: u64,
    /// Delivered and not yet deleted by retention.
    pub delivered: u64,
    /// Out of attempts, waiting for an operator.
    pub dead: u64,
    /// Dead messages an operator discarded; no work, deleted by retention.
    pub discarded: u64,
    /// How late the oldest pending message is, by the database's clock: the relay's lag.
    /// A message is late from its add, or from the time a delayed message was due (one
    /// tried and failed, from its add); a scheduled message is not late. `None` when no
    /// pending message is due.
    pub lag: Option<Duration>,
    /// Keys whose oldest dead message has pending messages after it: held back while the
    /// relays run with `dead_blocks_key` (without it, those messages go on).
    pub blocked_keys: u64,
    /// Of the pending: those after a dead message of their key, in the keys counted by
    /// `blocked_keys`.
    pub blocked_pending: u64,
}

/// The counts of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStatus {
    /// The topic.
    pub topic: String,
    /// Its messages.
    pub counts: Counts,
}

/// A dispatcher's lease owner, as the table knows it: the high 32 bits of its leases
/// ([`MySqlStore::leases_of`]). Shown as 8 hexadecimal digits; a dispatcher logs its own
/// at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner(u32);

impl Owner {
    /// The owner of the leases a dispatcher with this lease owner name takes
    /// ([`DispatcherHandle::owner`](crate::DispatcherHandle::owner), `name#suffix`).
    pub fn of(name: &str) -> Owner {
        Owner((MySqlStore::leases_of(name).start() >> 32) as u32)
    }

    /// An owner written as [`Owner`]'s `Display` gives it (8 hexadecimal digits), or else
    /// taken as a lease owner name. `None` for an empty text.
    pub fn parse(text: &str) -> Option<Owner> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if text.len() == 8 {
            if let Ok(token) = u32::from_str_radix(text, 16) {
                return Some(Owner(token));
            }
        }
        Some(Owner::of(text))
    }

    /// The values its leases take in `locked_by`.
    pub fn leases(self) -> RangeInclusive<u64> {
        let start = u64::from(self.0) << 32;
        start..=start | 0xffff_ffff
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The rows one owner holds leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Whose leases.
    pub owner: Owner,
    /// Rows leased.
    pub rows: u64,
    /// Age of its oldest lease, by the database's clock. A live dispatcher settles a
    /// lease within the broker's delivery timeout; one much older than that belongs to a
    /// dispatcher that stopped or hangs.
    pub oldest: Duration,
    /// Age of its newest lease: how long ago it last claimed.
    pub newest: Duration,
}

/// The state of an outbox table at one moment ([`Admin::status`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The table.
    pub table: String,
    /// When it was read, by the database's clock.
    pub at: SystemTime,
    /// All its messages.
    pub total: Counts,
    /// By topic, in name order.
    pub topics: Vec<TopicStatus>,
    /// Leases held, by owner, oldest lease first.
    pub leases: Vec<LeaseHolder>,
}

impl Admin {
    /// Counts by state, lag, the same per topic, and the leases held.
    ///
    /// Two queries, run at once on two connections: the counts of delivered, dead and
    /// discarded rows per topic read the `(topic, msg_key, state, id)` index end to end,
    /// never the table; the pending rows' detail reads only the pending rows, through
    /// `(state, id)`, and then the keys held back by dead messages, from the dead rows
    /// and their keys' pending rows. On a table of 1,000,000 rows it answers well within a
    /// second (`make bench` measures it).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when a query fails.
    pub fn status(&self) -> Result<Status> {
        let conns = self.store().connections();
        let table = self.table();
        let (settled, pending) = std::thread::scope(|scope| {
            let settled = std::thread::Builder::new()
                .name("outbox-status".into())
                .spawn_scoped(scope, || conns.with(|conn| settled_counts(conn, table)));
            let pending = conns.with(|conn| {
                let groups = pending_groups(conn, table)?;
                Ok((groups, blocked_keys(conn, table)?))
            });
            let settled = match settled {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|_| Err(Error::Thread(std::io::Error::other("panicked")))),
                // No thread to spare: one query after the other.
                Err(_) => conns.with(|conn| settled_counts(conn, table)),
            };
            (settled, pending)
        });
        let settled = settled?;
        let ((at, groups), blocked) = pending?;

        let mut topics: BTreeMap<String, Counts> = BTreeMap::new();
        for (topic, delivered, dead, discarded) in settled {
            let counts = topics.entry(topic).or_default();
            counts.delivered = delivered;
            counts.dead = dead;
            counts.discarded = discarded;
        }
        for held in blocked {
            let counts = topics.entry(held.topic).or_default();
            counts.blocked_keys = held.keys;
            counts.blocked_pending = held.pending;
        }
        let mut leases: BTreeMap<u32, LeaseHolder> = BTreeMap::new();
        for group in groups {
            let counts = topics.entry(group.topic).or_default();
            counts.pending += group.rows;
            counts.backing_off += group.backing_off;
            counts.scheduled += group.scheduled;
            if let Some(oldest) = group.oldest_row {
                let lag = age(oldest);
                counts.lag = Some(counts.lag.map_or(lag, |other| other.max(lag)));
            }
            if group.owner != 0 {
                counts.leased += group.rows;
                let holder = leases.entry(group.owner).or_insert(LeaseHolder {
                    owner: Owner(group.owner),
                    rows: 0,
                    oldest: Duration::ZERO,
                    newest: Duration::MAX,
                });
                holder.rows += group.rows;
                holder.oldest = holder.oldest.max(age(group.oldest_lease));
                holder.newest = holder.newest.min(age(group.newest_lease));
            }
        }
        let mut total = Counts::default();
        for counts in topics.values() {
            total.pending += counts.pending;
            total.backing_off += counts.backing_off;
            total.scheduled += counts.scheduled;
            total.leased += counts.leased;
            total.delivered += counts.delivered;
            total.dead += counts.dead;
            total.discarded += counts.discarded;
            total.blocked_keys += counts.blocked_keys;
            total.blocked_pending += counts.blocked_pending;
            total.lag = total.lag.max(counts.lag);
        }
        let mut leases: Vec<LeaseHolder> = leases.into_values().collect();
        leases.sort_by_key(|holder| std::cmp::Reverse(holder.oldest));
        Ok(Status {
            table: table.to_string(),
            at,
            total,
            topics: topics
                .into_iter()
                .map(|(topic, counts)| TopicStatus { topic, counts })
                .collect(),
            leases,
        })
    }

    /// The leases held, by owner, oldest lease first: what [`Admin::status`] reports,
    /// read from the leased rows alone.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the query fails.
    pub fn leases(&self) -> Result<Vec<LeaseHolder>> {
        let rows: Vec<(u32, u64, i64, i64)> = self.store().connections().with(|conn| {
            Ok(conn.query(format!(
                "SELECT locked_by >> 32, COUNT(*), {}, {} FROM `{}` FORCE INDEX (state_id) \
                 WHERE state = {PENDING} AND locked_by <> 0 GROUP BY locked_by >> 32",
                age_of("MIN(locked_on)"),
                age_of("MAX(locked_on)"),
                self.table()
            ))?)
        })?;
        let mut leases: Vec<LeaseHolder> = rows
            .into_iter()
            .map(|(owner, rows, oldest, newest)| LeaseHolder {
                owner: Owner(owner),
                rows,
                oldest: age(oldest),
                newest: age(newest),
            })
            .collect();
        leases.sort_by_key(|holder| std::cmp::Reverse(holder.oldest));
        Ok(leases)
    }

    /// Releases every row `owner` holds leased, so that other dispatchers take them at
    /// once instead of after `max_lock_duration`. For a dispatcher known to be gone: a
    /// live one loses its batches in flight (its writes to them are fenced off), and
    /// their messages may be published twice. Returns how many rows were released.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the update fails.
    pub fn release_leases(&self, owner: Owner) -> Result<u64> {
        let leases = owner.leases();
        let released = self.store().connections().with(|conn| {
            release_leased(
                conn,
                self.table(),
                "locked_by BETWEEN ? AND ?",
                &[
                    mysql::Value::from(*leases.start()),
                    mysql::Value::from(*leases.end()),
                ],
            )
        })?;
        if released > 0 {
            log::warn!(
                "released {released} rows of `{}` leased by owner {owner}",
                self.table()
            );
        }
        Ok(released)
    }

    /// Messages delivered in the last `window` (by the database's clock), by topic: the
    /// rate `outbox status --watch` shows. Reads the rows delivered in that window.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the query fails.
    pub fn delivered_in_last(&self, window: Duration) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, u64)> = self.store().connections().with(|conn| {
            Ok(conn.exec(
                format!(
                    "SELECT topic, COUNT(*) FROM `{}` FORCE INDEX (state_processed) \
                     WHERE state = {DELIVERED} \
                       AND processed_on >= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
                     GROUP BY topic",
                    self.table()
                ),
                (micros(window),),
            )?)
        })?;
        Ok(rows.into_iter().collect())
    }

    /// The server's plan for each query of [`Admin::status`], one line per table access
    /// (`EXPLAIN`'s table, type, key and extra columns): for checking that they read
    /// indexes on a given server.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when `EXPLAIN` fails.
    pub fn explain_status(&self) -> Result<Vec<String>> {
        let table = self.table();
        self.store().connections().with(|conn| {
            // MySQL 9 answers a plain EXPLAIN as a tree, in one column; MariaDB knows no
            // FORMAT=TRADITIONAL.
            let version: Option<String> = conn.query_first("SELECT VERSION()")?;
            let explain = if version.is_some_and(|v| v.contains("MariaDB")) {
                "EXPLAIN"
            } else {
                "EXPLAIN FORMAT=TRADITIONAL"
            };
            let mut lines = Vec::new();
            for sql in [settled_sql(table), pending_sql(table), blocked_sql(table)] {
                let plan: Vec<mysql::Row> = conn.query(format!("{explain} {sql}"))?;
                for row in plan {
                    let column = |name: &str| -> String {
                        row.get_opt::<Option<String>, _>(name)
                            .and_then(|value| value.ok())
                            .flatten()
                            .unwrap_or_else(|| "NULL".into())
                    };
                    lines.push(format!(
                        "table={} type={} key={} rows={} extra={}",
                        column("table"),
                        column("type"),
                        column("key"),
                        column("rows"),
                        column("Extra")
                    ));
                }
            }
            Ok(lines)
        })
    }
}

/// Delivered, dead and discarded rows by topic, from the covering index on topic and
/// state; pending rows are counted by `pending_sql` (in the store).
fn settled_sql(table: &str) -> String {
    format!(
        "SELECT topic, CAST(SUM(state = {DELIVERED}) AS UNSIGNED), \
           CAST(SUM(state = {DEAD}) AS UNSIGNED), CAST(SUM(state = {DISCARDED}) AS UNSIGNED) \
         FROM `{table}` FORCE INDEX (key_order) GROUP BY topic"
    )
}

fn settled_counts(
    conn: &mut mysql::PooledConn,
    table: &str,
) -> Result<Vec<(String, u64, u64, u64)>> {
    Ok(conn.query(settled_sql(table))?)
}

impl Counts {
    /// As JSON: `{"pending": n, "backing_off": n, "scheduled": n, "leased": n,
    /// "delivered": n, "dead": n, "discarded": n, "lag_seconds": x or null,
    /// "blocked_keys": n, "blocked_pending": n}`.
    pub fn to_json(&self) -> Json {
        json!({
            "pending": self.pending,
            "backing_off": self.backing_off,
            "scheduled": self.scheduled,
            "leased": self.leased,
            "delivered": self.delivered,
            "dead": self.dead,
            "discarded": self.discarded,
            "lag_seconds": self.lag.map(seconds),
            "blocked_keys": self.blocked_keys,
            "blocked_pending": self.blocked_pending,
        })
    }
}

impl LeaseHolder {
    /// As JSON: `{"owner": "8 hex digits", "rows": n, "oldest_seconds": x,
    /// "newest_seconds": x}`.
    pub fn to_json(&self) -> Json {
        json!({
            "owner": self.owner.to_string(),
            "rows": self.rows,
            "oldest_seconds": seconds(self.oldest),
            "newest_seconds": seconds(self.newest),
        })
    }
}

impl Status {
    /// As JSON: `{"table", "at" (RFC 3339), "total": counts, "topics": [{"topic", ...counts}],
    /// "leases": [lease holder]}`, with counts as [`Counts::to_json`].
    pub fn to_json(&self) -> Json {
        let topics: Vec<Json> = self
            .topics
            .iter()
            .map(|topic| {
                let mut counts = topic.counts.to_json();
                if let Json::Object(fields) = &mut counts {
                    fields.insert("topic".into(), Json::from(topic.topic.as_str()));
                }
                counts
            })
            .collect();
        json!({
            "table": self.table,
            "at": rfc3339(self.at),
            "total": self.total.to_json(),
            "topics": topics,
            "leases": self.leases.iter().map(LeaseHolder::to_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_the_high_bits_of_their_leases_and_parse_from_either_form() {
        let owner = Owner::of("orders-1#0a1b2c3d");
        assert_eq!(owner.leases(), MySqlStore::leases_of("orders-1#0a1b2c3d"));
        let shown = owner.to_string();
        assert_eq!(shown.len(), 8);
        assert_eq!(Owner::parse(&shown), Some(owner));
        assert_eq!(Owner::parse(" orders-1#0a1b2c3d "), Some(owner));
        assert_eq!(Owner::parse(""), None);
        assert_eq!(Owner::parse("0000002a"), Some(Owner(42)));
    }
}
