//! librdkafka's callbacks for the producer: delivery reports gathered for the batch being
//! published, and log lines forwarded to `log` with the values of secrets blotted out.

use parking_lot::Mutex;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use rdkafka::Message as _;

use super::properties::{is_secret, REDACTED};

/// Delivery outcomes of the batch being published.
#[derive(Default)]
pub(super) struct Pending {
    pub batch: u64,
    pub outcomes: Vec<Option<Result<(), KafkaError>>>,
    /// Where each acknowledged message went: its partition and offset.
    pub placed: Vec<Option<(i32, i64)>>,
    pub waiting: usize,
}

impl Pending {
    pub fn new(batch: u64, len: usize) -> Pending {
        Pending {
            batch,
            outcomes: vec![None; len],
            placed: vec![None; len],
            waiting: len,
        }
    }

    /// Records the outcome of one message, ignoring reports from an earlier batch.
    pub fn settle(&mut self, batch: u64, index: usize, outcome: Result<(), KafkaError>) {
        if batch != self.batch {
            log::warn!(
                "late delivery report for a message of an earlier batch; it was counted as failed"
            );
            return;
        }
        if let Some(slot @ None) = self.outcomes.get_mut(index) {
            *slot = Some(outcome);
            self.waiting -= 1;
        }
    }
}

/// librdkafka's callbacks: delivery reports fill [`Pending`]; logs go to `log`, with
/// the values of secret properties blotted out.
#[derive(Default)]
pub(super) struct Reports {
    pub pending: Mutex<Pending>,
    pub secrets: Vec<String>,
}

/// `error` with the values of the secret properties `secrets` blotted out: librdkafka's
/// configuration errors repeat the value they refused.
pub(crate) fn redact(error: KafkaError, secrets: &[String]) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, description, key, value) => {
            let value = if is_secret(&key) || secrets.contains(&value) {
                REDACTED.to_string()
            } else {
                value
            };
            KafkaError::ClientConfig(code, blot(&description, secrets), key, value)
        }
        KafkaError::ClientCreation(text) => KafkaError::ClientCreation(blot(&text, secrets)),
        other => other,
    }
}

/// `text` with every secret in it replaced by [`REDACTED`].
fn blot(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), REDACTED)
        })
}

impl ClientContext for Reports {
    /// librdkafka's log lines, to `log` under the target `librdkafka`; its warning that
    /// `enable.gapless.guarantee` (which the crate sets on purpose) is experimental goes
    /// to `debug`, not to every start's warnings.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message, &self.secrets);
    }
}

/// A librdkafka log line to `log` under the target `librdkafka`, with `secrets` blotted
/// out; its warning that `enable.gapless.guarantee` (which the crate sets on purpose) is
/// experimental goes to `debug`, not to every start's warnings.
pub(crate) fn forward_log(
    level: RDKafkaLogLevel,
    fac: &str,
    log_message: &str,
    secrets: &[String],
) {
    let level = match level {
        _ if fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee") => {
            log::Level::Debug
        }
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => log::Level::Error,
        RDKafkaLogLevel::Warning => log::Level::Warn,
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => log::Level::Info,
        RDKafkaLogLevel::Debug => log::Level::Debug,
    };
    let message = blot(log_message, secrets);
    log::log!(target: "librdkafka", level, "librdkafka: {fac} {message}");
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<(u64, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (batch, index) = *opaque;
        let mut pending = self.pending.lock();
        let outcome = match result {
            Ok(message) => {
                if batch == pending.batch {
                    if let Some(slot) = pending.placed.get_mut(index) {
                        *slot = Some((message.partition(), message.offset()));
                    }
                }
                Ok(())
            }
            Err((e, _)) => Err(e.clone()),
        };
        pending.settle(batch, index, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_counts_each_report_once_and_ignores_other_batches() {
        let mut pending = Pending::new(7, 2);
        pending.settle(6, 0, Ok(()));
        assert_eq!(pending.waiting, 2);
        pending.settle(7, 0, Ok(()));
        pending.settle(7, 0, Err(KafkaError::Canceled));
        assert_eq!(pending.waiting, 1);
        assert!(matches!(pending.outcomes[0], Some(Ok(()))));
        pending.settle(7, 5, Ok(()));
        assert_eq!(pending.waiting, 1);
    }
}
