//! What the dispatcher needs from a database, and the MySQL implementation.

pub(crate) mod backlog;
pub(crate) mod claim;
pub(crate) mod codec;
pub(crate) mod connections;
mod handed;
pub(crate) mod insert;
pub(crate) mod mysql;
mod scan;
pub(crate) mod sql;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

pub use self::mysql::MySqlStore;
use crate::error::Result;
use crate::metrics::Backlog;
use crate::record::Record;

/// The dispatcher's view of an outbox table.
///
/// Every claim leases its rows under a lease of its own ([`Claim::lease`]), and every
/// call that changes claimed rows takes that lease and changes only rows still held
/// under it (fencing): once the lock checker released a lease and another claim took
/// the row, even one of the same dispatcher, the stale claim's writes do nothing.
/// Times are the database's clock, never the caller's.
pub trait Store: Send + Sync + 'static {
    /// Checks that the database can serve a dispatcher, before its threads start. The
    /// default does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Config`](crate::Error::Config) for a setup that would make every claim
    /// fail; any error reaching the database.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Has the database end this store's sessions once they sit idle longer than `idle`,
    /// so that a dispatcher cut off from it in the middle of a transaction (a dead host,
    /// a cut link) keeps the rows that transaction locked from other dispatchers no
    /// longer than that. The dispatcher calls it before its threads start, with its
    /// [`max_lock_duration`](crate::DispatcherSettings::max_lock_duration). The default
    /// does nothing.
    fn end_idle_sessions_after(&self, idle: Duration) {
        let _ = idle;
    }

    /// Leases up to `limit` pending, unleased rows whose `available_on` has come to
    /// `owner`, and returns them in id order in a [`Claim`]. A row is taken only when every older row of
    /// its topic and key that is still pending (or dead, with `dead_blocks_key`) is taken
    /// in the same claim: so a key's messages are never in flight at two dispatchers, and
    /// a claim may carry a run of one key's messages, in order. Rows without a key are
    /// never held back.
    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Claim>;

    /// Marks rows delivered. Returns how many were still held under `lease` and changed.
    fn mark_delivered(&self, lease: u64, ids: &[u64]) -> Result<u64>;

    /// Records failed sends: one more attempt, the error, the lease released, the row
    /// available again after `retry_in` (or dead), for rows still held under `lease`.
    /// Returns how many rows changed.
    fn mark_failed(&self, lease: u64, failures: &[Failure]) -> Result<u64>;

    /// Releases rows still held under `lease` without counting an attempt: rows that were
    /// not tried (an earlier message of their key failed, or the dispatcher stopped).
    /// Returns how many.
    fn release(&self, lease: u64, ids: &[u64]) -> Result<u64>;

    /// Renews the lease of rows still held under `lease`, from now by the store's clock,
    /// as if they were claimed now: the relay renews the leases of batches it is still
    /// sending. Returns how many rows it still holds.
    fn renew(&self, lease: u64, ids: &[u64]) -> Result<u64>;

    /// Releases leases taken longer ago than `older_than`. Returns how many.
    fn release_expired(&self, older_than: Duration) -> Result<u64>;

    /// Deletes at most `limit` delivered rows delivered longer ago than `older_than`
    /// (and rows an operator discarded that long ago, in a store that keeps them).
    /// Returns how many.
    fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64>;

    /// Deletes at most `limit` dead rows that died longer ago than `older_than`.
    /// Returns how many.
    fn purge_dead(&self, older_than: Duration, limit: usize) -> Result<u64>;

    /// The outbox table whose adds may hand rows to a dispatcher of this store in the same
    /// process: written already leased to it, and taken by [`take_handed`] with no claim.
    /// `None` (the default) for a store that takes no hand-off.
    ///
    /// [`take_handed`]: Store::take_handed
    fn hand_off_table(&self) -> Option<String> {
        None
    }

    /// A lease for rows that commits will write already leased to `owner`, as
    /// [`claim`](Store::claim) would lease them: no other claim or lease shares it. Called
    /// only when [`hand_off_table`](Store::hand_off_table) names a table.
    fn hand_off_lease(&self, owner: &str) -> u64 {
        let _ = owner;
        0
    }

    /// Takes the rows with message ids `ids` still pending under `lease` (written by
    /// commits that handed them over) as [`claim`](Store::claim) would have: in id order,
    /// except that a row whose key has an older row pending under another lease or
    /// unleased (or dead, with `dead_blocks_key`) is released for the claims to take in
    /// its turn, with the later rows of its key. The [`Claim`]'s `more` says whether some
    /// were released. The default takes nothing.
    fn take_handed(&self, lease: u64, ids: &[Uuid], dead_blocks_key: bool) -> Result<Claim> {
        let _ = (ids, dead_blocks_key);
        Ok(Claim {
            lease,
            ..Claim::default()
        })
    }

    /// The table's pending and dead messages by topic, for the dispatcher's gauges
    /// ([`DispatcherSettings::gauge_interval`](crate::DispatcherSettings::gauge_interval)).
    /// The default tells nothing (`None`).
    fn backlog(&self) -> Result<Option<Backlog>> {
        Ok(None)
    }
}

/// What a [`Store::claim`] took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// The rows leased, in id order.
    pub records: Vec<Record>,
    /// True when the claim stopped at its limit and a claim right after it would find
    /// work: a ready row is left whose key is neither held back nor in this claim (those
    /// keys wait behind the rows just taken). False otherwise: the next claim may wait
    /// until a batch is settled.
    pub more: bool,
    /// This claim's lease, which no other claim shares: every later write to its rows
    /// passes it back.
    pub lease: u64,
}

/// One failed send, as [`Store::mark_failed`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The row's id.
    pub id: u64,
    /// The error, as text; stores may truncate it.
    pub error: String,
    /// When the row may be tried again, from now by the database's clock.
    pub retry_in: Duration,
    /// True when this was the last attempt allowed: the row becomes dead.
    pub dead: bool,
}

/// A shared store is a store: the dispatcher can take an `Arc` the application keeps too.
impl<S: Store + ?Sized> Store for Arc<S> {
    fn check(&self) -> Result<()> {
        (**self).check()
    }

    fn end_idle_sessions_after(&self, idle: Duration) {
        (**self).end_idle_sessions_after(idle)
    }

    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Claim> {
        (**self).claim(owner, limit, dead_blocks_key)
    }

    fn mark_delivered(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        (**self).mark_delivered(lease, ids)
    }

    fn mark_failed(&self, lease: u64, failures: &[Failure]) -> Result<u64> {
        (**self).mark_failed(lease, failures)
    }

    fn release(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        (**self).release(lease, ids)
    }

    fn renew(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        (**self).renew(lease, ids)
    }

    fn release_expired(&self, older_than: Duration) -> Result<u64> {
        (**self).release_expired(older_than)
    }

    fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        (**self).purge_delivered(older_than, limit)
    }

    fn purge_dead(&self, older_than: Duration, limit: usize) -> Result<u64> {
        (**self).purge_dead(older_than, limit)
    }

    fn hand_off_table(&self) -> Option<String> {
        (**self).hand_off_table()
    }

    fn hand_off_lease(&self, owner: &str) -> u64 {
        (**self).hand_off_lease(owner)
    }

    fn take_handed(&self, lease: u64, ids: &[Uuid], dead_blocks_key: bool) -> Result<Claim> {
        (**self).take_handed(lease, ids, dead_blocks_key)
    }

    fn backlog(&self) -> Result<Option<Backlog>> {
        (**self).backlog()
    }
}
