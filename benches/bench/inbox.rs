//! The inbox consumer against the same loop without it, and the raw consumer.

use super::*;

/// About 200 bytes of payload, 3 headers, one of `keys` keys.
pub(crate) fn inbox(
    bench: &Bench,
    runs: usize,
    records: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("inbox, {records} records ({runs} runs)");
    let topic = bench.name("inbox").replace('_', ".");
    bench.produce(&topic, records, true)?;
    let mut raw = vec![];
    // Per batch size: the loop without the inbox, and the inbox consumer.
    let sizes = [1, 100];
    let mut plain = vec![vec![]; sizes.len()];
    let mut inboxed = vec![vec![]; sizes.len()];
    for run in 0..runs {
        raw.push(bench.consume_raw(&topic, records)?);
        for (i, &batch) in sizes.iter().enumerate() {
            // Each first in turn: the server's disk weather changes by the minute.
            if run % 2 == 0 {
                plain[i].push(bench.consume_without_inbox(&topic, records, batch)?);
                inboxed[i].push(bench.consume_with_inbox(&topic, records, batch)?);
            } else {
                inboxed[i].push(bench.consume_with_inbox(&topic, records, batch)?);
                plain[i].push(bench.consume_without_inbox(&topic, records, batch)?);
            }
        }
    }
    table.rate("raw consumer alone (records/s)", &raw);
    for (i, batch) in sizes.iter().enumerate() {
        let per = if *batch == 1 {
            "a transaction per record".to_string()
        } else {
            format!("up to {batch} records per transaction")
        };
        table.rate(
            &format!("loop without the inbox, {per} (records/s)"),
            &plain[i],
        );
        table.rate(&format!("inbox consumer, {per} (records/s)"), &inboxed[i]);
        table.ratio(
            "  inbox / same loop without the inbox",
            &inboxed[i],
            &plain[i],
        );
        table.ratio("  raw consumer / inbox (times faster)", &raw, &inboxed[i]);
    }
    Ok(())
}

impl Bench {
    /// A consumer of every partition of `topic` from its beginning, without a group.
    pub(crate) fn assigned_consumer(
        &self,
        topic: &str,
    ) -> Result<outbox::rdkafka::consumer::BaseConsumer, Box<dyn std::error::Error>> {
        use outbox::rdkafka::consumer::{BaseConsumer, Consumer};
        use outbox::rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.name("group"))
            .set("enable.auto.commit", "false")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut list = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&list)?;
        Ok(consumer)
    }

    /// A business table of one row per record.
    pub(crate) fn effects_table(&self) -> Result<String, Box<dyn std::error::Error>> {
        let name = self.name("effects");
        self.pool.get_conn()?.query_drop(format!(
            "CREATE TABLE `{name}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             event_id CHAR(36) NOT NULL, body BLOB NOT NULL)"
        ))?;
        Ok(name)
    }

    /// `n` records of `topic` read by rdkafka alone; records per second.
    pub(crate) fn consume_raw(
        &self,
        topic: &str,
        n: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let consumer = self.assigned_consumer(topic)?;
        let start = Instant::now();
        let mut read = 0;
        while read < n {
            if let Some(record) = consumer.poll(Duration::from_millis(100)) {
                record?;
                read += 1;
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err("the raw consumer did not read every record".into());
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// `n` records of `topic`, each writing one row and its partition's next offset in one
    /// transaction: the inbox consumer's loop without the inbox's record.
    pub(crate) fn consume_without_inbox(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let effects = self.effects_table()?;
        let offsets = self.name("offsets");
        let mut conn = self.pool.get_conn()?;
        conn.query_drop(format!(
            "CREATE TABLE `{offsets}` (topic VARCHAR(249) NOT NULL, kafka_partition INT NOT NULL, \
             next_offset BIGINT NOT NULL, PRIMARY KEY (topic, kafka_partition))"
        ))?;
        let insert = format!("INSERT INTO `{effects}` (event_id, body) VALUES (?, ?)");
        let save = format!(
            "INSERT INTO `{offsets}` (topic, kafka_partition, next_offset) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))"
        );
        let consumer = self.assigned_consumer(topic)?;
        let start = Instant::now();
        let mut read = 0;
        let mut deliveries = Vec::with_capacity(batch);
        while read < n {
            deliveries.clear();
            let mut timeout = Duration::from_millis(100);
            while deliveries.len() < batch {
                match consumer.poll(timeout) {
                    Some(record) => deliveries.push(outbox::inbox::Delivery::from_kafka(&record?)),
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let mut last: HashMap<(String, i32), i64> = HashMap::new();
            for delivery in &deliveries {
                tx.exec_drop(
                    &insert,
                    (delivery.message_id().to_string(), delivery.payload()),
                )?;
                last.insert(
                    (delivery.topic().to_string(), delivery.partition()),
                    delivery.offset(),
                );
            }
            for ((topic, partition), offset) in last {
                tx.exec_drop(&save, (topic, partition, offset + 1))?;
            }
            tx.commit()?;
            read += deliveries.len();
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        self.drop_table(&effects)?;
        self.drop_table(&offsets)?;
        Ok(rate)
    }

    /// `n` records of `topic` through an `InboxConsumer` whose handler writes one row;
    /// records per second, until the last record's offset is saved.
    pub(crate) fn consume_with_inbox(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        use outbox::inbox::{
            Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxSettings,
        };
        let effects = self.effects_table()?;
        let inbox = Inbox::with_table(self.pool.clone(), &self.name("inbox"))?;
        inbox.migrate()?;
        let insert = format!("INSERT INTO `{effects}` (event_id, body) VALUES (?, ?)");
        let consumer = InboxConsumer::new(
            inbox.clone(),
            "bench",
            &self.brokers,
            Assignment::Topics(vec![topic.to_string()]),
            InboxSettings {
                batch_size: batch,
                ..Default::default()
            },
        )?;
        let read = format!(
            "SELECT COALESCE(SUM(next_offset), 0) FROM `{}_offsets`",
            inbox.table()
        );
        let mut conn = self.pool.get_conn()?;
        let start = Instant::now();
        let mut handle = consumer.start(
            move |tx: &mut mysql::Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
                tx.exec_drop(&insert, (d.message_id().to_string(), d.payload()))?;
                Ok(())
            },
        )?;
        loop {
            let done: Option<u64> = conn.query_first(&read)?;
            if done.unwrap_or(0) >= n as u64 {
                break;
            }
            if start.elapsed() > Duration::from_secs(600) || !handle.is_running() {
                return Err("the inbox consumer did not read every record".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        handle.stop()?;
        self.drop_table(&effects)?;
        let t = inbox.table();
        conn.query_drop(format!("DROP TABLE `{t}`, `{t}_dead`, `{t}_offsets`"))?;
        Ok(rate)
    }
}
