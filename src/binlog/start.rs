//! Where a session starts: the saved position, or, when there is none or it is gone,
//! the log's end after publishing what is pending from the table with the polling
//! relay's claim.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::Conn;

use super::fence::Fence;
use super::lock::ping;
use super::position::{self, Position};
use super::server;
use super::worker::{Key, Tail};
use crate::broker::Broker;
use crate::dispatcher::relay::Relay;
use crate::error::Result;
use crate::store::sql::{behind_dead, behind_scheduled, scheduled, DEAD, PENDING};

impl Tail {
    /// Where this session reads the binary log from, and the newest id below which the
    /// rows it reads may have been settled already: the saved position when it is this
    /// server's and still there, or else the log's end after a catch-up from the table.
    /// `None` on the stop signal during the catch-up.
    pub(super) fn start(
        &self,
        broker: &mut impl Broker,
        lock: &mut Conn,
        fence: &Fence,
        table: &str,
    ) -> Result<Option<(Position, u64)>> {
        let saved = position::load(lock, table)?;
        let files = server::files(lock)?;
        let start = match saved {
            Some((at, server)) if server == self.server.server_id && files.contains(&at.file) => {
                log::info!("binlog relay {} resumes at {at}", self.owner);
                let high = settled_high(lock, table)?;
                (at, high)
            }
            other => {
                match other {
                    // Server 0: written before a first catch-up that did not finish.
                    None | Some((_, 0)) => log::info!(
                        "binlog relay {}: no saved position; catching up from the table",
                        self.owner
                    ),
                    Some((at, server)) if server != self.server.server_id => log::warn!(
                        "binlog relay {}: the saved position {at} is on server {server}, not on \
                         this one ({}): after a failover; catching up from the table",
                        self.owner,
                        self.server.server_id
                    ),
                    Some((at, _)) => log::warn!(
                        "binlog relay {}: the saved position {at} is no longer on the server \
                         (purged); catching up from the table",
                        self.owner
                    ),
                }
                let at = server::current(lock)?;
                // A transaction the log holds before `at` may not be visible yet, and then
                // neither the catch-up nor the log from `at` would publish it. Commits
                // become visible in the order of the log: once a commit of our own after
                // `at` returns, every one before `at` is visible.
                position::touch(lock, table, &at, &self.owner)?;
                let high = max_id(lock, table)?;
                if !self.catch_up(broker, lock, fence, high)? {
                    return Ok(None);
                }
                // The catch-up may have published rows committed after `at`, which the
                // binary log brings again.
                let high = settled_high(lock, table)?;
                position::save(lock, table, &at, None, &self.owner)?;
                log::info!("binlog relay {} caught up; follows from {at}", self.owner);
                (at, high)
            }
        };
        Ok(Some(start))
    }

    /// Publishes what is pending with the polling relay's claim until nothing is left
    /// that may be sent (rows up to `high`, the newest when the catch-up began). False
    /// on the stop signal.
    /// The catch-up's claims lease their rows, as the polling relay's do: it needs no
    /// fence, but keeps the lock's connection from looking idle to the server.
    fn catch_up(
        &self,
        broker: &mut impl Broker,
        lock: &mut Conn,
        fence: &Fence,
        high: u64,
    ) -> Result<bool> {
        let mut relay = Relay {
            store: self.store.clone(),
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            signals: self.signals.clone(),
            held: Default::default(),
            meter: self.meter.clone(),
            handoff: None,
        };
        let table = self.store.table();
        let blocked_rule = if self.settings.dead_blocks_key {
            format!("AND (o.msg_key IS NULL OR NOT {})", behind_dead(table))
        } else {
            String::new()
        };
        // Delayed rows not due, and the rows of their keys after them, are the schedule's
        // (`delayed`), read back when the session starts.
        let left = format!(
            "SELECT EXISTS (SELECT 1 FROM `{table}` o WHERE o.state = {PENDING} AND o.id <= ? \
             {blocked_rule} AND NOT {} AND (o.msg_key IS NULL OR NOT {}))",
            scheduled("o"),
            behind_scheduled(table)
        );
        let mut caught = 0;
        loop {
            if self.signals.stopped() {
                return Ok(false);
            }
            if fence.due_for_ping() {
                let sent = Instant::now();
                ping(lock)?;
                fence.proved(sent);
            }
            let round = relay.round(broker)?;
            caught += round.delivered;
            if round.claimed > 0 {
                continue;
            }
            let more: Option<bool> = lock.exec_first(&left, (high,))?;
            if !more.unwrap_or(false) {
                log::info!(
                    "binlog relay {}: catch-up published {caught} messages",
                    self.owner
                );
                return Ok(true);
            }
            // Rows backing off after a failure, or leased by a relay that died.
            self.signals
                .pause(self.settings.backoff_min.min(Duration::from_secs(1)));
        }
    }
}

/// The keys of the table's dead rows.
pub(super) fn dead_keys(conn: &mut Conn, table: &str) -> Result<HashSet<Key>> {
    let rows: Vec<(String, Vec<u8>)> = conn.query(format!(
        "SELECT DISTINCT topic, msg_key FROM `{table}` WHERE state = {DEAD} AND msg_key IS NOT NULL"
    ))?;
    Ok(rows.into_iter().collect())
}

/// The newest id of a row no longer pending (delivered, dead or discarded), 0 when there
/// is none: rows the binary log brings up to it may have been settled already (by a
/// catch-up, a polling relay, or a relay that died between a mark and the position
/// after it), and are looked up before they are sent. Each state's newest id is one
/// index lookup.
fn settled_high(conn: &mut Conn, table: &str) -> Result<u64> {
    let newest =
        |state: u8| format!("COALESCE((SELECT MAX(id) FROM `{table}` WHERE state = {state}), 0)");
    let id: Option<u64> = conn.query_first(format!(
        "SELECT GREATEST({}, {}, {})",
        newest(1),
        newest(2),
        newest(3)
    ))?;
    Ok(id.unwrap_or(0))
}

/// The table's newest id, 0 when it is empty.
fn max_id(conn: &mut Conn, table: &str) -> Result<u64> {
    let id: Option<Option<u64>> = conn.query_first(format!("SELECT MAX(id) FROM `{table}`"))?;
    Ok(id.flatten().unwrap_or(0))
}
