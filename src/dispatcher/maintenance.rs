//! The lock checker and the cleaner: the two background workers beside the relay.

use std::sync::Arc;

use crossbeam_channel::{select, tick};

use std::time::Duration;

use crate::error::{Result, Worker};
use crate::metrics::Meter;
use crate::runtime::purge::purge_all;
use crate::runtime::signal::Signals;
use crate::runtime::DispatcherHandle;
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

impl DispatcherHandle {
    /// Spawns the workers that keep the table: the lock checker, the cleaner and, when
    /// `gauge_interval` is set, the gauges.
    pub(crate) fn spawn_maintenance<S: Store>(
        &mut self,
        store: Arc<S>,
        settings: &DispatcherSettings,
        signals: &Signals,
        meter: &Meter,
    ) -> Result<()> {
        let (s, settings_, sig, m) = (
            store.clone(),
            settings.clone(),
            signals.clone(),
            meter.clone(),
        );
        self.spawn(Worker::LockChecker, signals, move || {
            run_lock_checker(s, settings_, sig, m)
        })?;
        let (s, settings_, sig, m) = (
            store.clone(),
            settings.clone(),
            signals.clone(),
            meter.clone(),
        );
        self.spawn(Worker::Cleaner, signals, move || {
            run_cleaner(s, settings_, sig, m)
        })?;
        if let Some(interval) = settings.gauge_interval {
            let (sig, m) = (signals.clone(), meter.clone());
            self.spawn(Worker::Gauges, signals, move || {
                run_gauges(store, interval, sig, m)
            })?;
        }
        Ok(())
    }
}
