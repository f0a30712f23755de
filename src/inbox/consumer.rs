//! The inbox's consumer loop: records from Kafka, each applied in one MySQL transaction
//! with its id, on an OS thread.

use crossbeam_channel::Receiver;
use mysql::Transaction;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::apply::{HandlerError, Loop};
use super::cleaner::Cleaner;
use super::context::Context;
use super::revoked::Revoked;
use super::{check_consumer, Assignment, Delivery, Inbox, InboxSettings};
use crate::broker::{redact, resolves, secret_values};
use crate::error::{Error, Result, Worker};
use crate::metrics::InboxMeter;
use crate::runtime::{DispatcherHandle, Health};

/// Consumes records from Kafka into MySQL through an [`Inbox`], each applied once: for
/// each record, in one transaction, it records the message id, calls the handler (not for
/// a duplicate), commits, and only then lets the record's offset go.
///
/// It runs on two OS threads: the consumer (`outbox-consumer`), which handles records in
/// offset order per partition, up to `batch_size` in one transaction, and replays the dead
/// records an operator asked for; and the cleaner (`outbox-cleaner`), which deletes processed ids past their
/// retention.
///
/// A handler that fails is tried again with backoff; after `max_attempts` failures the
/// record goes to the dead table with its error and the partition moves on. A database
/// outage is waited out and is never counted as an attempt.
pub struct InboxConsumer {
    inbox: Inbox,
    name: String,
    consumer: BaseConsumer<Context>,
    assignment: Assignment,
    settings: InboxSettings,
}

impl std::fmt::Debug for InboxConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumer")
            .field("inbox", &self.inbox)
            .field("name", &self.name)
            .field("assignment", &self.assignment)
            .finish_non_exhaustive()
    }
}

impl InboxConsumer {
    /// A consumer named `name` (1 to 100 characters: the `consumer` of the rows it writes
    /// and, with [`Assignment::Group`], its consumer group) of the Kafka cluster at
    /// `bootstrap_servers`.
    ///
    /// # Errors
    ///
    /// As [`with_properties`](InboxConsumer::with_properties).
    pub fn new(
        inbox: Inbox,
        name: &str,
        bootstrap_servers: &str,
        assignment: Assignment,
        settings: InboxSettings,
    ) -> Result<InboxConsumer> {
        InboxConsumer::with_properties(
            inbox,
            name,
            bootstrap_servers,
            assignment,
            settings,
            std::iter::empty::<(&str, &str)>(),
        )
    }

    /// As [`new`](InboxConsumer::new), with further librdkafka consumer properties
    /// (TLS, SASL, `session.timeout.ms`, `auto.offset.reset`...), which override the
    /// defaults: `group.id` = the name, `auto.offset.reset=earliest`, offsets stored only
    /// by the consumer after each commit and committed every 5 s
    /// (`enable.auto.offset.store=false`), and no Kafka commits at all with
    /// [`Assignment::Partitions`]. The same properties file as the relay's can be used
    /// ([`KafkaBroker::properties_file`](crate::KafkaBroker::properties_file)); the
    /// producer's own properties in it are left out.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for bad settings, a bad name, no topic or partition to read,
    /// `enable.auto.offset.store=true` (it would commit offsets of records not yet
    /// applied) or no bootstrap server that resolves; [`Error::Kafka`] for a property
    /// librdkafka refuses.
    pub fn with_properties<K, V>(
        inbox: Inbox,
        name: &str,
        bootstrap_servers: &str,
        assignment: Assignment,
        settings: InboxSettings,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> Result<InboxConsumer>
    where
        K: Into<String>,
        V: Into<String>,
    {
        settings.validate()?;
        check_consumer(name)?;
        match &assignment {
            Assignment::Group(topics) if topics.is_empty() => {
                return Err(Error::config("a consumer group needs at least one topic"))
            }
            Assignment::Partitions(partitions) if partitions.is_empty() => {
                return Err(Error::config(
                    "an explicit assignment needs at least one partition",
                ))
            }
            Assignment::Topics(topics) if topics.is_empty() => {
                return Err(Error::config(
                    "an explicit assignment needs at least one topic",
                ))
            }
            _ => {}
        }
        if !bootstrap_servers.split(',').any(resolves) {
            return Err(Error::config(format!(
                "none of the Kafka bootstrap servers {bootstrap_servers:?} resolves to an address"
            )));
        }
        let grouped = matches!(assignment, Assignment::Group(_));
        let mut config = ClientConfig::new();
        for (property, value) in [
            ("bootstrap.servers", bootstrap_servers),
            ("group.id", name),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", if grouped { "true" } else { "false" }),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
        ] {
            config.set(property, value);
        }
        let mut secrets = Vec::new();
        for (property, value) in properties {
            let (property, value): (String, String) = (property.into(), value.into());
            let property = property.trim();
            if PRODUCER_ONLY.contains(&property) || property.starts_with("outbox.") {
                continue;
            }
            if property == "enable.auto.offset.store" && value.trim() != "false" {
                return Err(Error::config(
                    "enable.auto.offset.store must stay false: the inbox stores each offset \
                     after the record's transaction committed",
                ));
            }
            if !grouped && property == "enable.auto.commit" {
                continue;
            }
            secrets.extend(secret_values(property, &value));
            config.set(property, value);
        }
        let context = Context {
            name: name.to_string(),
            secrets: secrets.clone(),
            revoked: Revoked::default(),
        };
        config.set_log_level(RDKafkaLogLevel::Info);
        let consumer = config
            .create_with_context(context)
            .map_err(|e| Error::Kafka(redact(e, &secrets)))?;
        Ok(InboxConsumer {
            inbox,
            name: name.to_string(),
            consumer,
            assignment,
            settings,
        })
    }

    /// Subscribes (or assigns), spawns the consumer and the cleaner, and returns their
    /// handle.
    ///
    /// `handler` is the application's code for one record, called for every record that
    /// is not a duplicate: it writes the record's effect through `tx`, the transaction that
    /// also records the message id. It cannot commit or roll back (`tx` is borrowed), and
    /// should not talk to systems that cannot roll back with it. Any error rolls the
    /// transaction back: a transient database error (a lost connection, a deadlock, a lock
    /// wait timeout) is tried again without counting an attempt; any other counts one.
    /// A panic counts as an error.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] if the subscription is refused; [`Error::Thread`] if the system
    /// refuses a thread, and then no thread is left running.
    pub fn start<H>(self, handler: H) -> Result<InboxHandle>
    where
        H: FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + 'static,
    {
        if let Assignment::Group(topics) = &self.assignment {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            self.consumer.subscribe(&topics)?;
        }
        let (mut handle, signals, _wake) =
            DispatcherHandle::prepare("inbox consumer", self.name.clone());
        log::info!("inbox consumer {} starting", self.name);
        let meter = InboxMeter::new(&self.name);
        let cleaner = Cleaner {
            inbox: self.inbox.clone(),
            name: self.name.clone(),
            meter: meter.clone(),
            settings: self.settings.clone(),
        };
        let consumer = self.consumer;
        let loop_ = Loop {
            inbox: self.inbox,
            name: self.name,
            meter,
            assignment: self.assignment,
            settings: self.settings,
            conn: None,
            signals: signals.clone(),
        };
        handle.spawn(Worker::Consumer, &signals, move || {
            loop_.run(consumer, handler)
        })?;
        let sig = signals.clone();
        handle.spawn(Worker::Cleaner, &signals, move || cleaner.run(sig))?;
        Ok(InboxHandle(handle))
    }
}

/// librdkafka properties of producers only, which a shared properties file may hold.
const PRODUCER_ONLY: [&str; 14] = [
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "partitioner",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "linger.ms",
    "queue.buffering.max.ms",
    "enable.gapless.guarantee",
    "compression.type",
    "compression.codec",
    "batch.size",
    "batch.num.messages",
    "retries",
];

/// A running inbox consumer. [`stop`](InboxHandle::stop) it, or drop it, to stop and
/// join its threads.
#[derive(Debug)]
pub struct InboxHandle(DispatcherHandle);

impl InboxHandle {
    /// Errors from the threads as they happen: handler failures, database and Kafka
    /// errors, a thread's panic. Never blocks the threads: when the channel is full
    /// (1,024 errors), newer ones are only logged.
    pub fn errors(&self) -> &Receiver<Error> {
        self.0.errors()
    }

    /// True until the consumer is stopped or one of its threads dies.
    pub fn is_running(&self) -> bool {
        self.0.is_running()
    }

    /// Each thread's health, as [`DispatcherHandle::health`] gives the dispatcher's.
    pub fn health(&self) -> Health {
        self.0.health()
    }

    /// Runs until `stop` gives a value (or is dropped) or a thread dies, then stops; as
    /// [`DispatcherHandle::run_until`].
    ///
    /// # Errors
    ///
    /// As [`DispatcherHandle::run_until`].
    pub fn run_until<T>(&mut self, stop: &Receiver<T>) -> Result<Option<T>> {
        self.0.run_until(stop)
    }

    /// Gives the stop signal and joins the threads. The batch being handled is finished
    /// first (a handler waiting out its backoff stops waiting: what is not applied yet is
    /// read again after a restart); with a consumer group, the offsets of what was
    /// handled are committed and the group is left. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::WorkerPanicked`] for the first thread that panicked.
    pub fn stop(&mut self) -> Result<()> {
        self.0.stop()
    }
}
