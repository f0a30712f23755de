//! A transactional outbox for MySQL and Kafka: synchronous, on OS threads, with no async
//! runtime.
//!
//! A service writes its business change and an outbox message in **one** MySQL
//! transaction; a [`Dispatcher`] relays committed messages to Kafka. A message is
//! published if and only if its transaction commits, at least once, in commit order per
//! topic and key.
//!
//! # Usage
//!
//! ```no_run
//! use mysql::prelude::Queryable;
//! use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, Message, MySqlStore, Outbox};
//!
//! # fn main() -> outbox::Result<()> {
//! let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
//! let store = MySqlStore::new(pool.clone()); // the table `outbox`
//! store.migrate()?; // CREATE TABLE IF NOT EXISTS
//! let outbox = Outbox::new(&store);
//!
//! // The relay: OS threads, stopped when the handle is stopped or dropped.
//! let broker = KafkaBroker::new("127.0.0.1:9092")?;
//! let settings = DispatcherSettings { batch_size: 500, ..Default::default() };
//! let mut handle = Dispatcher::new(store, broker, settings, "orders-service-1")?.start()?;
//!
//! // The producer side: the message rides in the caller's transaction.
//! let mut tx = pool.start_transaction(mysql::TxOpts::default())?;
//! tx.exec_drop("INSERT INTO orders (id, total) VALUES (?, ?)", (42, 1999))?;
//! let message = Message::new("orders", r#"{"id":42}"#)
//!     .with_key("order-42")
//!     .with_header("event-type", "OrderCreated");
//! let id = outbox.add(&mut tx, &message)?; // UUIDv7, sent as the `outbox-message-id` header
//! tx.commit()?;
//! handle.wake(); // optional: publish now rather than at the next poll
//!
//! // The same, one round trip shorter: the message's INSERT rides on the COMMIT, and
//! // the commit wakes the dispatcher.
//! let outbox = outbox.with_waker(handle.waker());
//! let mut tx = outbox.start_transaction(mysql::TxOpts::default())?;
//! tx.exec_drop("INSERT INTO orders (id, total) VALUES (?, ?)", (43, 2999))?;
//! tx.add(&Message::new("orders", r#"{"id":43}"#).with_key("order-43"))?;
//! tx.commit()?;
//!
//! for error in handle.errors().try_iter() {
//!     eprintln!("outbox: {error}");
//! }
//! handle.stop()?;
//! # let _ = id; Ok(()) }
//! ```
//!
//! # Errors
//!
//! Every fallible call returns [`Error`]: [`Error::InvalidMessage`] and [`Error::Config`]
//! for bad input (nothing is written), [`Error::Database`] and [`Error::Kafka`] from the
//! drivers, with their source kept. [`Error::is_retryable`] tells the two kinds apart.
//! The dispatcher's threads never panic on a lost connection: they put the error on
//! [`DispatcherHandle::errors`] and try again at their next tick. A worker that panics
//! anyway is reported ([`Error::WorkerPanicked`]); the relay then stops claiming and
//! releases what it held, and [`DispatcherHandle::is_running`] turns false.
//!
//! # Time
//!
//! Every time the outbox writes or compares is the database's clock in UTC, whatever the
//! `time_zone` of the sessions that add messages or run dispatchers.
//!
//! # Without polling
//!
//! [`binlog::BinlogRelay`] publishes from the server's binary log instead of polling the
//! table: each message the moment its transaction commits, and no query while nothing
//! does. It needs the binary log on, in ROW format, and replication privileges.
//!
//! # Consuming
//!
//! [`inbox::InboxConsumer`] is the consumer's side: it reads records from Kafka and applies
//! each once, recording its message id in the transaction of its effect, and lets the
//! offset go only after that commit. [`inbox::Inbox::record`] does the same for an
//! application's own loop.
//!
//! # Operating
//!
//! [`admin::Admin`] tells how far behind the outbox is, lists dead messages and replays or
//! discards them, and frees the rows of a dispatcher that is gone; the `outbox` command
//! (feature `cli`) does the same from a terminal.
//!
//! # Watching
//!
//! The dispatcher reports its counts, timings and (with
//! [`DispatcherSettings::gauge_interval`]) the table's backlog through the `metrics`
//! facade, listed in [`metrics`]; [`DispatcherHandle::health`] says which workers run.
//! `outbox relay --metrics-addr` serves both over HTTP for Prometheus.
//!
//! # Extending
//!
//! The dispatcher works on two small traits: [`Store`] (the outbox table) and [`Broker`]
//! (where messages go). [`MySqlStore`] and [`KafkaBroker`] implement them; another database
//! or broker is another implementation.
//!
//! # Logging
//!
//! The crate logs through [`log`] and never installs a logger.
//! - `error`: a message declared dead (by the relay or an inbox consumer), a corrupt row, a
//!   worker panic;
//! - `warn`: every error also put on the error channel, failed publishes, expired leases
//!   released, rows whose lease was lost before they were marked, a Kafka producer
//!   replaced;
//! - `info`: dispatcher and inbox consumer start and stop, rows deleted by retention,
//!   partitions assigned or revoked;
//! - `debug`: each relay round and each failed attempt.
//!
//! librdkafka's own lines go to the target `librdkafka`.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `ssl-vendored` | yes | TLS and SASL for Kafka, with OpenSSL built from source |
//! | `libz-static` | yes | gzip, with zlib built from source |
//! | `zstd` | yes | zstd compression |
//! | `ssl`, `libz` | no | the same against the system's OpenSSL or zlib |
//! | `gssapi`, `gssapi-vendored` | no | Kerberos |
//! | `cli` | no | the `outbox` command (relay, status, dead messages, replay, leases) |
//! | `opentelemetry` | no | the add stores the current span's W3C trace context with its message (module `trace`) |
//!
//! # Examples
//!
//! - `order_service` (`make demo`): an order service writing its events through the outbox;
//! - `web_service` (`make web-service`): a thread-per-request HTTP service, its dispatcher
//!   in the same process, woken by every commit;
//! - `inbox_pipeline` (`make inbox-demo`): one service's outbox feeding another's inbox,
//!   every order billed once though a third of the events are published twice.

#![deny(missing_docs)]

pub mod admin;
pub mod binlog;
mod broker;
mod dispatcher;
mod error;
mod handoff;
pub mod inbox;
mod message;
pub mod metrics;
mod outbox;
mod record;
mod runtime;
mod settings;
mod store;
mod time;
#[cfg(feature = "opentelemetry")]
pub mod trace;
mod transaction;

pub use crossbeam_channel;
pub use mysql;
pub use rdkafka;
pub use uuid;

pub use crate::broker::{
    Broker, KafkaBroker, ALLOW_WEAK_DELIVERY, RECORD_TIMESTAMP, STRICT_KEY_ORDER,
};
pub use crate::dispatcher::{Dispatcher, MAX_INSTANCE_ID_LEN};
pub use crate::error::{Error, Result, Worker};
pub use crate::message::{
    Message, MAX_HEADERS, MAX_HEADER_NAME_LEN, MAX_KEY_LEN, MAX_MESSAGE_SIZE, MAX_SCHEDULE,
    MAX_TOPIC_LEN, MESSAGE_ID_HEADER,
};
pub use crate::outbox::Outbox;
pub use crate::record::Record;
pub use crate::runtime::{DispatcherHandle, Health, HealthProbe, Waker, WorkerHealth};
pub use crate::settings::{DispatcherSettings, MAX_BATCH_SIZE};
pub use crate::store::{Claim, Failure, MySqlStore, Store};
pub use crate::transaction::OutboxTransaction;
