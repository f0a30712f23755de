//! Fencing by time: how long the active relay may go on publishing without having heard
//! that it still holds the table's lock.
//!
//! The lock lives as long as the connection that took it, and the server closes a
//! connection that sent nothing for its `wait_timeout`, which the relay sets to
//! [`lock_timeout`](super::BinlogSettings::lock_timeout) on that connection. A statement
//! sent on it at `t` that succeeds proves the lock is held until `t + lock_timeout` at
//! least: the server cannot have let it go before. The relay publishes nothing once it
//! is past that, less a margin for timers that run apart; a publish begun before may
//! still finish after it (up to the broker's delivery timeout).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The share of the lock timeout kept as a margin: the relay stops publishing that long
/// before the server could release the lock, and pings the connection as often.
const MARGIN_SHARE: u32 = 4;

/// When the active relay last proved it holds the lock, and how long that proof lasts.
#[derive(Debug)]
pub(crate) struct Fence {
    timeout: Duration,
    /// When the last statement that succeeded on the lock's connection was sent.
    proven: Mutex<Instant>,
}

impl Fence {
    /// A fence for a lock taken by a statement sent at `sent`, which the server keeps
    /// for `timeout` after the last statement it hears on that connection.
    pub fn new(timeout: Duration, sent: Instant) -> Fence {
        Fence {
            timeout,
            proven: Mutex::new(sent),
        }
    }

    /// A statement sent at `sent` on the lock's connection succeeded.
    pub fn proved(&self, sent: Instant) {
        let mut proven = self.proven.lock();
        *proven = (*proven).max(sent);
    }

    /// Until when the relay may start a publish.
    pub fn deadline(&self) -> Instant {
        *self.proven.lock() + self.timeout - self.margin()
    }

    /// Whether the relay may start a publish now.
    pub fn holds(&self) -> bool {
        Instant::now() < self.deadline()
    }

    /// How long the lock's connection may stay quiet before it is pinged: the margin,
    /// so that a relay that can reach the server never comes near its deadline.
    pub fn ping_after(&self) -> Duration {
        self.margin()
    }

    /// Whether the lock's connection has been quiet for [`ping_after`](Fence::ping_after).
    pub fn due_for_ping(&self) -> bool {
        self.proven.lock().elapsed() >= self.ping_after()
    }

    fn margin(&self) -> Duration {
        self.timeout / MARGIN_SHARE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_the_timeout_less_its_margin_and_only_a_later_proof_extends_it() {
        let start = Instant::now();
        let fence = Fence::new(Duration::from_secs(8), start);
        assert_eq!(fence.deadline(), start + Duration::from_secs(6));
        assert!(fence.holds());
        fence.proved(start + Duration::from_secs(1));
        assert_eq!(fence.deadline(), start + Duration::from_secs(7));
        // A proof that was sent earlier (a slow statement that answered late) proves less.
        fence.proved(start);
        assert_eq!(fence.deadline(), start + Duration::from_secs(7));
        assert_eq!(fence.ping_after(), Duration::from_secs(2));
    }

    #[test]
    fn a_fence_past_its_deadline_does_not_hold() {
        let fence = Fence::new(Duration::from_millis(4), Instant::now());
        std::thread::sleep(Duration::from_millis(10));
        assert!(!fence.holds());
        assert!(fence.due_for_ping());
    }
}
