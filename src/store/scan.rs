//! Which pending rows a claim chooses: the scan queries, read in one snapshot, whose rows
//! [`pick`] sorts by the per-key order rule. Nothing is locked here.

use std::time::Duration;

use mysql::prelude::{FromRow, Queryable};
use mysql::{FromRowError, Row, Transaction};
use parking_lot::Mutex;

use super::claim::{pick, retry_cap, Candidate};
use super::sql::{behind_dead, micros, scheduled, DEAD, PENDING};
use crate::error::Result;

/// What [`choose`] found.
pub(super) struct Chosen {
    /// The rows to claim, in id order.
    pub rows: Vec<Candidate>,
    /// Whether claiming again at once would find more.
    pub more: bool,
    /// No row of the table was pending at all when it was read.
    pub none_pending: bool,
}

/// How recent a lease must be for the claim to count its row as being published. A
/// dispatcher settles its batches within the broker's delivery timeout, usually within
/// milliseconds; a lease older than this may belong to a dispatcher that died.
const FRESH_LEASE: Duration = Duration::from_secs(10);
/// Most windows the head reads past delayed rows not due (see [`choose`]).
const HEAD_WINDOWS: usize = 16;
/// A row as the claim's scan reads it, in the order of its query's columns. A row neither
/// ready nor in flight holds its key back for longer than a delivery.
struct ScanRow {
    id: u64,
    topic: String,
    key: Option<Vec<u8>>,
    /// Ready to take: unleased, due, and not behind a dead row when dead rows block keys.
    ready: bool,
    /// Unleased, or leased longer than [`FRESH_LEASE`] ago.
    idle: bool,
    /// Tried before.
    retry: bool,
    /// A delayed message not due yet: it waits on purpose, and is no reason to sweep.
    /// Read by the head's query; false in the windows past it.
    scheduled: bool,
}

impl FromRow for ScanRow {
    fn from_row_opt(row: Row) -> std::result::Result<Self, FromRowError> {
        let (id, topic, key, ready, idle, retry, scheduled) = mysql::from_row_opt(row)?;
        Ok(ScanRow {
            id,
            topic,
            key,
            ready,
            idle,
            retry,
            scheduled,
        })
    }
}

impl ScanRow {
    fn candidate(self) -> Candidate {
        Candidate {
            id: self.id,
            key: self.key.map(|key| (self.topic, key)),
            ready: self.ready,
            retry: self.retry,
        }
    }
}

/// Chooses the rows to claim, without locking anything yet.
///
/// The first read takes the oldest `window` pending rows in id order, in one snapshot,
/// and [`pick`] applies the order rule to them: every older pending row of a key is in
/// that read, so runs of one key can be taken whole. Delayed rows not due yet are read
/// too (they hold their keys), but do not count toward the window. When that does not
/// fill the batch and some of those rows hold their keys back without being in flight (backing
/// off after a failure, behind a dead message, or leased more than [`FRESH_LEASE`] ago
/// by a dispatcher that may have died), the claim also reads two more windows past
/// them: the next one of a sweep through the rest of the backlog, and the newest
/// pending rows. So a backlog of failing messages, however long, delays the others by
/// a bounded amount of work per claim, not by its length.
pub(super) fn choose(
    tx: &mut Transaction<'_>,
    table: &str,
    sweep: &Mutex<u64>,
    limit: usize,
    dead_blocks_key: bool,
) -> Result<Chosen> {
    let window = (limit as u64).saturating_mul(2).max(1_000);
    let dead_before = if dead_blocks_key {
        format!("AND NOT {}", behind_dead(table))
    } else {
        String::new()
    };
    let head_sql = format!(
        "SELECT o.id, o.topic, o.msg_key, \
           (o.locked_by = 0 AND o.available_on <= UTC_TIMESTAMP(6) {dead_before}), \
           (o.locked_by = 0 OR o.locked_on <= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND), \
           o.number_of_attempts > 0, {} \
         FROM `{}` o WHERE o.state = {PENDING} AND o.id > ? ORDER BY o.id LIMIT ?",
        scheduled("o"),
        table
    );
    // The head holds every pending row up to its last, so that the order rule sees each
    // key's older rows. Delayed rows not due take no part of it: past a window partly
    // theirs it reads on, window after window, until it holds `window` other rows (or
    // the table's end, or HEAD_WINDOWS windows).
    let mut head: Vec<ScanRow> = Vec::new();
    let mut delayed = 0;
    // So many delayed rows ahead that the head gave up reading past them: the sweep
    // reads on from there.
    let mut gave_up = false;
    let mut scanned_all = false;
    for read in 1..=HEAD_WINDOWS {
        let from = head.last().map_or(0, |row| row.id);
        let rows: Vec<ScanRow> = tx.exec(&head_sql, (micros(FRESH_LEASE), from, window))?;
        scanned_all = (rows.len() as u64) < window;
        delayed += rows.iter().filter(|row| row.scheduled).count();
        head.extend(rows);
        if scanned_all || delayed == 0 || head.len() - delayed >= window as usize {
            break;
        }
        gave_up = read == HEAD_WINDOWS;
    }
    // Not ready, and not leased in the last FRESH_LEASE either; a delayed row only when
    // the head gave up reading past them.
    let stuck = head
        .iter()
        .any(|row| !row.ready && row.idle && (!row.scheduled || gave_up));
    let after_head = head.last().map_or(0, |row| row.id + 1);
    let head_len = head.len();
    let candidates: Vec<Candidate> = head.into_iter().map(ScanRow::candidate).collect();
    let mut retries = retry_cap(limit);
    let (picked, mut more) = pick(&candidates, limit, &mut retries);
    let mut chosen: Vec<Candidate> = picked.into_iter().cloned().collect();
    // Rows in flight elsewhere are about to free their keys: only rows that hold their
    // keys back for longer, or failed rows left by the cap, are a reason to read on.
    let capped = retries == 0 && more;
    if chosen.len() == limit || scanned_all || !(stuck || capped) {
        return Ok(Chosen {
            none_pending: head_len == 0,
            rows: chosen,
            more,
        });
    }

    let newest: Option<u64> = tx.exec_first(
        format!(
            "SELECT MIN(id) FROM (SELECT id FROM `{}` WHERE state = {PENDING} \
             ORDER BY id DESC LIMIT ?) newest",
            table
        ),
        (window,),
    )?;
    let tail_start = newest.unwrap_or(after_head).max(after_head);
    let sweep_start = {
        let from = *sweep.lock();
        if (after_head..tail_start).contains(&from) {
            from
        } else {
            after_head
        }
    };
    let blocking = if dead_blocks_key {
        format!("({PENDING}, {DEAD})")
    } else {
        format!("({PENDING})")
    };
    let past_head_sql = format!(
        "SELECT o.id, o.topic, o.msg_key, \
           (o.locked_by = 0 AND o.available_on <= UTC_TIMESTAMP(6) {dead_before} \
            AND (o.msg_key IS NULL OR NOT EXISTS ( \
              SELECT 1 FROM `{t}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
                AND p.state IN {blocking} AND p.id < ?))), \
           FALSE, o.number_of_attempts > 0, FALSE \
         FROM `{t}` o WHERE o.state = {PENDING} AND o.id >= ? AND o.id < ? \
         ORDER BY o.id LIMIT ?",
        t = table
    );
    for (start, end) in [(sweep_start, tail_start), (tail_start, u64::MAX)] {
        if start >= end || chosen.len() == limit {
            continue;
        }
        // A row is ready here only if no older row of its key, before this window,
        // holds it back; the rows of a key inside the window follow the run rule.
        let rows: Vec<ScanRow> = tx.exec(&past_head_sql, (start, start, end, window))?;
        if end == tail_start {
            let next = match rows.last() {
                Some(last) if rows.len() as u64 == window => last.id + 1,
                _ => 0,
            };
            *sweep.lock() = next;
        }
        let candidates: Vec<Candidate> = rows.into_iter().map(ScanRow::candidate).collect();
        let (picked, more_here) = pick(&candidates, limit - chosen.len(), &mut retries);
        chosen.extend(picked.into_iter().cloned());
        more |= more_here;
    }
    Ok(Chosen {
        rows: chosen,
        more,
        none_pending: false,
    })
}
