//! A running dispatcher's health, for a service's own health endpoint.

use std::time::SystemTime;

use crate::error::Worker;

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
