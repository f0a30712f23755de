//! When the relay claims and takes: the pace of its polls, the linger between claims,
//! and what it has in flight.

use std::time::{Duration, Instant};

/// A batch settled: whether a claim may now find more.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settled {
    /// The batch was taken from the hand-off.
    pub handed: bool,
    /// Some of its rows failed or were released untried.
    pub untidy: bool,
}

impl Settled {
    /// Whether a claim should follow. A claimed batch's deliveries may let the next
    /// messages of their keys through; a handed batch's only when some of it went wrong
    /// or rows were left to the claims behind it (`refused`).
    fn wants_claim(self, refused: bool) -> bool {
        !self.handed || self.untidy || refused
    }
}

/// What the relay has in flight, and when it last claimed and took.
#[derive(Default)]
pub(super) struct Flow {
    /// Batches sent to be published and not yet settled.
    pub in_flight: usize,
    /// Of those, batches taken from the hand-off.
    pub handed_in_flight: usize,
    /// Rows were left to the claims behind rows in flight: claim again as batches settle.
    pub refused: bool,
    /// A claim is wanted: a poll is due, a wake-up asked, or a settled batch may have let
    /// more through. False after a claim that left nothing it could take.
    pub claim_now: bool,
    /// A take is wanted: false after a take until a wake-up or a settled take, since a
    /// commit under way keeps its lease from being taken, and its end wakes the relay.
    pub take_now: bool,
    pub claims: Spacing,
    pub takes: Spacing,
}

impl Flow {
    /// A batch settled: what it is worth claiming or taking next.
    pub fn settled(&mut self, done: Settled) {
        self.in_flight -= 1;
        if done.handed {
            self.handed_in_flight -= 1;
            self.take_now = true;
        }
        self.claim_now |= done.wants_claim(self.refused);
    }
}

/// The shortest wait between polls.
const SHORTEST_GAP: Duration = Duration::from_millis(1);

/// How long the relay waits for new rows between polls when it is not woken: `linger`
/// (at least a millisecond) after a poll that found rows, then twice as long after each
/// poll that found none, up to `process_interval`. So a steady stream is relayed within
/// milliseconds without wake-ups, and an idle table is polled once per `process_interval`
/// after a few quick polls.
pub(super) struct Pace {
    gap: Duration,
    first: Duration,
    longest: Duration,
}

impl Pace {
    pub fn new(process_interval: Duration, linger: Duration) -> Pace {
        Pace {
            gap: process_interval,
            first: linger.max(SHORTEST_GAP),
            longest: process_interval,
        }
    }

    /// The wait before the next poll, given whether the last found rows.
    pub fn next(&mut self, found: bool) -> Duration {
        self.gap = if found {
            self.first
        } else {
            self.gap.saturating_mul(2)
        }
        .min(self.longest);
        self.gap
    }
}

/// When the relay last claimed, and whether that claim filled its batch: the next claim
/// after one that did not waits for `linger` after it.
#[derive(Default)]
pub(super) struct Spacing {
    pub last: Option<Instant>,
    pub filled: bool,
}

impl Spacing {
    /// How long the next claim must still wait.
    pub fn wait(&self, linger: Duration) -> Duration {
        match self.last {
            Some(at) if !self.filled => (at + linger).saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_come_a_linger_after_rows_then_twice_as_late_up_to_process_interval() {
        let mut pace = Pace::new(Duration::from_millis(100), Duration::ZERO);
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(pace.next(false)), 100, "idle from the start");
        assert_eq!(ms(pace.next(true)), 1);
        let idle: Vec<u128> = (0..9).map(|_| ms(pace.next(false))).collect();
        assert_eq!(idle, [2, 4, 8, 16, 32, 64, 100, 100, 100]);
        assert_eq!(ms(pace.next(true)), 1, "rows again: at once again");
        let mut short = Pace::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(
            short.next(true),
            Duration::ZERO,
            "never past process_interval"
        );
        let mut lingering = Pace::new(Duration::from_millis(100), Duration::from_millis(5));
        assert_eq!(ms(lingering.next(true)), 5, "after rows, the linger");
        assert_eq!(ms(lingering.next(false)), 10);
    }
}
