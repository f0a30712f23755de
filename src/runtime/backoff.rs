//! How long a failed message waits before its next attempt.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

/// The wait after the `attempts`-th failure, drawn at random from `[w, 2w]` (capped at
/// `max`) so that messages failing together do not all come back together: `w` is
/// `min` after the first failure and doubles with each further one, up to half of
/// `max`. So every wait lies between `min` and `max`, and waits near the cap still
/// spread.
pub(crate) fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let ceiling = (max / 2).max(min);
    let lower = min.saturating_mul(1u32 << doublings).min(ceiling).min(max);
    let upper = lower.saturating_mul(2).min(max);
    let spread = u64::try_from((upper - lower).as_nanos()).unwrap_or(u64::MAX);
    let jitter = if spread == 0 {
        0
    } else {
        random() % spread.saturating_add(1)
    };
    lower + Duration::from_nanos(jitter)
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
            let lower = (min * 2u32.saturating_pow(attempts - 1).min(1 << 20)).min(max / 2);
            for _ in 0..20 {
                let wait = backoff(attempts, min, max);
                assert!(
                    wait >= lower && wait <= (lower * 2).min(max),
                    "attempt {attempts}: {wait:?} vs {lower:?}"
                );
                assert!(wait >= min && wait <= max, "{wait:?}");
            }
        }
    }

    #[test]
    fn the_first_retry_waits_at_least_backoff_min() {
        let min = Duration::from_secs(1);
        for _ in 0..50 {
            let wait = backoff(1, min, Duration::from_secs(300));
            assert!(wait >= min && wait <= 2 * min, "{wait:?}");
        }
        assert_eq!(backoff(1, min, min), min, "min = max: no room to spread");
        let waits: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(40, min, Duration::from_secs(60)))
            .collect();
        assert!(waits.len() > 10, "waits at the cap still spread");
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let waits: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(3, Duration::from_secs(1), Duration::from_secs(60)))
            .collect();
        assert!(waits.len() > 10, "only {} distinct waits", waits.len());
    }
}
