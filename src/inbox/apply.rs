//! The consumer thread: records polled a batch at a time, each batch applied in one
//! MySQL transaction with the records' ids, a failure splitting it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mysql::{PooledConn, Transaction, TxOpts};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::context::{commit_stored, last_of_each_partition, store_offsets, Context};
use super::settings::Assignment;
use super::{Delivery, Inbox, InboxSettings, Recorded};
use crate::error::{is_transient_database, Error, Result, Worker};
use crate::metrics::InboxMeter;
use crate::runtime::backoff::backoff;
use crate::runtime::signal::{panic_text, Signals};

/// What a handler returns when it fails: any error. The record is tried again, and after
/// `max_attempts` failures it goes to the dead table with this error's text.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The application's handler, as [`InboxConsumer::start`](super::InboxConsumer::start) takes it.
pub(super) trait Handler:
    FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + 'static
{
}

impl<F> Handler for F where
    F: FnMut(&mut Transaction<'_>, &Delivery) -> Result<(), HandlerError> + Send + 'static
{
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
pub(super) struct Loop {
    pub inbox: Inbox,
    pub name: String,
    pub meter: InboxMeter,
    pub assignment: Assignment,
    pub settings: InboxSettings,
    pub conn: Option<PooledConn>,
    pub signals: Signals,
}

impl Loop {
    pub fn run<H: Handler>(mut self, consumer: BaseConsumer<Context>, mut handler: H) {
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
    #[cfg(feature = "opentelemetry")]
    let outcome = super::span::in_process_span(
        delivery,
        || catch_unwind(AssertUnwindSafe(|| handler(tx, delivery))),
        |outcome| match outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("handler panicked".to_string()),
        },
    );
    #[cfg(not(feature = "opentelemetry"))]
    let outcome = catch_unwind(AssertUnwindSafe(|| handler(tx, delivery)));
    match outcome {
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
