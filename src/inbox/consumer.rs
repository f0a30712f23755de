//! The inbox's consumer loop: records from Kafka, each applied in one MySQL transaction
//! with its id, on an OS thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, tick, Receiver};
use mysql::{PooledConn, Transaction, TxOpts};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::revoked::Revoked;
use super::{check_consumer, Delivery, Inbox, InboxSettings, Recorded};
use crate::broker::{forward_log, redact, resolves, secret_values};
use crate::dispatcher::backoff::backoff;
use crate::dispatcher::maintenance::purge_all;
use crate::dispatcher::signal::{panic_text, Signals};
use crate::dispatcher::{DispatcherHandle, Health};
use crate::error::{is_transient_database, Error, Result, Worker};
use crate::metrics::InboxMeter;

/// What a handler returns when it fails: any error. The record is tried again, and after
/// `max_attempts` failures it goes to the dead table with this error's text.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The application's handler, as [`InboxConsumer::start`] takes it.
trait Handler:
    FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + 'static
{
}

impl<F> Handler for F where
    F: FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + 'static
{
}

/// Which partitions a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Every partition of these topics, shared with the other members of the Kafka
    /// consumer group named after the consumer. Offsets are committed to Kafka, only for
    /// records whose transaction committed, and when a partition is taken away, for
    /// everything handled before.
    Group(Vec<String>),
    /// These partitions (topic and partition number), with no consumer group: for
    /// brokers or deployments without group coordination. The next offset of each is kept
    /// in MySQL (`inbox_offsets`), written in the transaction of the record before it; a
    /// partition with none saved is read from its beginning.
    Partitions(Vec<(String, i32)>),
    /// Every partition of these topics, as [`Partitions`](Assignment::Partitions): found in
    /// the cluster's metadata when the consumer starts (a partition added later is read
    /// after a restart).
    Topics(Vec<String>),
}

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

/// How one record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    Dead,
    /// The stop signal came before it was settled.
    Stopped,
}

/// The consumer thread's state.
struct Loop {
    inbox: Inbox,
    name: String,
    meter: InboxMeter,
    assignment: Assignment,
    settings: InboxSettings,
    conn: Option<PooledConn>,
    signals: Signals,
}

impl Loop {
    fn run<H: Handler>(mut self, consumer: BaseConsumer<Context>, mut handler: H) {
        if !matches!(self.assignment, Assignment::Group(_)) {
            let mut waits = 0;
            while let Err(e) = self.assign(&consumer) {
                if self.wait_out(e, &mut waits) {
                    return;
                }
            }
        }
        let mut next_replay = Instant::now();
        let mut batch: Vec<Delivery> = Vec::with_capacity(self.settings.batch_size);
        while !self.signals.stopped() {
            if Instant::now() >= next_replay {
                self.replay(&mut handler);
                next_replay = Instant::now() + self.settings.replay_interval;
            }
            // The first record waits up to `poll_timeout`; the rest of the batch is what
            // has already arrived.
            batch.clear();
            let mut timeout = self.settings.poll_timeout;
            while batch.len() < self.settings.batch_size {
                let polled = consumer.poll(timeout);
                // A rebalance inside that poll may have taken partitions away: what was
                // gathered of them is the next owner's.
                let dropped = consumer.context().revoked.drop_from(&mut batch);
                if dropped > 0 {
                    log::info!(
                        "inbox {}: {dropped} records of revoked partitions left to their next owner",
                        self.name
                    );
                }
                match polled {
                    Some(Ok(record)) => batch.push(Delivery::from_kafka(&record)),
                    Some(Err(e)) => {
                        self.signals.report(Error::Kafka(e));
                        break;
                    }
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            if batch.is_empty() {
                self.signals.succeeded(Worker::Consumer);
                continue;
            }
            let started = Instant::now();
            if self.apply_batch(&batch, &mut handler) == Outcome::Stopped {
                break;
            }
            self.meter.batch(started.elapsed());
            if matches!(self.assignment, Assignment::Group(_)) {
                if let Err(e) = store_offsets(&consumer, &batch) {
                    self.signals.report(e);
                }
            }
            self.signals.succeeded(Worker::Consumer);
        }
        if matches!(self.assignment, Assignment::Group(_)) {
            commit_stored(&consumer, &self.name);
        }
    }

    /// Assigns the partitions from the offsets saved in MySQL, the beginning where none is.
    fn assign(&mut self, consumer: &BaseConsumer<Context>) -> Result<()> {
        let partitions = match &self.assignment {
            Assignment::Partitions(partitions) => partitions.clone(),
            Assignment::Topics(topics) => partitions_of(consumer, topics)?,
            Assignment::Group(_) => return Ok(()),
        };
        let saved = self.with_conn(|inbox, conn, name| inbox.offsets(conn, name))?;
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &partitions {
            let offset = saved
                .iter()
                .find(|(t, p, _)| t == topic && p == partition)
                .map_or(Offset::Beginning, |(_, _, next)| Offset::Offset(*next));
            list.add_partition_offset(topic, *partition, offset)?;
        }
        consumer.assign(&list)?;
        log::info!(
            "inbox {}: assigned {} partitions",
            self.name,
            partitions.len()
        );
        Ok(())
    }

    /// Runs `work` on the thread's connection, taking a new one from the pool if there
    /// is none; a connection that failed is dropped.
    fn with_conn<T>(
        &mut self,
        work: impl FnOnce(&Inbox, &mut PooledConn, &str) -> Result<T>,
    ) -> Result<T> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.inbox.pool().get_conn()?,
        };
        let result = work(&self.inbox, &mut conn, &self.name);
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result
    }

    /// Reports that `delivery` was settled with `outcome`.
    fn settled(&self, delivery: &Delivery, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Dead => "dead",
            Outcome::Stopped => return,
        };
        self.meter
            .settled(delivery.topic(), outcome, delivery.timestamp());
    }

    /// Reports `error`, which is not the handler's, and waits the `waits`-th backoff
    /// (counting it); true if the stop signal came instead.
    fn wait_out(&self, error: Error, waits: &mut u32) -> bool {
        self.signals.report(error);
        *waits += 1;
        self.pause(backoff(
            *waits,
            self.settings.backoff_min,
            self.settings.backoff_max,
        ))
    }

    /// Waits for `duration` or the stop signal; true if it was the stop signal.
    fn pause(&self, duration: Duration) -> bool {
        self.signals.pause(duration);
        self.signals.stopped()
    }

    /// Applies `batch` in one transaction. When the handler fails on a record, that
    /// transaction is rolled back: the records before it are applied again as a batch,
    /// the failed one alone (the failure counts as its first attempt), then the rest.
    /// Returns [`Outcome::Stopped`] if the stop signal came before all were settled.
    fn apply_batch(&mut self, batch: &[Delivery], handler: &mut impl Handler) -> Outcome {
        match batch {
            [] => return Outcome::Applied,
            [one] => return self.apply(one, handler, None),
            _ => {}
        }
        let grouped = matches!(self.assignment, Assignment::Group(_));
        let mut waits = 0u32;
        loop {
            let attempt = self.with_conn(|inbox, conn, name| {
                let mut tx = conn.start_transaction(TxOpts::default())?;
                let recorded = match inbox.record_all(&mut tx, name, batch)? {
                    Some(recorded) => recorded,
                    // Another transaction recorded one of them meanwhile: one by one.
                    None => return Ok(BatchEnd::Raced),
                };
                for (index, delivery) in batch.iter().enumerate() {
                    if recorded[index] == Recorded::New {
                        if let Err(failure) = call(handler, &mut tx, delivery) {
                            return Ok(BatchEnd::Failed(index, failure));
                        }
                    }
                }
                if !grouped {
                    for last in last_of_each_partition(batch) {
                        inbox.save_offset(&mut tx, name, last)?;
                    }
                }
                tx.commit()?;
                Ok(BatchEnd::Committed(recorded))
            });
            match attempt {
                Ok(BatchEnd::Committed(recorded)) => {
                    for (delivery, recorded) in batch.iter().zip(recorded) {
                        self.settled(delivery, recorded.into());
                    }
                    return Outcome::Applied;
                }
                Ok(BatchEnd::Raced) => {
                    for delivery in batch {
                        if self.apply(delivery, handler, None) == Outcome::Stopped {
                            return Outcome::Stopped;
                        }
                    }
                    return Outcome::Applied;
                }
                Ok(BatchEnd::Failed(index, failure)) => {
                    if failure.transient {
                        self.conn = None;
                    }
                    let (before, rest) = batch.split_at(index);
                    let Some((failed, after)) = rest.split_first() else {
                        return Outcome::Stopped;
                    };
                    for outcome in [
                        self.apply_batch(before, handler),
                        self.apply(failed, handler, Some(failure)),
                        self.apply_batch(after, handler),
                    ] {
                        if outcome == Outcome::Stopped {
                            return Outcome::Stopped;
                        }
                    }
                    return Outcome::Applied;
                }
                Err(e) => {
                    if self.wait_out(e, &mut waits) {
                        return Outcome::Stopped;
                    }
                }
            }
        }
    }

    /// Handles one record until it is applied, found a duplicate, or dead; `failed` is
    /// how a first attempt made elsewhere (in a batch) ended.
    fn apply(
        &mut self,
        delivery: &Delivery,
        handler: &mut impl Handler,
        mut failed: Option<Failure>,
    ) -> Outcome {
        let mut attempts = 0u32;
        let mut waits = 0u32;
        loop {
            let grouped = matches!(self.assignment, Assignment::Group(_));
            let attempt = match failed.take() {
                Some(failure) => Ok((Recorded::New, Some(failure))),
                None => self.with_conn(|inbox, conn, name| {
                    let mut tx = conn.start_transaction(TxOpts::default())?;
                    let recorded = inbox.record(&mut tx, name, delivery)?;
                    let failure = match recorded {
                        Recorded::Duplicate => None,
                        Recorded::New => call(handler, &mut tx, delivery).err(),
                    };
                    if failure.is_none() {
                        if !grouped {
                            inbox.save_offset(&mut tx, name, delivery)?;
                        }
                        tx.commit()?;
                    }
                    Ok((recorded, failure))
                }),
            };
            let wait = match attempt {
                Ok((recorded, None)) => {
                    let outcome = recorded.into();
                    self.settled(delivery, outcome);
                    return outcome;
                }
                Ok((_, Some(failure))) => {
                    // The transaction was rolled back when it was dropped.
                    if failure.transient {
                        self.conn = None;
                        if self.wait_out(failure.error, &mut waits) {
                            return Outcome::Stopped;
                        }
                        continue;
                    } else {
                        attempts += 1;
                        self.meter.failed(delivery.topic());
                        log::debug!(
                            "inbox {}: handler failed on {} ({}/{}@{}), attempt {attempts} of {}: {}",
                            self.name,
                            delivery.message_id(),
                            delivery.topic(),
                            delivery.partition(),
                            delivery.offset(),
                            self.settings.max_attempts,
                            failure.error
                        );
                        if attempts >= self.settings.max_attempts {
                            return self.bury(delivery, &failure.error.to_string(), attempts);
                        }
                        self.signals.report(failure.error);
                        backoff(
                            attempts,
                            self.settings.backoff_min,
                            self.settings.backoff_max,
                        )
                    }
                }
                Err(e) => {
                    // Not the handler's fault: the database. Waited out, never counted;
                    // a commit that failed is found a duplicate if it had gone through.
                    if self.wait_out(e, &mut waits) {
                        return Outcome::Stopped;
                    }
                    continue;
                }
            };
            if self.pause(wait) {
                return Outcome::Stopped;
            }
        }
    }

    /// Moves `delivery` to the dead table (in explicit mode with its next offset), trying
    /// until the database takes it or the stop signal comes.
    fn bury(&mut self, delivery: &Delivery, error: &str, attempts: u32) -> Outcome {
        log::error!(
            "inbox {}: message {} ({}/{}@{}) is dead after {attempts} attempts: {error}",
            self.name,
            delivery.message_id(),
            delivery.topic(),
            delivery.partition(),
            delivery.offset()
        );
        let grouped = matches!(self.assignment, Assignment::Group(_));
        let mut waits = 0;
        loop {
            let buried = self.with_conn(|inbox, conn, name| {
                let mut tx = conn.start_transaction(TxOpts::default())?;
                inbox.bury(&mut tx, name, delivery, error, attempts)?;
                if !grouped {
                    inbox.save_offset(&mut tx, name, delivery)?;
                }
                Ok(tx.commit()?)
            });
            match buried {
                Ok(()) => {
                    self.settled(delivery, Outcome::Dead);
                    return Outcome::Dead;
                }
                Err(e) => {
                    if self.wait_out(e, &mut waits) {
                        return Outcome::Stopped;
                    }
                }
            }
        }
    }

    /// Runs the handler once on each dead record whose replay was asked for.
    fn replay(&mut self, handler: &mut impl Handler) {
        let requested = match self.with_conn(|inbox, conn, name| inbox.replays(conn, name, 100)) {
            Ok(requested) => requested,
            Err(e) => return self.signals.report(e),
        };
        for dead in requested {
            let delivery = &dead.delivery;
            let replayed = self.with_conn(|inbox, conn, name| {
                let mut tx = conn.start_transaction(TxOpts::default())?;
                let failure = match inbox.record(&mut tx, name, delivery)? {
                    Recorded::Duplicate => None,
                    Recorded::New => call(handler, &mut tx, delivery).err(),
                };
                match failure {
                    None => {
                        inbox.settle_replay(&mut tx, dead.id, None)?;
                        tx.commit()?;
                        Ok(None)
                    }
                    Some(failure) => {
                        drop(tx);
                        let text = failure.error.to_string();
                        let mut tx = conn.start_transaction(TxOpts::default())?;
                        inbox.settle_replay(&mut tx, dead.id, Some(&text))?;
                        tx.commit()?;
                        Ok(Some(text))
                    }
                }
            });
            match replayed {
                Ok(None) => log::info!(
                    "inbox {}: dead message {} replayed",
                    self.name,
                    delivery.message_id()
                ),
                Ok(Some(error)) => log::warn!(
                    "inbox {}: replaying dead message {} failed again: {error}",
                    self.name,
                    delivery.message_id()
                ),
                Err(e) => return self.signals.report(e),
            }
        }
    }
}

impl From<Recorded> for Outcome {
    fn from(recorded: Recorded) -> Outcome {
        match recorded {
            Recorded::New => Outcome::Applied,
            Recorded::Duplicate => Outcome::Duplicate,
        }
    }
}

/// How a batch's transaction ended.
enum BatchEnd {
    /// Committed, with whether each record was new.
    Committed(Vec<Recorded>),
    /// Another transaction recorded one of its ids meanwhile; rolled back.
    Raced,
    /// The handler failed on the record at this index; rolled back.
    Failed(usize, Failure),
}

/// A handler's failure, and whether it was a passing database error.
struct Failure {
    error: Error,
    transient: bool,
}

/// Calls `handler`, catching a panic as a failure.
fn call(
    handler: &mut impl Handler,
    tx: &mut Transaction<'_>,
    delivery: &Delivery,
) -> Result<(), Failure> {
    match catch_unwind(AssertUnwindSafe(|| handler(tx, delivery))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            let transient = is_transient(&*error);
            // A passing database error is the database's, not the handler's.
            let error = match error.downcast::<mysql::Error>() {
                Ok(e) if transient => Error::Database(*e),
                Ok(e) => Error::Handler(e),
                Err(error) => match error.downcast::<Error>() {
                    Ok(e) if transient => *e,
                    Ok(e) => Error::Handler(e),
                    Err(error) => Error::Handler(error),
                },
            };
            Err(Failure { error, transient })
        }
        Err(panic) => Err(Failure {
            error: Error::Handler(format!("handler panicked: {}", panic_text(&*panic)).into()),
            transient: false,
        }),
    }
}

/// Whether a handler's error is a database error that passes (a lost connection, a
/// deadlock, a lock wait timeout), found anywhere in its chain of sources.
fn is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(e) = e.downcast_ref::<Error>() {
            if matches!(e, Error::Database(_) | Error::PoolExhausted { .. }) {
                return e.is_retryable();
            }
        }
        if let Some(e) = e.downcast_ref::<mysql::Error>() {
            return is_transient_database(e);
        }
        current = e.source();
    }
    false
}

/// Every partition of `topics`, by the cluster's metadata.
fn partitions_of(
    consumer: &BaseConsumer<Context>,
    topics: &[String],
) -> Result<Vec<(String, i32)>> {
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .unwrap_or_default();
        if found.is_empty() {
            return Err(Error::Kafka(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            )));
        }
        partitions.extend(found.into_iter().map(|p| (topic.clone(), p)));
    }
    Ok(partitions)
}

/// How long the consumer waits for the cluster's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The last record of each partition in `batch`.
fn last_of_each_partition(batch: &[Delivery]) -> Vec<&Delivery> {
    let mut last: Vec<&Delivery> = Vec::new();
    for delivery in batch {
        match last
            .iter_mut()
            .find(|d| d.topic() == delivery.topic() && d.partition() == delivery.partition())
        {
            Some(seen) if seen.offset() < delivery.offset() => *seen = delivery,
            Some(_) => {}
            None => last.push(delivery),
        }
    }
    last
}

/// Stores, for the next commit to Kafka, the offset after the last record of each
/// partition in `batch`.
fn store_offsets(consumer: &BaseConsumer<Context>, batch: &[Delivery]) -> Result<()> {
    let mut list = TopicPartitionList::new();
    for last in last_of_each_partition(batch) {
        list.add_partition_offset(
            last.topic(),
            last.partition(),
            Offset::Offset(last.offset().saturating_add(1)),
        )?;
    }
    consumer.store_offsets(&list)?;
    Ok(())
}

/// Commits the offsets stored so far, at once; nothing stored is no error.
fn commit_stored(consumer: &BaseConsumer<Context>, name: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => log::debug!("inbox {name}: offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => log::warn!("inbox {name}: committing offsets: {e}"),
    }
}

/// librdkafka's callbacks for the consumer: its log lines, and the commit of what was
/// handled before partitions are taken away.
struct Context {
    name: String,
    secrets: Vec<String>,
    /// Partitions revoked inside `poll`, whose gathered records the loop drops.
    revoked: Revoked,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message, &self.secrets);
    }
}

impl ConsumerContext for Context {
    /// Rebalance callbacks run inside `poll`, between two records: every record handled
    /// has its offset stored, and is committed before the partition goes.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                log::info!(
                    "inbox {}: {} partitions revoked",
                    self.name,
                    partitions.count()
                );
                commit_stored(consumer, &self.name);
                self.revoked.note(
                    partitions
                        .elements()
                        .iter()
                        .map(|p| (p.topic().to_string(), p.partition())),
                );
            }
            Rebalance::Assign(partitions) => log::info!(
                "inbox {}: {} partitions assigned",
                self.name,
                partitions.count()
            ),
            Rebalance::Error(e) => log::warn!("inbox {}: rebalance: {e}", self.name),
        }
    }
}

/// Deletes processed ids past their retention.
struct Cleaner {
    inbox: Inbox,
    name: String,
    meter: InboxMeter,
    settings: InboxSettings,
}

impl Cleaner {
    fn run(self, signals: Signals) {
        let ticks = tick(self.settings.cleanup_interval);
        let mut conn: Option<PooledConn> = None;
        loop {
            let purged = (|| {
                let conn = match conn.as_mut() {
                    Some(conn) => conn,
                    None => conn.insert(self.inbox.pool().get_conn()?),
                };
                purge_all(&signals, self.settings.cleanup_batch_size, |limit| {
                    self.inbox
                        .purge(conn, &self.name, self.settings.retention, limit)
                })
            })();
            match purged {
                Ok(n) => {
                    if n > 0 {
                        self.meter.deleted(n);
                        log::info!(
                            "inbox {}: deleted {n} processed ids past their retention",
                            self.name
                        );
                    }
                    signals.succeeded(Worker::Cleaner);
                }
                Err(e) => {
                    conn = None;
                    signals.report(e);
                }
            }
            select! {
                recv(signals.stop) -> _ => return,
                recv(ticks) -> _ => {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: u16) -> mysql::Error {
        mysql::Error::MySqlError(mysql::MySqlError {
            state: "HY000".into(),
            message: "injected".into(),
            code,
        })
    }

    #[test]
    fn passing_database_errors_in_a_handler_are_not_counted_as_attempts() {
        let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transient: Vec<HandlerError> = vec![
            Box::new(mysql::Error::IoError(lost)),
            Box::new(mysql::Error::CodecError(reset.into())),
            Box::new(server_error(1213)),
            Box::new(Error::Database(server_error(1205))),
        ];
        for error in transient {
            assert!(is_transient(&*error), "{error}");
        }
        let counted: Vec<HandlerError> = vec![
            "cannot parse".into(),
            Box::new(server_error(1062)),
            Box::new(Error::Config("x".into())),
        ];
        for error in counted {
            assert!(!is_transient(&*error), "{error}");
        }
    }
}
