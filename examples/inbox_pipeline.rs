//! One service's outbox feeding another service's inbox, end to end: `make inbox-demo`.
//!
//! The orders service commits each order with its `OrderPlaced` event through its outbox,
//! and its relay publishes the events. The billing service consumes them through an inbox:
//! each event writes one invoice, in the transaction that records the event's id. Then the
//! demo makes the relay publish a third of the events again (as a relay that died after
//! publishing, before marking, would) and shows that no invoice was written twice.
//!
//! `cargo run --example inbox_pipeline -- billing` runs only the billing service, until
//! its standard input closes or it is killed (a killed consumer is what the inbox is for:
//! started again, it applies what is left, once). The tests kill it with SIGKILL.
//!
//! Environment: `OUTBOX_DATABASE_URL`, `OUTBOX_KAFKA_BROKERS`; `PIPELINE_TOPIC` (default:
//! a new one per demo run), `PIPELINE_TABLES` (the tables' prefix, default `pipeline`),
//! `PIPELINE_ORDERS` (default 1,000), `PIPELINE_BATCH` (the billing consumer's
//! `batch_size`, default 100).

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Pool, Transaction, TxOpts};
use outbox::inbox::{Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxSettings};
use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, Message, MySqlStore, Outbox};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("outbox=info"))
        .init();
    let setup = Setup::from_env()?;
    match std::env::args().nth(1).as_deref() {
        Some("billing") => billing_until_stdin_closes(&setup),
        None => demo(&setup),
        Some(other) => Err(format!("unknown mode {other:?}: nothing, or `billing`").into()),
    }
}

/// Where the two services live.
struct Setup {
    pool: Pool,
    brokers: String,
    topic: String,
    tables: String,
}

impl Setup {
    fn from_env() -> Result<Setup> {
        let url = std::env::var("OUTBOX_DATABASE_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
        let run = outbox::uuid::Uuid::now_v7().simple().to_string();
        Ok(Setup {
            pool: Pool::new(url.as_str())?,
            brokers: std::env::var("OUTBOX_KAFKA_BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:9092".into()),
            topic: std::env::var("PIPELINE_TOPIC")
                .unwrap_or_else(|_| format!("pipeline.orders.{}", &run[run.len() - 8..])),
            tables: std::env::var("PIPELINE_TABLES").unwrap_or_else(|_| "pipeline".into()),
        })
    }

    fn inbox(&self) -> Result<Inbox> {
        Ok(Inbox::with_table(
            self.pool.clone(),
            &format!("{}_inbox", self.tables),
        )?)
    }

    /// The billing service's tables: its inbox, and its invoices.
    fn migrate_billing(&self) -> Result<()> {
        self.inbox()?.migrate()?;
        self.pool.get_conn()?.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS `{}_invoices` (
               id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
               order_id BIGINT UNSIGNED NOT NULL,
               customer VARCHAR(100) NOT NULL,
               total_cents BIGINT NOT NULL,
               event_id CHAR(36) NOT NULL)",
            self.tables
        ))?;
        Ok(())
    }

    /// The billing service: every `OrderPlaced` event writes an invoice, once.
    fn billing(&self) -> Result<outbox::inbox::InboxHandle> {
        self.migrate_billing()?;
        let invoices = format!("{}_invoices", self.tables);
        let consumer = InboxConsumer::new(
            self.inbox()?,
            "billing",
            &self.brokers,
            // Every partition, with the offsets kept in MySQL beside the invoices; with a
            // Kafka cluster, `Assignment::Group` shares them among billing's instances.
            Assignment::Topics(vec![self.topic.clone()]),
            InboxSettings {
                batch_size: std::env::var("PIPELINE_BATCH")
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(100),
                ..Default::default()
            },
        )?;
        let handler = move |tx: &mut Transaction<'_>,
                            event: &Delivery|
              -> std::result::Result<(), HandlerError> {
            let order: serde_json::Value = serde_json::from_slice(event.payload())?;
            tx.exec_drop(
                format!(
                    "INSERT INTO `{invoices}` (order_id, customer, total_cents, event_id) \
                     VALUES (?, ?, ?, ?)"
                ),
                (
                    order["order"].as_u64().ok_or("no order id")?,
                    order["customer"].as_str().ok_or("no customer")?,
                    order["total_cents"].as_i64().ok_or("no total")?,
                    event.message_id().to_string(),
                ),
            )?;
            Ok(())
        };
        Ok(consumer.start(handler)?)
    }
}

/// The billing service alone, until standard input closes.
fn billing_until_stdin_closes(setup: &Setup) -> Result<()> {
    let mut billing = setup.billing()?;
    println!("billing consumes {}", setup.topic);
    let (closed_tx, closed_rx) = outbox::crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    billing.run_until(&closed_rx)?;
    Ok(())
}

/// Both services in one process, and the check that each order was billed once.
fn demo(setup: &Setup) -> Result<()> {
    let orders: u64 = std::env::var("PIPELINE_ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let tables = &setup.tables;
    let pool = &setup.pool;
    pool.get_conn()?.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS `{tables}_orders` (
           id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
           customer VARCHAR(100) NOT NULL,
           total_cents BIGINT NOT NULL)"
    ))?;
    let store = MySqlStore::with_table(pool.clone(), &format!("{tables}_outbox"))?;
    store.migrate()?;
    let outbox = Outbox::new(&store);
    let settings = DispatcherSettings {
        process_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut relay =
        Dispatcher::new(store, KafkaBroker::new(&setup.brokers)?, settings, "orders")?.start()?;

    println!(
        "orders: placing {orders} orders, each with its OrderPlaced event, on {}",
        setup.topic
    );
    let mut placed = Vec::new();
    for n in 0..orders {
        let customer = format!("customer-{}", n % 7);
        let total = 500 + 10 * n as i64;
        let mut tx = pool.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            format!("INSERT INTO `{tables}_orders` (customer, total_cents) VALUES (?, ?)"),
            (&customer, total),
        )?;
        let order = tx.last_insert_id().unwrap_or_default();
        let event = serde_json::json!({"order": order, "customer": customer, "total_cents": total});
        outbox.add(
            &mut tx,
            &Message::json(&setup.topic, &event)?
                .with_key(&customer)
                .with_header("event-type", "OrderPlaced"),
        )?;
        tx.commit()?;
        placed.push(order);
        relay.wake();
    }

    let mut billing = setup.billing()?;
    let invoices = |pool: &Pool| -> Result<(u64, u64)> {
        let counted: Option<(u64, u64)> = pool.get_conn()?.exec_first(
            format!(
                "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM `{tables}_invoices` \
                 WHERE order_id BETWEEN ? AND ?"
            ),
            (placed[0], placed[placed.len() - 1]),
        )?;
        Ok(counted.unwrap_or_default())
    };
    wait_until(Duration::from_secs(120), || Ok(invoices(pool)?.1 == orders))?;
    println!(
        "billing: {} invoices for {orders} orders",
        invoices(pool)?.0
    );

    // A relay that died after publishing, before marking, publishes again: a third of the
    // events go out a second time, with the same message ids.
    let again = orders / 3;
    pool.get_conn()?.exec_drop(
        format!(
            "UPDATE `{tables}_outbox` SET state = 0 \
             WHERE topic = ? ORDER BY id LIMIT ?"
        ),
        (&setup.topic, again),
    )?;
    relay.wake();
    let inbox = setup.inbox()?;
    let redelivered = |pool: &Pool| -> Result<u64> {
        let offsets: Option<u64> = pool.get_conn()?.exec_first(
            format!(
                "SELECT COALESCE(SUM(next_offset), 0) FROM `{}_offsets` \
                 WHERE consumer = 'billing' AND topic = ?",
                inbox.table()
            ),
            (&setup.topic,),
        )?;
        Ok(offsets.unwrap_or_default().saturating_sub(orders))
    };
    wait_until(Duration::from_secs(120), || Ok(redelivered(pool)? >= again))?;
    let (written, distinct) = invoices(pool)?;
    println!(
        "orders: published {again} events a second time; billing read {} records in all \
         and wrote {written} invoices for {distinct} orders",
        orders + redelivered(pool)?
    );
    billing.stop()?;
    relay.stop()?;
    if written != orders || distinct != orders {
        return Err(format!("{written} invoices for {orders} orders: not once each").into());
    }
    println!("each order billed exactly once");
    Ok(())
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() > deadline {
            return Err(format!("not done within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
