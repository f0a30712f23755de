//! A running dispatcher's health, for a service's own health endpoint.

use std::sync::Arc;
use std::time::SystemTime;

use super::signal::Shared;
use crate::error::Worker;

/// Reads a dispatcher's [`Health`] from any thread, for as long as it is kept, also after
/// the dispatcher stopped; from [`DispatcherHandle::health_probe`](crate::DispatcherHandle::health_probe).
#[derive(Clone)]
pub struct HealthProbe {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for HealthProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthProbe").finish_non_exhaustive()
    }
}

impl HealthProbe {
    /// The dispatcher's health now.
    pub fn health(&self) -> Health {
        let shared = &self.shared;
        let panicked = shared.panicked().map(|(worker, _)| worker);
        let mut workers = Vec::new();
        for (worker, alive) in shared.running() {
            workers.push(WorkerHealth {
                worker,
                alive,
                last_success: shared.last_success(worker),
            });
            if worker == Worker::Relay {
                // The relay's own threads, which live inside its thread.
                for inner in shared.inner() {
                    workers.push(WorkerHealth {
                        worker: inner,
                        alive: alive && panicked != Some(inner),
                        last_success: shared.last_success(inner),
                    });
                }
            }
        }
        Health {
            workers,
            last_error: shared.last_error(),
        }
    }
}

/// What [`DispatcherHandle::health`](crate::DispatcherHandle::health) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Each worker thread the dispatcher started.
    pub workers: Vec<WorkerHealth>,
    /// The last error any worker reported, and when; errors pass (a lost connection, an
    /// unreachable broker), so this says what went wrong last, not that it still does.
    pub last_error: Option<(SystemTime, String)>,
}

impl Health {
    /// True while every worker thread runs: what a liveness check asks.
    pub fn is_alive(&self) -> bool {
        !self.workers.is_empty() && self.workers.iter().all(|w| w.alive)
    }
}

/// One worker thread's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHealth {
    /// Which worker.
    pub worker: Worker,
    /// Whether its thread still runs.
    pub alive: bool,
    /// When it last finished a round without error (a claim, a publish, a batch settled,
    /// a lock check, a cleanup, a gauge refresh); `None` if it never did.
    pub last_success: Option<SystemTime>,
}
