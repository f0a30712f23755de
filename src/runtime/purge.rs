//! Deleting rows past their retention in chunks, until a chunk comes back short or the
//! stop signal comes: the polling relay's cleaner and the inbox's share it.

use super::signal::Signals;
use crate::error::Result;

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
