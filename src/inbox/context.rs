//! librdkafka's side of the consumer: its callbacks (log lines, rebalances) and the
//! offsets it stores and commits.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::revoked::Revoked;
use super::Delivery;
use crate::broker::forward_log;
use crate::error::Result;

/// The last record of each partition in `batch`.
pub(super) fn last_of_each_partition(batch: &[Delivery]) -> Vec<&Delivery> {
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
pub(super) fn store_offsets(consumer: &BaseConsumer<Context>, batch: &[Delivery]) -> Result<()> {
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
pub(super) fn commit_stored(consumer: &BaseConsumer<Context>, name: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => log::debug!("inbox {name}: offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => log::warn!("inbox {name}: committing offsets: {e}"),
    }
}

/// librdkafka's callbacks for the consumer: its log lines, and the commit of what was
/// handled before partitions are taken away.
pub(super) struct Context {
    pub name: String,
    pub secrets: Vec<String>,
    /// Partitions revoked inside `poll`, whose gathered records the loop drops.
    pub revoked: Revoked,
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
