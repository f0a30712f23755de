//! How long a failed message waits before its next attempt.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

/// The wait after the `attempts`-th failure: `min` doubled per earlier failure, capped at
/// `max`, then drawn at random from its upper half so that messages failing together do
/// not all come back together.
pub(crate) fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(32);
    let full = min.saturating_mul(1u32 << doublings.min(31)).min(max);
    let half = full / 2;
    let spread = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
    let jitter = if spread == 0 {
        0
    } else {
        random() % (spread + 1)
    };
    half + Duration::from_nanos(jitter)
}

/// A random number from the standard library's per-process hasher keys.
fn random() -> u64 {
    RandomState::new().hash_one(std::time::Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_bounds_and_caps() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempts in 1..100 {
            let full = (min * 2u32.saturating_pow(attempts - 1).min(1 << 20)).min(max);
            for _ in 0..20 {
                let wait = backoff(attempts, min, max);
                assert!(
                    wait >= full / 2 && wait <= full,
                    "attempt {attempts}: {wait:?} vs {full:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let waits: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(3, Duration::from_secs(1), Duration::from_secs(60)))
            .collect();
        assert!(waits.len() > 10, "only {} distinct waits", waits.len());
    }
}
