//! The relay's side of the hand-off ([`Handoff`](crate::handoff::Handoff)): the rows
//! commits handed over taken as a batch, and released if the relay stops before.

use std::time::Instant;

use crate::error::{Result, Worker};
use crate::handoff::Handed;
use crate::store::Store;

use super::batch::Batch;
use super::relay::Relay;

impl<S: Store> Relay<S> {
    /// Takes the rows commits handed over under one lease: a batch of those it may
    /// publish, if any, and whether some were left to the claims.
    pub(super) fn take(&self, handed: Handed) -> Result<(Option<Batch>, bool)> {
        let started = Instant::now();
        let taken =
            self.store
                .take_handed(handed.lease, &handed.ids, self.settings.dead_blocks_key)?;
        self.signals.succeeded(Worker::Relay);
        if taken.records.is_empty() {
            return Ok((None, taken.more));
        }
        self.meter.handed(taken.records.len(), started.elapsed());
        let more = taken.more;
        Ok((Some(self.hold(taken, handed.since, started, true)), more))
    }

    /// Releases the rows commits handed over that no batch took, as the relay stops;
    /// commits still under way release their own.
    pub(super) fn release_handed(&self) {
        let Some(handoff) = &self.handoff else { return };
        for handed in handoff.close() {
            let released = self
                .store
                .take_handed(handed.lease, &handed.ids, self.settings.dead_blocks_key)
                .and_then(|taken| {
                    let ids: Vec<u64> = taken.records.iter().map(|r| r.id).collect();
                    self.store.release(handed.lease, &ids)
                });
            match released {
                Ok(n) if n > 0 => log::info!("released {n} handed rows as the relay stopped"),
                Ok(_) => {}
                Err(e) => self.signals.report(e),
            }
        }
    }
}
