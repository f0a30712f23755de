//! The lock checker and the cleaner: the two background workers beside the relay.

use std::sync::Arc;

use crossbeam_channel::{select, tick};

use std::time::Duration;

use super::signal::Signals;
use crate::error::{Result, Worker};
use crate::metrics::Meter;
use crate::settings::DispatcherSettings;
use crate::store::Store;

/// Releases leases older than `max_lock_duration`, at once and every
/// `lock_check_interval`, until the stop signal.
pub(crate) fn run_lock_checker<S: Store>(
    store: Arc<S>,
    settings: DispatcherSettings,
    signals: Signals,
    meter: Meter,
) {
    let ticks = tick(settings.lock_check_interval);
    loop {
        match store.release_expired(settings.max_lock_duration) {
            Ok(n) => {
                if n > 0 {
                    log::warn!(
                        "released {n} expired leases (older than {:?})",
                        settings.max_lock_duration
                    );
                    meter.expired(n);
                }
                signals.succeeded(Worker::LockChecker);
            }
            Err(e) => signals.report(e),
        }
        select! {
            recv(signals.stop) -> _ => return,
            recv(ticks) -> _ => {},
        }
    }
}

/// Deletes delivered rows past `retention` and, when `dead_retention` is set, dead rows
/// past it, in chunks of `cleanup_batch_size`, at once and every `cleanup_interval`,
/// until the stop signal.
pub(crate) fn run_cleaner<S: Store>(
    store: Arc<S>,
    settings: DispatcherSettings,
    signals: Signals,
    meter: Meter,
) {
    let ticks = tick(settings.cleanup_interval);
    loop {
        let chunk = settings.cleanup_batch_size;
        let delivered = purge_all(&signals, chunk, |limit| {
            store.purge_delivered(settings.retention, limit)
        });
        let dead = match settings.dead_retention {
            Some(retention) => {
                purge_all(&signals, chunk, |limit| store.purge_dead(retention, limit))
            }
            None => Ok(0),
        };
        let mut failed = false;
        for result in [delivered, dead] {
            match result {
                Ok(0) => {}
                Ok(n) => {
                    log::info!("deleted {n} rows past their retention");
                    meter.deleted(n);
                }
                Err(e) => {
                    failed = true;
                    signals.report(e);
                }
            }
        }
        if !failed {
            signals.succeeded(Worker::Cleaner);
        }
        select! {
            recv(signals.stop) -> _ => return,
            recv(ticks) -> _ => {},
        }
    }
}

/// Reads the table's backlog into the gauges, at once and every `interval`, until the
/// stop signal. A store that tells nothing leaves the gauges unset.
pub(crate) fn run_gauges<S: Store>(
    store: Arc<S>,
    interval: Duration,
    signals: Signals,
    meter: Meter,
) {
    let ticks = tick(interval);
    let mut shown = Vec::new();
    let mut told = false;
    loop {
        match store.backlog() {
            Ok(Some(backlog)) => {
                meter.backlog(&backlog, &mut shown);
                signals.succeeded(Worker::Gauges);
            }
            Ok(None) => {
                if !told {
                    log::info!("the store reports no backlog: the gauges stay unset");
                    told = true;
                }
                signals.succeeded(Worker::Gauges);
            }
            Err(e) => signals.report(e),
        }
        select! {
            recv(signals.stop) -> _ => return,
            recv(ticks) -> _ => {},
        }
    }
}

/// Runs `purge` until a chunk comes back short or the stop signal comes; returns the
/// total deleted.
pub(crate) fn purge_all(
    signals: &Signals,
    chunk: usize,
    mut purge: impl FnMut(usize) -> Result<u64>,
) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = purge(chunk)?;
        total += n;
        if n < chunk as u64 || signals.stopped() {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_in_chunks_until_a_short_one() {
        let (signals, _errors, _stop) = Signals::for_test();
        let left = std::cell::Cell::new(25u64);
        let calls = std::cell::Cell::new(0);
        let total = purge_all(&signals, 10, |limit| {
            calls.set(calls.get() + 1);
            let n = left.get().min(limit as u64);
            left.set(left.get() - n);
            Ok(n)
        })
        .unwrap();
        assert_eq!((total, calls.get()), (25, 3));
    }

    #[test]
    fn stops_purging_on_the_stop_signal() {
        let (signals, _errors, stop) = Signals::for_test();
        drop(stop);
        let total = purge_all(&signals, 10, |limit| Ok(limit as u64)).unwrap();
        assert_eq!(total, 10, "one chunk, then the stop signal is seen");
    }
}
