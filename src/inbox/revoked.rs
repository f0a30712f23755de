//! Partitions a group rebalance took away while a batch was being gathered.
//!
//! Rebalance callbacks run inside `poll`, between two records. When a partition is
//! revoked, what was handled before is committed, and another member reads the partition
//! from there: the records of it already gathered into the batch, not yet applied, are
//! that member's now, and applying them here too would race it. So they are dropped.

use parking_lot::Mutex;

use super::delivery::Delivery;

/// The partitions revoked since the consumer's loop last looked.
#[derive(Debug, Default)]
pub(super) struct Revoked(Mutex<Vec<(String, i32)>>);

impl Revoked {
    /// Notes `partitions` as revoked (called from the rebalance callback).
    pub fn note(&self, partitions: impl IntoIterator<Item = (String, i32)>) {
        self.0.lock().extend(partitions);
    }

    /// Drops from `batch` (the records gathered before the last poll) those of the
    /// partitions revoked since the last look, and forgets them. Returns how many.
    pub fn drop_from(&self, batch: &mut Vec<Delivery>) -> usize {
        let revoked = std::mem::take(&mut *self.0.lock());
        if revoked.is_empty() {
            return 0;
        }
        let before = batch.len();
        batch.retain(|d| {
            !revoked
                .iter()
                .any(|(topic, partition)| d.topic() == topic && d.partition() == *partition)
        });
        before - batch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: &str, partition: i32, offset: i64) -> Delivery {
        Delivery::new(
            topic,
            partition,
            offset,
            None,
            b"x".to_vec(),
            Vec::new(),
            None,
        )
    }

    fn places(batch: &[Delivery]) -> Vec<(String, i32, i64)> {
        batch
            .iter()
            .map(|d| (d.topic().to_string(), d.partition(), d.offset()))
            .collect()
    }

    #[test]
    fn records_of_a_partition_revoked_mid_batch_are_dropped_and_the_rest_kept() {
        let revoked = Revoked::default();
        let mut batch = vec![at("t", 0, 5), at("t", 1, 7), at("u", 0, 2), at("t", 0, 6)];
        assert_eq!(revoked.drop_from(&mut batch), 0, "nothing revoked");
        assert_eq!(batch.len(), 4);

        revoked.note([("t".to_string(), 0)]);
        assert_eq!(revoked.drop_from(&mut batch), 2);
        assert_eq!(
            places(&batch),
            [("t".to_string(), 1, 7), ("u".to_string(), 0, 2)],
            "another topic's partition 0 stays"
        );

        // Read again from the committed offset once assigned back: kept from now on.
        batch.push(at("t", 0, 5));
        assert_eq!(revoked.drop_from(&mut batch), 0, "forgotten once dropped");
        assert_eq!(batch.len(), 3);
    }
}
