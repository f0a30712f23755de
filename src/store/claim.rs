//! Which rows a claim may take so that every key keeps its order: the rule, apart from
//! any database.
//!
//! The store reads the pending rows from the oldest on, in id order, in one snapshot,
//! and asks [`pick`] which to take; it then locks them, and [`keep_unbroken`] drops what
//! another claimer took in between.

use std::collections::HashSet;

/// A pending row as the claim's first read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: u64,
    /// Topic and key; `None` for a message without a key.
    pub key: Option<(String, Vec<u8>)>,
    /// Unleased and due (and, with `dead_blocks_key`, no dead row of its key before it).
    pub ready: bool,
    /// Tried before, and failed.
    pub retry: bool,
}

/// Most rows that failed before one claim of `limit` rows takes: half of it, so that
/// messages that keep failing leave room for the others.
pub(crate) fn retry_cap(limit: usize) -> usize {
    (limit / 2).max(1)
}

/// Picks up to `limit` rows from `candidates` (all pending rows from the oldest on, in id
/// order): a ready row is taken unless its key is blocked, and a key is blocked from its
/// first pending row that is not taken on. So of each key, only an unbroken run from its
/// oldest pending row is taken. Rows without a key are taken whenever ready.
///
/// Also says whether a next claim could take more right away: whether a ready row is
/// left past the limit whose key is neither blocked nor in this claim (the rows taken now
/// will be in flight, and hold their keys), or a retry was left by the cap.
///
/// Of rows that failed before, it takes at most `retries` (and counts them off it): a
/// ready retry past that is left, and holds its key back, as a row not ready does. So
/// messages that keep failing cannot fill every claim.
pub(crate) fn pick<'a>(
    candidates: &'a [Candidate],
    limit: usize,
    retries: &mut usize,
) -> (Vec<&'a Candidate>, bool) {
    let mut blocked = HashSet::new();
    let mut picked = Vec::new();
    let mut past_limit = candidates.len();
    let mut capped = false;
    for (index, candidate) in candidates.iter().enumerate() {
        if picked.len() == limit {
            past_limit = index;
            break;
        }
        let key = candidate.key.as_ref();
        if key.is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        let within_cap = !candidate.retry || *retries > 0;
        if candidate.ready && within_cap {
            if candidate.retry {
                *retries -= 1;
            }
            picked.push(candidate);
        } else {
            capped |= candidate.ready;
            if let Some(k) = key {
                blocked.insert(k);
            }
        }
    }
    blocked.extend(picked.iter().filter_map(|c| c.key.as_ref()));
    let mut more = false;
    for candidate in &candidates[past_limit..] {
        let key = candidate.key.as_ref();
        if key.is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        if candidate.ready {
            more = true;
            break;
        }
        blocked.extend(key);
    }
    (picked, more || capped)
}

/// Of the `picked` rows (in id order), keeps those still unbroken once locked: a row
/// missing from `locked` (another claimer took it since it was read) blocks the later
/// rows of its key.
pub(crate) fn keep_unbroken(picked: &[&Candidate], locked: &HashSet<u64>) -> Vec<u64> {
    let mut blocked = HashSet::new();
    let mut kept = Vec::new();
    for candidate in picked {
        let key = candidate.key.as_ref();
        if key.is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        if locked.contains(&candidate.id) {
            kept.push(candidate.id);
        } else if let Some(k) = key {
            blocked.insert(k);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, key: Option<&str>, ready: bool) -> Candidate {
        Candidate {
            id,
            key: key.map(|k| ("t".to_string(), k.as_bytes().to_vec())),
            ready,
            retry: false,
        }
    }

    fn retry(id: u64, key: Option<&str>) -> Candidate {
        Candidate {
            retry: true,
            ..row(id, key, true)
        }
    }

    fn pick_all(candidates: &[Candidate], limit: usize) -> (Vec<&Candidate>, bool) {
        let mut no_cap = usize::MAX;
        pick(candidates, limit, &mut no_cap)
    }

    fn ids(picked: &[&Candidate]) -> Vec<u64> {
        picked.iter().map(|c| c.id).collect()
    }

    #[test]
    fn takes_runs_and_stops_each_key_at_its_first_row_not_ready() {
        let rows = [
            row(1, Some("a"), true),
            row(2, Some("b"), false), // leased elsewhere, or backing off
            row(3, Some("a"), true),
            row(4, Some("b"), true), // must not overtake 2
            row(5, None, false),
            row(6, None, true), // keyless rows never wait
            row(7, Some("a"), false),
            row(8, Some("a"), true), // must not overtake 7
            row(9, Some("c"), true),
        ];
        assert_eq!(ids(&pick_all(&rows, 100).0), vec![1, 3, 6, 9]);
    }

    #[test]
    fn stops_at_the_limit() {
        let rows: Vec<_> = (1..=10).map(|i| row(i, Some("hot"), true)).collect();
        assert_eq!(ids(&pick_all(&rows, 4).0), vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_row_taken_by_another_claimer_in_between_cuts_its_key_run() {
        let rows = [
            row(1, Some("a"), true),
            row(2, Some("a"), true),
            row(3, Some("b"), true),
            row(4, Some("a"), true),
            row(5, None, true),
        ];
        let (picked, _) = pick_all(&rows, 100);
        let locked: HashSet<u64> = [1, 3, 4].into();
        assert_eq!(
            keep_unbroken(&picked, &locked),
            vec![1, 3],
            "2 is gone, so 4 may not go"
        );
        let locked: HashSet<u64> = [2, 3, 4, 5].into();
        assert_eq!(
            keep_unbroken(&picked, &locked),
            vec![3, 5],
            "1 is gone: nothing of a"
        );
    }

    #[test]
    fn says_more_only_for_rows_a_next_claim_could_take() {
        let hot: Vec<_> = (1..=10).map(|i| row(i, Some("hot"), true)).collect();
        assert!(
            !pick_all(&hot, 4).1,
            "the rest of the run waits behind the rows in flight"
        );
        let mut mixed = hot.clone();
        mixed.push(row(11, Some("cold"), true));
        assert!(pick_all(&mixed, 4).1, "another key is ready");
        let mut keyless = hot.clone();
        keyless.push(row(11, None, true));
        assert!(pick_all(&keyless, 4).1, "a row without a key never waits");
        let held = [
            row(1, Some("a"), true),
            row(2, Some("b"), false),
            row(3, Some("b"), true),
        ];
        assert!(!pick_all(&held, 1).1, "b waits behind its row backing off");
        assert!(!pick_all(&hot, 10).1, "nothing past the limit");
    }

    #[test]
    fn retries_past_the_cap_are_left_and_hold_their_keys_back() {
        let rows = [
            retry(1, None),
            retry(2, Some("a")),
            row(3, Some("a"), true), // behind a retry left out: must wait
            retry(4, None),
            row(5, None, true),
            row(6, Some("b"), true),
        ];
        let mut retries = 1;
        let (picked, more) = pick(&rows, 100, &mut retries);
        assert_eq!(ids(&picked), vec![1, 5, 6]);
        assert_eq!(retries, 0, "the cap is used up");
        assert!(more, "retries were left that a next claim could take");
        let mut none = 0;
        assert_eq!(ids(&pick(&rows, 100, &mut none).0), vec![5, 6]);
    }

    #[test]
    fn same_key_name_on_another_topic_is_another_key() {
        let mut other = row(2, Some("a"), true);
        other.key = Some(("u".into(), b"a".to_vec()));
        let rows = [row(1, Some("a"), false), other];
        assert_eq!(ids(&pick_all(&rows, 10).0), vec![2]);
    }
}
