//! The relay's leases while it holds them: renewed while their batches are in flight,
//! released if it stops with them.

use std::time::Instant;

use crossbeam_channel::{after, select, Receiver};

use crate::store::Store;

use super::batch::{Lease, RENEWALS};
use super::relay::Relay;

impl<S: Store> Relay<S> {
    /// When `lease` was last proven: claimed or renewed. Long ago when a renewal found it
    /// taken over, or when it is not held.
    pub(super) fn proven(&self, lease: u64) -> Instant {
        let long_ago = || {
            let now = Instant::now();
            now.checked_sub(self.settings.max_lock_duration)
                .unwrap_or(now)
        };
        match self.held.lock().get(&lease) {
            Some(Lease {
                proven: Some(at), ..
            }) => *at,
            _ => long_ago(),
        }
    }

    /// Renews the leases in flight, [`RENEWALS`] times per `max_lock_duration`, until
    /// `done` closes. A lease a renewal finds no longer held (its rows taken over) is
    /// published no more.
    pub(super) fn renew(&self, done: &Receiver<()>) {
        let every = self.settings.max_lock_duration / RENEWALS;
        loop {
            select! {
                recv(done) -> _ => return,
                recv(after(every)) -> _ => {},
            }
            let due: Vec<(u64, Vec<u64>)> = self
                .held
                .lock()
                .iter()
                .filter(|(_, lease)| lease.proven.is_some_and(|at| at.elapsed() >= every))
                .map(|(lease, held)| (*lease, held.ids.clone()))
                .collect();
            for (lease, ids) in due {
                let sent = Instant::now();
                match self.store.renew(lease, &ids) {
                    Ok(held) => {
                        if let Some(entry) = self.held.lock().get_mut(&lease) {
                            entry.proven = if held > 0 { Some(sent) } else { None };
                        }
                    }
                    Err(e) => self.signals.report(e),
                }
            }
        }
    }

    /// Releases the rows of every lease still held: batches a dead worker dropped, or
    /// that were never settled. Each release is tried again as a mark is.
    pub(super) fn release_held(&self) {
        let held = std::mem::take(&mut *self.held.lock());
        for (lease, Lease { ids, .. }) in held {
            let lease_ends = Instant::now() + self.settings.max_lock_duration;
            match self.retry_until(lease_ends, |store, lease| store.release(lease, &ids), lease) {
                Ok(n) => log::warn!("released {n} rows a stopped relay still held"),
                Err(e) => self.signals.report(e),
            }
        }
    }
}
