//! The hand-off: messages a commit gives straight to the dispatcher in its process.
//!
//! An [`OutboxTransaction`](crate::OutboxTransaction) whose outbox has the waker of a
//! polling dispatcher on the same table writes its rows already leased to that dispatcher,
//! under the lease the hand-off names at the commit ([`Handoff::begin`]), and hands their
//! message ids over once the COMMIT returned ([`Handoff::end`]). The dispatcher takes the
//! leases whose commits have all ended ([`Handoff::take`], which also moves new commits
//! to a fresh lease), reads those rows back and publishes them without a claim. Rows it
//! cannot take (an older row of their key is held elsewhere) it releases to the claims.
//! A process that dies leaves leased rows that the lock checkers release as any other.

use std::time::Instant;

use parking_lot::Mutex;
use uuid::Uuid;

/// Where commits hand their rows to one dispatcher, shared by its waker.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The outbox table the dispatcher relays: only adds to it are handed over.
    table: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The lease commits write now; 0 while the dispatcher takes nothing (not yet running,
    /// or stopped).
    current: u64,
    /// The leases commits wrote and the dispatcher has not taken, oldest first.
    leases: Vec<Handed>,
}

/// The rows commits wrote under one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handed {
    pub lease: u64,
    /// Message ids of the rows, in the order their commits ended.
    pub ids: Vec<Uuid>,
    /// When the first commit under this lease began: its rows' lease was taken no sooner.
    pub since: Instant,
    /// Commits under this lease that have begun and not ended.
    open: usize,
}

/// A commit under way with leased rows: what [`Handoff::end`] needs back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub lease: u64,
}

impl Handoff {
    /// A hand-off for a dispatcher of `table`, taking nothing until [`start`] names a
    /// lease.
    ///
    /// [`start`]: Handoff::start
    pub fn new(table: &str) -> Handoff {
        Handoff {
            table: table.to_string(),
            state: Mutex::default(),
        }
    }

    /// A commit of rows to `table` begins: the lease to write them under, or `None` when
    /// they go the usual way (another table, or no dispatcher taking them).
    pub fn begin(&self, table: &str) -> Option<Ticket> {
        if table != self.table {
            return None;
        }
        let mut state = self.state.lock();
        let lease = state.current;
        if lease == 0 {
            return None;
        }
        match state.leases.iter_mut().find(|h| h.lease == lease) {
            Some(handed) => handed.open += 1,
            None => state.leases.push(Handed {
                lease,
                ids: Vec::new(),
                since: Instant::now(),
                open: 1,
            }),
        }
        Some(Ticket { lease })
    }

    /// The commit of `ticket` ended, whatever its outcome: its rows' ids, for the
    /// dispatcher to look for. False when the dispatcher will not take them (it stopped):
    /// the committer then releases them itself.
    pub fn end(&self, ticket: Ticket, ids: &[Uuid]) -> bool {
        let mut state = self.state.lock();
        match state.leases.iter_mut().find(|h| h.lease == ticket.lease) {
            Some(handed) => {
                handed.open -= 1;
                handed.ids.extend_from_slice(ids);
                true
            }
            None => false,
        }
    }

    /// For the dispatcher as it starts: commits from now on write their rows under `lease`.
    pub fn start(&self, lease: u64) {
        self.state.lock().current = lease;
    }

    /// For the dispatcher: moves later commits to `next` (when the lease in use has
    /// commits), and returns the oldest lease whose commits have all ended, if any. One
    /// at a time: the rows of a lease taken while another's are in flight would wait
    /// behind them, left to the claims.
    pub fn take(&self, next: impl FnOnce() -> u64) -> Option<Handed> {
        let mut state = self.state.lock();
        let current = state.current;
        if current != 0 && state.leases.iter().any(|h| h.lease == current) {
            state.current = next();
        }
        // Commits that wrote no row leave nothing to take.
        state.leases.retain(|h| h.open > 0 || !h.ids.is_empty());
        let done = state.leases.iter().position(|h| h.open == 0)?;
        Some(state.leases.remove(done))
    }

    /// Whether a commit ended with rows the dispatcher has not taken yet (their lease is
    /// taken once every commit under it ended).
    pub fn has_ended(&self) -> bool {
        self.state.lock().leases.iter().any(|h| !h.ids.is_empty())
    }

    /// For the dispatcher as it stops: no later commit is leased, and commits still under
    /// way will release their own rows. Returns the rows of the commits that ended, by
    /// lease, for the dispatcher to release.
    pub fn close(&self) -> Vec<Handed> {
        let mut state = self.state.lock();
        state.current = 0;
        std::mem::take(&mut state.leases)
            .into_iter()
            .filter(|h| !h.ids.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leases 2, 3, ... for a hand-off started under lease 1.
    fn leases() -> impl FnMut() -> u64 {
        let mut next = 1;
        move || {
            next += 1;
            next
        }
    }

    #[test]
    fn nothing_is_leased_before_the_dispatcher_takes_or_for_another_table() {
        let handoff = Handoff::new("outbox");
        assert_eq!(handoff.begin("outbox"), None, "not started");
        assert!(handoff.take(leases()).is_none());
        assert_eq!(handoff.begin("outbox"), None, "taking does not start it");
        handoff.start(1);
        assert_eq!(handoff.begin("other"), None);
        assert_eq!(handoff.begin("outbox"), Some(Ticket { lease: 1 }));
    }

    #[test]
    fn a_lease_is_taken_once_every_commit_under_it_ended() {
        let handoff = Handoff::new("t");
        let mut lease = leases();
        handoff.start(1);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = handoff.begin("t").unwrap();
        let second = handoff.begin("t").unwrap();
        assert!(handoff.end(first, &[a]));
        let taken = handoff.take(&mut lease);
        assert!(taken.is_none(), "the second commit is still under way");
        assert_eq!(
            handoff.begin("t"),
            Some(Ticket { lease: 2 }),
            "later commits moved to a new lease"
        );
        assert!(handoff.end(second, &[b]));
        let taken = handoff.take(&mut lease).unwrap();
        assert_eq!((taken.lease, taken.ids), (1, vec![a, b]));
        assert!(!handoff.has_ended(), "lease 2's commit is under way");
        assert!(handoff.end(Ticket { lease: 2 }, &[a]));
        assert!(handoff.has_ended());
    }

    #[test]
    fn a_lease_without_commits_is_kept_and_commits_without_rows_are_not_handed() {
        let handoff = Handoff::new("t");
        let mut lease = leases();
        handoff.start(1);
        handoff.take(&mut lease);
        assert_eq!(
            handoff.begin("t"),
            Some(Ticket { lease: 1 }),
            "no lease burnt"
        );
        let ticket = Ticket { lease: 1 };
        assert!(handoff.end(ticket, &[]));
        assert!(handoff.take(&mut lease).is_none());
        assert!(!handoff.has_ended());
    }

    #[test]
    fn after_close_nothing_is_leased_and_late_commits_release_their_own_rows() {
        let handoff = Handoff::new("t");
        handoff.start(1);
        let done = handoff.begin("t").unwrap();
        let late = handoff.begin("t").unwrap();
        let id = Uuid::now_v7();
        handoff.end(done, &[id]);
        let left = handoff.close();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].ids, vec![id]);
        assert!(!handoff.end(late, &[Uuid::now_v7()]), "no one takes it now");
        assert_eq!(handoff.begin("t"), None);
    }
}
