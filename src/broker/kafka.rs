//! [`Broker`] on Kafka, through librdkafka's synchronous `BaseProducer`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::properties::{parse_java_properties, Properties, RecordTimestamp};
use super::reports::{redact, Pending, Reports};
use super::Broker;
use crate::error::{Error, Result};
use crate::message::MESSAGE_ID_HEADER;
use crate::record::Record;

/// Time past the delivery timeout that `publish` waits for the last delivery reports.
const REPORT_GRACE: Duration = Duration::from_secs(2);
/// How long `publish` sleeps between two looks for delivery reports that found none.
///
/// It polls with a zero timeout and sleeps itself: rdkafka's `poll` rounds what is left of
/// its timeout down to whole milliseconds, so a short timed poll spins instead of
/// blocking, and a longer one always lasts its whole timeout. (librdkafka's own timed
/// waits also take absolute wall-clock deadlines, which a process under `faketime` never
/// reaches.)
const REPORT_PAUSE: Duration = Duration::from_micros(200);

/// Publishes to Kafka with `acks=all`, idempotence on and the JVM client's key
/// partitioning (`murmur2_random`), so the same key lands in the same partition as with a
/// Java producer.
///
/// A batch is sent whole, and a key's order then rests on the broker: a broker that
/// enforces the idempotent producer's sequence numbers (Apache Kafka, Redpanda) appends
/// nothing of a partition behind a message it refused, and `enable.gapless.guarantee`
/// makes such a refusal stop the producer, whose queued messages are purged unsent
/// (reported [`Error::NotSent`], released untried) before the producer is replaced. A
/// broker that does not enforce them (the test broker, Tansu) appends a key's later
/// messages behind the gap: with [`STRICT_KEY_ORDER`](crate::STRICT_KEY_ORDER)`=true`, one message of a key is in
/// flight at a time, each sent after the one before it was acknowledged, so that a
/// refusal holds back the rest of its key whatever the broker does, at one round trip
/// per message of a key in a batch.
///
/// Each record carries the message's headers in order, then
/// [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER) with the message id, and as its
/// timestamp the time the message was added (its row's `created_on`), however late it is
/// published; [`RECORD_TIMESTAMP`](crate::RECORD_TIMESTAMP)`=publish` gives it the time
/// of publishing instead.
///
/// ```no_run
/// # fn main() -> outbox::Result<()> {
/// let broker = outbox::KafkaBroker::with_properties(
///     "kafka-1:9092,kafka-2:9092",
///     [("compression.type", "lz4"), ("message.timeout.ms", "60000")],
/// )?;
/// # Ok(()) }
/// ```
pub struct KafkaBroker {
    config: ClientConfig,
    producer: BaseProducer<Reports>,
    delivery_timeout: Duration,
    /// One message of a key in flight at a time
    /// ([`STRICT_KEY_ORDER`](crate::STRICT_KEY_ORDER)).
    strict_key_order: bool,
    /// What each record's timestamp is ([`RECORD_TIMESTAMP`](crate::RECORD_TIMESTAMP)).
    timestamps: RecordTimestamp,
    batch: u64,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// A producer for the comma-separated `bootstrap_servers`, with the defaults above and
    /// `message.timeout.ms` = 30 s.
    ///
    /// Its [`delivery_timeout`](Broker::delivery_timeout), the longest a publish can wait
    /// for its last delivery report, is `message.timeout.ms` + `request.timeout.ms`
    /// (default 30 s): a message sent just before its own timeout waits for its request.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if no bootstrap server resolves to an address; [`Error::Kafka`] if
    /// librdkafka refuses the configuration. A broker that resolves but does not answer is
    /// not an error here: it shows as failed deliveries.
    pub fn new(bootstrap_servers: &str) -> Result<KafkaBroker> {
        KafkaBroker::with_properties(bootstrap_servers, std::iter::empty::<(&str, &str)>())
    }

    /// As [`new`](KafkaBroker::new), with further librdkafka properties (TLS, SASL,
    /// compression, timeouts...). They override the defaults, under whichever of
    /// librdkafka's names they are given (`linger.ms` or `queue.buffering.max.ms`,
    /// `delivery.timeout.ms` or `message.timeout.ms`, `acks` or `request.required.acks`).
    ///
    /// Properties that would break the outbox's guarantees are refused: `acks` other
    /// than `all`, `enable.idempotence=false`, `partitioner=random` and
    /// `enable.gapless.guarantee=false` unless [`ALLOW_WEAK_DELIVERY`](crate::ALLOW_WEAK_DELIVERY)`=true` is given
    /// too, and `message.timeout.ms=0` (never time out) always.
    /// [`STRICT_KEY_ORDER`](crate::STRICT_KEY_ORDER)`=true`
    /// sends one message of a key at a time.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] for an unknown property or a bad value; [`Error::Config`] for the
    /// refusals above, one property given two values under two names, or as for
    /// [`new`](KafkaBroker::new).
    pub fn with_properties<K, V>(
        bootstrap_servers: &str,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> Result<KafkaBroker>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let properties = Properties::resolve(bootstrap_servers, properties)?;
        let mut config = ClientConfig::new();
        for (name, value) in &properties.librdkafka {
            config.set(name, value);
        }
        let secrets = properties.secrets();
        let context = Reports {
            pending: Mutex::default(),
            secrets: secrets.clone(),
        };
        let producer = config
            .create_with_context(context)
            .map_err(|e| Error::Kafka(redact(e, &secrets)))?;
        Ok(KafkaBroker {
            config,
            producer,
            delivery_timeout: properties.delivery_timeout,
            strict_key_order: properties.strict_key_order,
            timestamps: properties.timestamps,
            batch: 0,
        })
    }

    /// The properties in the Java `.properties` file at `path` (Kafka's
    /// `client.properties`: `name=value` lines, `#` comments, `\` escapes and
    /// continuations), in order, for [`with_properties`](KafkaBroker::with_properties).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the file cannot be read, or for a malformed escape; the
    /// message names the file and the line, never a value.
    pub fn properties_file(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("Kafka properties file {}: {e}", path.display())))?;
        parse_java_properties(&text).map_err(|e| match e {
            Error::Config(reason) => Error::config(format!(
                "Kafka properties file {}: {reason}",
                path.display()
            )),
            other => other,
        })
    }

    /// Checks that the cluster answers: asks it for its metadata, waiting at most
    /// `timeout`. For readiness checks.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] when no broker answered in time.
    pub fn reachable(&self, timeout: Duration) -> Result<()> {
        self.producer
            .client()
            .fetch_metadata(None, timeout)
            .map(|_| ())
            .map_err(Error::Kafka)
    }

    /// Queues `record`, with the trace headers `trace` in place of any stored under
    /// their names.
    fn send(
        &self,
        index: usize,
        record: &Record,
        trace: &[(String, String)],
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        let message = &record.message;
        let message_id = record.message_id.hyphenated().to_string();
        let mut headers =
            OwnedHeaders::new_with_capacity(message.headers().len() + trace.len() + 1);
        let replaced = |name: &str| trace.iter().any(|(t, _)| t.eq_ignore_ascii_case(name));
        for (name, value) in message.headers() {
            if !replaced(name) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
        for (name, value) in trace {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        headers = headers.insert(Header {
            key: MESSAGE_ID_HEADER,
            value: Some(&message_id),
        });
        let mut base = BaseRecord::with_opaque_to(message.topic(), Box::new((self.batch, index)))
            .payload(message.payload())
            .headers(headers);
        if self.timestamps == RecordTimestamp::Created {
            let millis = record
                .created
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| {
                    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
                });
            base = base.timestamp(millis);
        }
        if let Some(key) = message.key() {
            base = base.key(key);
        }
        loop {
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    base = back;
                    self.producer.poll(Duration::ZERO);
                    std::thread::sleep(REPORT_PAUSE);
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

impl KafkaBroker {
    /// Polls for delivery reports until every record of `wave` has its outcome, or the
    /// deadline passes.
    fn await_reports(&self, wave: &[usize], deadline: Instant) {
        let waiting = || {
            let pending = self.producer.context().pending.lock();
            wave.iter()
                .filter(|&&i| matches!(pending.outcomes.get(i), Some(None)))
                .count()
        };
        let mut before = waiting();
        while before > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::ZERO);
            let now = waiting();
            if now == before {
                std::thread::sleep(REPORT_PAUSE);
            }
            before = now;
        }
    }

    /// Replaces the producer with a new one (and so a new producer id) when it hit a fatal
    /// error, or when a whole batch timed out. An idempotent producer keeps its sequence
    /// state across failures; a broker that lost that state (restarted without it) will
    /// not take its messages any more, and librdkafka retries them until they time out,
    /// for good. A new producer starts afresh; the relay retries what failed, and what was
    /// acknowledged stays acknowledged. With the broker simply down, replacing it changes
    /// nothing but the connection attempts.
    fn renew_if_stuck(&mut self, outcomes: &[Result<(), KafkaError>]) {
        let timed_out = |o: &Result<(), KafkaError>| {
            matches!(
                o,
                Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut
                ))
            )
        };
        // Errors after which the broker will not take this producer's messages any more.
        let fenced = |o: &Result<(), KafkaError>| {
            matches!(
                o,
                Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                        | RDKafkaErrorCode::OutOfOrderSequenceNumber
                        | RDKafkaErrorCode::UnknownProducerId
                        | RDKafkaErrorCode::InvalidProducerIdMapping
                ))
            )
        };
        let fatal = self.producer.client().fatal_error();
        let all_timed_out = !outcomes.is_empty() && outcomes.iter().all(timed_out);
        let was_fenced = outcomes.iter().any(fenced);
        if fatal.is_none() && !all_timed_out && !was_fenced {
            return;
        }
        match &fatal {
            Some((code, reason)) => {
                log::warn!(
                    "kafka producer stopped on a fatal error ({code:?}: {reason}); replacing it"
                )
            }
            None if was_fenced => {
                log::warn!("the broker no longer accepts the kafka producer's id; replacing it")
            }
            None => log::warn!("every message of a batch timed out; replacing the kafka producer"),
        }
        let context = Reports {
            pending: Mutex::default(),
            secrets: self.producer.context().secrets.clone(),
        };
        match self.config.create_with_context(context) {
            Ok(producer) => self.producer = producer,
            Err(e) => log::error!("could not create a new kafka producer: {e}"),
        }
    }
}

impl Broker for KafkaBroker {
    fn publish(&mut self, records: &[Record]) -> Vec<Result<()>> {
        self.batch = self.batch.wrapping_add(1);
        let deadline = Instant::now()
            .checked_add(self.delivery_timeout.saturating_add(REPORT_GRACE))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 60 * 60));
        *self.producer.context().pending.lock() = Pending::new(self.batch, records.len());
        #[cfg(feature = "opentelemetry")]
        let spans = super::spans::PublishSpans::begin(records);
        let trace = |index: usize| -> Vec<(String, String)> {
            #[cfg(feature = "opentelemetry")]
            return spans.fields(index);
            #[cfg(not(feature = "opentelemetry"))]
            {
                let _ = index;
                Vec::new()
            }
        };
        let waves = if self.strict_key_order {
            waves_by_key(records)
        } else {
            vec![(0..records.len()).collect()]
        };
        // A key whose message failed (or could not even be queued) sends nothing more this
        // batch: its later messages would otherwise overtake it.
        let mut failed_keys = HashSet::new();
        for wave in &waves {
            for &index in wave {
                let key = records[index].message.order_key();
                let sent = match &key {
                    Some(k) if failed_keys.contains(k) => Err(KafkaError::Canceled),
                    _ if Instant::now() >= deadline => Err(KafkaError::Canceled),
                    _ => self.send(index, &records[index], &trace(index), deadline),
                };
                if let Err(e) = sent {
                    failed_keys.extend(key);
                    self.producer
                        .context()
                        .pending
                        .lock()
                        .settle(self.batch, index, Err(e));
                }
            }
            self.await_reports(wave, deadline);
            let pending = self.producer.context().pending.lock();
            for &index in wave {
                if !matches!(pending.outcomes.get(index), Some(Some(Ok(())))) {
                    failed_keys.extend(records[index].message.order_key());
                }
            }
        }
        let pending = std::mem::take(&mut *self.producer.context().pending.lock());
        let outcomes: Vec<Result<(), KafkaError>> = pending
            .outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or(Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                )))
            })
            .collect();
        #[cfg(feature = "opentelemetry")]
        spans.end(
            &outcomes
                .iter()
                .map(|o| o.clone().map_err(|e| e.to_string()))
                .collect::<Vec<_>>(),
            &pending.placed,
        );
        self.renew_if_stuck(&outcomes);
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map_err(|e| match e {
                    // Purged from the queue, never sent: behind a refusal that stopped the
                    // producer, or a message of its key that could not be queued.
                    KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue)
                    | KafkaError::Canceled => Error::NotSent(e.to_string()),
                    e => Error::Kafka(e),
                })
            })
            .collect()
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        // `publish` waits for every report, so nothing should be queued; don't hang on exit.
        let _ = self.producer.flush(Duration::from_secs(1));
    }
}

/// The records in waves: the first message of every key (and every message without a
/// key), then the second of every key, and so on; each wave in id order.
fn waves_by_key(records: &[Record]) -> Vec<Vec<usize>> {
    let mut runs: HashMap<(&str, &[u8]), usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let wave = match record.message.order_key() {
            Some(key) => {
                let run = runs.entry(key).or_insert(0);
                *run += 1;
                *run - 1
            }
            None => 0,
        };
        if waves.len() <= wave {
            waves.resize_with(wave + 1, Vec::new);
        }
        waves[wave].push(index);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::STRICT_KEY_ORDER;

    #[test]
    fn delivery_timeout_is_message_timeout_plus_request_timeout() {
        let broker = KafkaBroker::with_properties(
            "127.0.0.1:9",
            [
                ("message.timeout.ms", "1500"),
                ("request.timeout.ms", "700"),
            ],
        )
        .unwrap();
        assert_eq!(broker.delivery_timeout(), Duration::from_millis(2200));
        assert_eq!(
            KafkaBroker::new("127.0.0.1:9").unwrap().delivery_timeout(),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn waves_hold_one_message_of_a_key_each_in_id_order() {
        let record = |id: u64, topic: &str, key: Option<&str>| {
            let message = Message::new(topic, "p");
            Record {
                id,
                message_id: uuid::Uuid::nil(),
                attempts: 0,
                created: std::time::SystemTime::now(),
                message: match key {
                    Some(key) => message.with_key(key),
                    None => message,
                },
            }
        };
        let records = [
            record(1, "t", Some("a")),
            record(2, "t", Some("a")),
            record(3, "t", None),
            record(4, "u", Some("a")),
            record(5, "t", Some("b")),
            record(6, "t", Some("a")),
            record(7, "t", None),
        ];
        assert_eq!(
            waves_by_key(&records),
            vec![vec![0, 2, 3, 4, 6], vec![1], vec![5]]
        );
        assert!(
            KafkaBroker::with_properties("127.0.0.1:9", [(STRICT_KEY_ORDER, "true")])
                .unwrap()
                .strict_key_order
        );
        assert!(!KafkaBroker::new("127.0.0.1:9").unwrap().strict_key_order);
    }

    #[test]
    fn a_refused_secret_never_appears_in_the_error() {
        // Refused at configuration (this build has no libcurl for OAuth), the error
        // repeating the value; and refused at creation (not a PEM key).
        for (name, protocol) in [
            ("sasl.oauthbearer.method", "plaintext"),
            ("ssl.key.pem", "ssl"),
        ] {
            let refused = KafkaBroker::with_properties(
                "127.0.0.1:9",
                [(name, "hunter2-secret"), ("security.protocol", protocol)],
            )
            .expect_err("refused");
            let text = format!("{refused} {refused:?}");
            assert!(text.contains(name), "{text}");
            assert!(!text.contains("hunter2-secret"), "{text}");
        }
        let secrets = vec!["s3cret".to_string()];
        let creation = KafkaError::ClientCreation("bad sasl.password s3cret".into());
        assert_eq!(
            redact(creation, &secrets).to_string(),
            "Client creation error: bad sasl.password [redacted]"
        );
    }

    #[test]
    fn unknown_property_is_an_error() {
        assert!(matches!(
            KafkaBroker::with_properties("127.0.0.1:9", [("no.such.property", "1")]),
            Err(Error::Kafka(_))
        ));
    }
}
