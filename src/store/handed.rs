//! Taking the rows commits handed over: read back by message id under their lease, each
//! key's order checked against the rows no one else holds.

use std::collections::{HashMap, HashSet};

use mysql::prelude::Queryable;
use mysql::{Params, PooledConn, Row, Value};
use uuid::Uuid;

use super::claim::{pick, Candidate};
use super::codec::{decode_record, RECORD_COLUMNS, RECORD_WIDTH};
use super::sql::{padded_with_last, placeholders, DEAD, MAX_ID_LIST, PENDING};
use crate::error::Result;
use crate::record::Record;

/// What [`read_handed`] found.
pub(super) struct Handed {
    /// The rows to publish, in id order.
    pub records: Vec<Record>,
    /// Rows under the lease that must go the claims' way: behind an older row of their
    /// key held elsewhere, or corrupt (a claim buries it).
    pub refused: Vec<u64>,
}

/// Reads the rows with message ids `ids` still pending under `lease` on `conn`, and sorts
/// them by the claim's order rule ([`pick`]): a row is held back when an older row of its
/// key is pending and not under `lease` (a claim's, unleased, delayed or backing off), or
/// dead when `dead_blocks_key`, and so are the later rows of its key.
pub(super) fn read_handed(
    conn: &mut PooledConn,
    table: &str,
    lease: u64,
    ids: &[Uuid],
    dead_blocks_key: bool,
) -> Result<Handed> {
    let dead = if dead_blocks_key {
        format!(" OR p.state = {DEAD}")
    } else {
        String::new()
    };
    let mut candidates: Vec<Candidate> = Vec::with_capacity(ids.len());
    let mut records: HashMap<u64, Record> = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_ID_LIST) {
        let chunk: Vec<Value> = padded_with_last(chunk)
            .iter()
            .map(|id| Value::from(id.as_bytes().to_vec()))
            .collect();
        let sql = format!(
            "SELECT {RECORD_COLUMNS}, (o.msg_key IS NOT NULL AND EXISTS (SELECT 1 FROM `{table}` p \
               WHERE p.topic = o.topic AND p.msg_key = o.msg_key AND p.id < o.id \
               AND ((p.state = {PENDING} AND p.locked_by <> ?){dead}))) \
             FROM `{table}` o WHERE o.message_id IN ({}) AND o.state = {PENDING} \
             AND o.locked_by = ?",
            placeholders(chunk.len())
        );
        let mut params = vec![Value::from(lease)];
        params.extend(chunk);
        params.push(Value::from(lease));
        let found: Vec<Row> = conn.exec(sql, Params::Positional(params))?;
        for mut row in found {
            let held_back: Option<bool> = row.take(RECORD_WIDTH);
            let id: Option<u64> = row.get(0);
            let topic: Option<String> = row.get(2);
            let key: Option<Option<Vec<u8>>> = row.get(3);
            let Some(id) = id else { continue };
            // A corrupt row is not taken: the claim that takes it buries it.
            let decoded = decode_record(row).ok();
            candidates.push(Candidate {
                id,
                key: key.flatten().map(|key| (topic.unwrap_or_default(), key)),
                ready: held_back == Some(false) && decoded.is_some(),
                retry: false,
            });
            records.extend(decoded.map(|record| (id, record)));
        }
    }
    candidates.sort_by_key(|candidate| candidate.id);
    let mut no_cap = usize::MAX;
    let (picked, _) = pick(&candidates, usize::MAX, &mut no_cap);
    let taken: Vec<u64> = picked.iter().map(|c| c.id).collect();
    let kept: HashSet<u64> = taken.iter().copied().collect();
    let refused = candidates
        .iter()
        .map(|c| c.id)
        .filter(|id| !kept.contains(id))
        .collect();
    Ok(Handed {
        records: taken.iter().filter_map(|id| records.remove(id)).collect(),
        refused,
    })
}
