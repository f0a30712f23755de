//! The SQL the store, the admin API and the binlog relay share: the row states,
//! identifiers, placeholders and padded id lists, and the statements that release leases
//! and bury corrupt rows.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{PooledConn, Value};

use crate::error::{Error, Result};

/// Longest table name MySQL accepts.
pub(crate) const MAX_TABLE_NAME_LEN: usize = 64;
/// Longest error text kept in a row (the `error` column's width).
const MAX_ERROR_LEN: usize = 1000;
/// Most ids in one `IN (...)` list.
pub(crate) const MAX_ID_LIST: usize = 1024;

/// The states of a row, as its `state` column holds them. The constants below are these
/// values, for SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RowState {
    /// Waiting to be published, or being published.
    Pending = 0,
    /// Published.
    Delivered = 1,
    /// Out of attempts, or no message at all: left to an operator.
    Dead = 2,
    /// A dead message an operator decided never to send: it holds back nothing, counts as
    /// no work, and retention deletes it with the delivered rows.
    Discarded = 3,
}

impl RowState {
    /// The state stored as `code`, if it is one this version knows.
    pub(crate) fn of(code: u8) -> Option<RowState> {
        [
            RowState::Pending,
            RowState::Delivered,
            RowState::Dead,
            RowState::Discarded,
        ]
        .into_iter()
        .find(|state| *state as u8 == code)
    }
}

pub(crate) const PENDING: u8 = RowState::Pending as u8;
pub(crate) const DELIVERED: u8 = RowState::Delivered as u8;
pub(crate) const DEAD: u8 = RowState::Dead as u8;
pub(crate) const DISCARDED: u8 = RowState::Discarded as u8;

/// Checks that `table` is a plain identifier of at most `max_len` characters.
pub(crate) fn validate_table_name(table: &str, max_len: usize) -> Result<()> {
    let mut chars = table.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || table.len() > max_len {
        return Err(Error::config(format!(
            "table name {table:?} is not a plain identifier (1 to {max_len} of A-Z a-z 0-9 _, \
             not starting with a digit)"
        )));
    }
    Ok(())
}

/// Releases the pending rows of `table` whose lease matches `condition` (SQL on the row,
/// with its `params`), without counting an attempt; returns how many. They are found by a
/// plain read and released by primary key, the condition checked again under each row's
/// lock. A locking scan of `state_id` would lock each index entry before its row, the
/// opposite of a mark (the row, then the entry it moves), and deadlock with a mark of
/// those rows; it would also wait on every pending row not yet committed.
pub(crate) fn release_leased(
    conn: &mut PooledConn,
    table: &str,
    condition: &str,
    params: &[Value],
) -> Result<u64> {
    let leased = format!("state = {PENDING} AND locked_by <> 0 AND {condition}");
    let find = format!("SELECT id FROM `{table}` WHERE {leased} ORDER BY id LIMIT {MAX_ID_LIST}");
    let mut released = 0;
    loop {
        let ids: Vec<u64> = conn.exec(&find, params.to_vec())?;
        if ids.is_empty() {
            return Ok(released);
        }
        let ids_params = padded(&ids);
        let release = format!(
            "UPDATE `{table}` FORCE INDEX (PRIMARY) SET locked_by = 0 \
             WHERE {leased} AND id IN ({})",
            placeholders(ids_params.len())
        );
        let mut all = params.to_vec();
        all.extend(ids_params);
        conn.exec_drop(release, all)?;
        let changed = conn.affected_rows();
        released += changed;
        // Fewer than a full list: none left. None changed: they changed under us, and
        // a later round takes them up.
        if ids.len() < MAX_ID_LIST || changed == 0 {
            return Ok(released);
        }
    }
}

/// `items` padded to a power of two (up to [`MAX_ID_LIST`]) by repeating the last: `IN`
/// lists and multi-row statements of a few fixed lengths let the connection reuse its
/// prepared statements, and a repeated id or row changes nothing.
pub(crate) fn padded_with_last<T: Clone>(items: &[T]) -> Vec<T> {
    let Some(last) = items.last() else {
        return Vec::new();
    };
    let mut padded = items.to_vec();
    if items.len() <= MAX_ID_LIST {
        padded.resize(items.len().next_power_of_two(), last.clone());
    }
    padded
}

/// `ids` as parameters, padded as [`padded_with_last`] pads.
pub(crate) fn padded(ids: &[u64]) -> Vec<Value> {
    padded_with_last(ids).into_iter().map(Value::from).collect()
}

/// SQL true when the row `o` of `table` has an older dead row of its key: the rule that
/// holds a key behind its dead message when `dead_blocks_key` is set.
pub(crate) fn behind_dead(table: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM `{table}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
         AND p.state = {DEAD} AND p.id < o.id)"
    )
}

/// SQL true when the pending row aliased `o` (or unaliased, with `o` empty) is scheduled:
/// a delayed message, never tried, whose time has not come. What a backoff after a failure
/// holds is not scheduled: that row has been tried.
pub(crate) fn scheduled(o: &str) -> String {
    let o = if o.is_empty() {
        String::new()
    } else {
        format!("{o}.")
    };
    format!(
        "({o}locked_by = 0 AND {o}number_of_attempts = 0 AND {o}available_on > UTC_TIMESTAMP(6))"
    )
}

/// SQL true when the row `o` of `table` has an older scheduled row of its key, which
/// holds it back until that one is due and gone.
pub(crate) fn behind_scheduled(table: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM `{table}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
         AND p.state = {PENDING} AND p.id < o.id AND {})",
        scheduled("p")
    )
}

/// SQL counting the pending rows of `table` after the row `o` in its key: the messages a
/// dead `o` holds back when `dead_blocks_key` is set (0 for a row with no key).
pub(crate) fn pending_after(table: &str) -> String {
    format!(
        "(SELECT COUNT(*) FROM `{table}` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
         AND p.state = {PENDING} AND p.id > o.id)"
    )
}

/// Makes corrupt pending rows of `table` dead, with the reason as their error, so that
/// they hold back nothing (unless `dead_blocks_key`).
pub(crate) fn bury(
    conn: &mut impl Queryable,
    table: &str,
    corrupt: &[(u64, String)],
) -> Result<()> {
    for (id, reason) in corrupt {
        log::error!("outbox row {id} in `{table}` is corrupt and now dead: {reason}");
        conn.exec_drop(
            format!(
                "UPDATE `{table}` SET state = {DEAD}, error = ?, processed_on = UTC_TIMESTAMP(6), \
                 last_attempted_on = UTC_TIMESTAMP(6) WHERE id = ? AND state = {PENDING} \
                 AND locked_by = 0"
            ),
            (truncate(&format!("corrupt row: {reason}")), id),
        )?;
    }
    Ok(())
}

pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

pub(crate) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The 64-bit FNV-1a hash of `bytes`: the same on every build and platform, for names
/// that must agree across processes (lease owners, lock names).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `error` cut to the `error` column's width.
pub(crate) fn truncate(error: &str) -> String {
    first_chars(error, MAX_ERROR_LEN)
}

/// The first `max` characters of `text`, for a column that holds that many.
pub(crate) fn first_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_any_type_are_padded_to_a_power_of_two_with_their_last() {
        assert_eq!(padded_with_last::<u8>(&[]), Vec::<u8>::new());
        assert_eq!(padded_with_last(&[1]), vec![1]);
        assert_eq!(padded_with_last(&[1, 2, 3]), vec![1, 2, 3, 3]);
        assert_eq!(padded_with_last(&[1, 2, 3, 4, 5]).len(), 8);
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["outbox", "_t", "Billing_Outbox_2", &"t".repeat(64)] {
            assert!(validate_table_name(ok, MAX_TABLE_NAME_LEN).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1t",
            "a-b",
            "a b",
            "t`; DROP TABLE x; --",
            "db.t",
            "tä",
            &"t".repeat(65),
        ] {
            assert!(
                matches!(
                    validate_table_name(bad, MAX_TABLE_NAME_LEN),
                    Err(Error::Config(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn id_lists_are_padded_to_a_few_lengths_with_the_last_id() {
        assert!(padded(&[]).is_empty());
        assert_eq!(padded(&[7]), vec![Value::from(7u64)]);
        assert_eq!(
            padded(&[1, 2, 3]),
            [1u64, 2, 3, 3].map(Value::from).to_vec()
        );
        assert_eq!(padded(&vec![5; MAX_ID_LIST + 1]).len(), MAX_ID_LIST + 1);
    }

    #[test]
    fn each_state_is_read_back_from_its_code_and_no_other_code_is_one() {
        for state in [
            RowState::Pending,
            RowState::Delivered,
            RowState::Dead,
            RowState::Discarded,
        ] {
            assert_eq!(RowState::of(state as u8), Some(state));
        }
        assert_eq!(RowState::of(4), None);
        assert_eq!((PENDING, DELIVERED, DEAD, DISCARDED), (0, 1, 2, 3));
    }

    #[test]
    fn errors_are_truncated_to_the_column() {
        assert_eq!(truncate(&"é".repeat(2000)).chars().count(), MAX_ERROR_LEN);
    }
}
