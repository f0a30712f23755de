//! The relay's side of the hand-off ([`Handoff`](crate::handoff::Handoff)): the rows
//! commits handed over taken as a batch, and released if the relay stops before.

use std::time::Instant;

use crossbeam_channel::Sender;

use crate::error::{Result, Worker};
use crate::handoff::Handed;
use crate::store::Store;

use super::batch::Batch;
use super::flow::Flow;
use super::relay::{Relay, IN_FLIGHT};

impl<S: Store> Relay<S> {
    /// Whether to take what commits handed over now: a take is wanted, none is in
    /// flight, there is room in the pipeline, and a commit has ended.
    pub(super) fn take_is_due(&self, flow: &Flow) -> bool {
        self.handoff.as_ref().is_some_and(|handoff| {
            flow.take_now
                && flow.handed_in_flight == 0
                && flow.in_flight < IN_FLIGHT
                && handoff.has_ended()
        })
    }

    /// Takes the oldest lease whose commits have all ended, if any, and sends its batch
    /// to be published. False when the publisher is gone.
    pub(super) fn take_into(&self, to_publish: &Sender<Batch>, flow: &mut Flow) -> bool {
        flow.takes.last = Some(Instant::now());
        flow.take_now = false;
        let Some(handoff) = &self.handoff else {
            return true;
        };
        let Some(handed) = handoff.take(|| self.store.hand_off_lease(&self.owner)) else {
            return true;
        };
        match self.take(handed) {
            Ok((batch, refused)) => {
                flow.refused |= refused;
                flow.claim_now |= refused;
                if let Some(batch) = batch {
                    if to_publish.send(batch).is_err() {
                        return false;
                    }
                    flow.in_flight += 1;
                    flow.handed_in_flight += 1;
                }
            }
            Err(e) => self.signals.report(e),
        }
        true
    }

    /// Takes the rows commits handed over under one lease: a batch of those it may
    /// publish, if any, and whether some were left to the claims.
    fn take(&self, handed: Handed) -> Result<(Option<Batch>, bool)> {
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
