//! An order service on the outbox, end to end: `make demo`.
//!
//! It places orders, each in one transaction with its `OrderCreated` event; some payments
//! are declined and their transactions rolled back. Paid orders get an `OrderPaid` event
//! in a second transaction, started through the outbox so that the event rides on its
//! COMMIT. A dispatcher relays the events to Kafka, and a consumer reads
//! the topic back to show that every committed event arrived, in order per order, and
//! that nothing from a rolled-back transaction did.
//!
//! `OUTBOX_DATABASE_URL` and `OUTBOX_KAFKA_BROKERS` point it at other servers.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::rdkafka::message::{Headers, Message as _};
use outbox::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, Message, MySqlStore, Outbox};

const ORDERS: u64 = 12;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("outbox=info"))
        .init();
    let database_url = std::env::var("OUTBOX_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let brokers = std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    // A topic of its own per run, so that a second run shows only its own events.
    let run = outbox::uuid::Uuid::now_v7().simple().to_string();
    let topic = format!("demo.orders.{}", &run[run.len() - 8..]);

    let pool = mysql::Pool::new(database_url.as_str())?;
    pool.get_conn()?.query_drop(
        "CREATE TABLE IF NOT EXISTS demo_orders (
           id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
           customer VARCHAR(100) NOT NULL,
           total_cents BIGINT NOT NULL,
           status VARCHAR(20) NOT NULL)",
    )?;
    let store = MySqlStore::with_table(pool.clone(), "demo_outbox")?;
    store.migrate()?;
    let outbox = Outbox::new(&store);

    let settings = DispatcherSettings {
        process_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let mut dispatcher = Dispatcher::new(
        store,
        KafkaBroker::new(&brokers)?,
        settings,
        "order-service-demo",
    )?
    .start()?;

    println!("placing {ORDERS} orders on topic {topic}");
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();
    for n in 1..=ORDERS {
        let customer = format!("customer-{}", n % 4);
        let total = 1_000 + 250 * n as i64;
        let mut tx = pool.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            "INSERT INTO demo_orders (customer, total_cents, status) VALUES (?, ?, 'created')",
            (&customer, total),
        )?;
        let order_id = tx.last_insert_id().unwrap_or_default();
        let key = format!("order-{order_id}");
        let event =
            serde_json::json!({"order": order_id, "customer": customer, "total_cents": total});
        outbox.add(
            &mut tx,
            &Message::json(&topic, &event)?
                .with_key(&key)
                .with_header("event-type", "OrderCreated"),
        )?;
        if n % 4 == 0 {
            // The payment was declined: the order and its event vanish together.
            tx.rollback()?;
            rolled_back.push(key);
            continue;
        }
        tx.commit()?;

        // The payment, in a transaction started through the outbox: its event is written
        // in the same round trip as the COMMIT.
        let mut tx = outbox.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            "UPDATE demo_orders SET status = 'paid' WHERE id = ?",
            (order_id,),
        )?;
        let paid = serde_json::json!({"order": order_id, "paid_cents": total});
        tx.add(
            &Message::json(&topic, &paid)?
                .with_key(&key)
                .with_header("event-type", "OrderPaid"),
        )?;
        tx.commit()?;
        dispatcher.wake();
        committed.push(key);
    }
    println!(
        "{} orders committed, {} rolled back: {:?}",
        committed.len(),
        rolled_back.len(),
        rolled_back
    );

    let expected = committed.len() * 2;
    let arrived = read_topic(&brokers, &topic, expected, Duration::from_secs(30))?;
    dispatcher.stop()?;
    for error in dispatcher.errors().try_iter() {
        println!("dispatcher reported: {error}");
    }

    println!(
        "\n{:<12} {:<14} {:<38} payload",
        "key", "event-type", "outbox-message-id"
    );
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in &arrived {
        println!(
            "{:<12} {:<14} {:<38} {}",
            a.key, a.event_type, a.message_id, a.payload
        );
        per_key
            .entry(a.key.clone())
            .or_default()
            .push(a.event_type.clone());
    }
    let in_order = per_key
        .values()
        .all(|events| events == &["OrderCreated", "OrderPaid"]);
    let leaked: HashSet<_> = rolled_back
        .iter()
        .filter(|k| per_key.contains_key(*k))
        .collect();
    println!(
        "\n{} events arrived of {expected} committed; every order's events in commit order: {}; \
         events from rolled-back orders: {}",
        arrived.len(),
        if in_order { "yes" } else { "NO" },
        leaked.len()
    );
    if arrived.len() != expected || !in_order || !leaked.is_empty() {
        return Err("the demo did not see what it expected".into());
    }
    Ok(())
}

/// One record read back from the topic.
struct Arrived {
    key: String,
    event_type: String,
    message_id: String,
    payload: String,
}

/// Reads `topic` from the beginning until `expected` records (then one more second, to
/// catch any that should not be there) or `timeout`.
fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Arrived>, Box<dyn std::error::Error>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .create()?;
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let count = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len());
        if count > 0 || Instant::now() > deadline {
            break count;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut arrived = Vec::new();
    let mut until = deadline;
    while Instant::now() < until {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let header = |name: &str| {
            message
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == name).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        arrived.push(Arrived {
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            event_type: header("event-type"),
            message_id: header(outbox::MESSAGE_ID_HEADER),
            payload: String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
        });
        if arrived.len() == expected {
            until = until.min(Instant::now() + Duration::from_secs(1));
        }
    }
    Ok(arrived)
}
