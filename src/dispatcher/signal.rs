//! What every worker thread shares: the stop signal and the error channel.

use std::time::Duration;

use crossbeam_channel::{after, select, Receiver, Sender, TryRecvError, TrySendError};

use crate::error::Error;

/// How many errors wait on the channel before newer ones are dropped (and only logged).
pub(crate) const ERROR_CAPACITY: usize = 1024;

/// A worker's end of the stop signal and of the error channel.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Disconnected when the handle drops its sender: the stop signal.
    pub stop: Receiver<()>,
    errors: Sender<Error>,
}

impl Signals {
    pub fn new(stop: Receiver<()>, errors: Sender<Error>) -> Signals {
        Signals { stop, errors }
    }

    /// True once the stop signal was given.
    pub fn stopped(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Waits for `duration`, or less if the stop signal comes first.
    pub fn pause(&self, duration: Duration) {
        select! {
            recv(self.stop) -> _ => {},
            recv(after(duration)) -> _ => {},
        }
    }

    /// Logs `error` and puts it on the error channel without ever blocking: when nobody
    /// reads the channel and it is full, the error is only logged.
    pub fn report(&self, error: Error) {
        log::warn!("outbox: {error}");
        match self.errors.try_send(error) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                log::debug!("outbox error channel is full; error dropped")
            }
        }
    }

    #[cfg(test)]
    pub fn for_test() -> (Signals, Receiver<Error>, Sender<()>) {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let (errors_tx, errors_rx) = crossbeam_channel::bounded(ERROR_CAPACITY);
        (Signals::new(stop_rx, errors_tx), errors_rx, stop_tx)
    }
}
