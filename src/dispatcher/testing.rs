//! In-memory `Store` and `Broker` for the dispatcher's unit tests.

use std::time::Duration;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::record::Record;
use crate::store::claim::{pick, retry_cap, Candidate};
use crate::store::{Claim, Failure, Store};

#[derive(Debug, Clone)]
pub(crate) struct FakeRow {
    pub record: Record,
    pub delivered: bool,
    pub dead: bool,
    /// The lease holding the row; 0 when none.
    pub lease: u64,
    pub available: bool,
    pub attempts: u32,
    pub error: String,
}

impl FakeRow {
    /// A row as the add writes it.
    fn pending(id: u64, message: Message) -> FakeRow {
        FakeRow {
            record: Record {
                id,
                message_id: Uuid::now_v7(),
                attempts: 0,
                created: std::time::SystemTime::now(),
                message,
            },
            delivered: false,
            dead: false,
            lease: 0,
            available: true,
            attempts: 0,
            error: String::new(),
        }
    }
}

/// Rows in memory; claims follow the same rules as the SQL store.
#[derive(Default)]
pub(crate) struct FakeStore {
    rows: Mutex<Vec<FakeRow>>,
    claim_failures: Mutex<u32>,
    mark_failures: Mutex<u32>,
    empty_claims: Mutex<u32>,
    claims: Mutex<u64>,
}

impl FakeStore {
    pub fn with(messages: impl IntoIterator<Item = Message>) -> FakeStore {
        let rows = messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| FakeRow::pending(i as u64 + 1, message))
            .collect();
        FakeStore {
            rows: Mutex::new(rows),
            ..Default::default()
        }
    }

    /// Adds a pending row, as a commit would.
    pub fn add(&self, message: Message) {
        let mut rows = self.rows.lock();
        let id = rows.len() as u64 + 1;
        rows.push(FakeRow::pending(id, message));
    }

    /// How many claims were asked for, found rows or not.
    pub fn claims(&self) -> u64 {
        *self.claims.lock()
    }

    pub fn row(&self, id: u64) -> FakeRow {
        self.rows.lock()[id as usize - 1].clone()
    }

    pub fn delivered_ids(&self) -> Vec<u64> {
        self.rows
            .lock()
            .iter()
            .filter(|r| r.delivered)
            .map(|r| r.record.id)
            .collect()
    }

    /// Ends every backoff now.
    pub fn make_available(&self) {
        self.rows.lock().iter_mut().for_each(|r| r.available = true);
    }

    /// How many claims found nothing to take while some row was still to be sent.
    pub fn empty_claims(&self) -> u32 {
        *self.empty_claims.lock()
    }

    pub fn fail_next_claims(&self, n: u32) {
        *self.claim_failures.lock() = n;
    }

    pub fn fail_next_marks(&self, n: u32) {
        *self.mark_failures.lock() = n;
    }

    /// Releases the rows among `ids` held under `lease` after `change`; fails when told to.
    fn update_leased(&self, lease: u64, ids: &[u64], change: impl Fn(&mut FakeRow)) -> Result<u64> {
        Self::injected(&self.mark_failures)?;
        let mut rows = self.rows.lock();
        let mut n = 0;
        for row in rows
            .iter_mut()
            .filter(|r| r.lease == lease && ids.contains(&r.record.id))
        {
            change(row);
            row.lease = 0;
            n += 1;
        }
        Ok(n)
    }

    fn injected(counter: &Mutex<u32>) -> Result<()> {
        let mut left = counter.lock();
        if *left > 0 {
            *left -= 1;
            let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected");
            return Err(Error::Database(mysql::Error::IoError(io)));
        }
        Ok(())
    }
}

impl Store for FakeStore {
    fn claim(&self, _owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Claim> {
        Self::injected(&self.claim_failures)?;
        // The same order rule as the SQL store: every blocking row is a candidate, in id
        // order, ready when it could be taken.
        let mut rows = self.rows.lock();
        let candidates: Vec<Candidate> = rows
            .iter()
            .filter(|row| !row.delivered && (!row.dead || dead_blocks_key))
            .map(|row| Candidate {
                id: row.record.id,
                key: row
                    .record
                    .message
                    .key()
                    .map(|k| (row.record.message.topic().to_string(), k.to_vec())),
                ready: !row.dead && row.lease == 0 && row.available,
                retry: row.attempts > 0,
            })
            .collect();
        let (picked, more) = pick(&candidates, limit, &mut retry_cap(limit));
        let lease = {
            let mut claims = self.claims.lock();
            *claims += 1;
            *claims
        };
        let mut claimed = Vec::with_capacity(picked.len());
        for candidate in picked {
            let row = &mut rows[candidate.id as usize - 1];
            row.lease = lease;
            let mut record = row.record.clone();
            record.attempts = row.attempts;
            claimed.push(record);
        }
        if claimed.is_empty() && !candidates.is_empty() {
            *self.empty_claims.lock() += 1;
        }
        Ok(Claim {
            records: claimed,
            more,
            lease,
        })
    }

    fn renew(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        let rows = self.rows.lock();
        Ok(rows
            .iter()
            .filter(|r| r.lease == lease && ids.contains(&r.record.id))
            .count() as u64)
    }

    fn mark_delivered(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        self.update_leased(lease, ids, |row| {
            row.delivered = true;
            row.attempts += 1;
        })
    }

    fn mark_failed(&self, lease: u64, failures: &[Failure]) -> Result<u64> {
        Self::injected(&self.mark_failures)?;
        let mut rows = self.rows.lock();
        let mut n = 0;
        for failure in failures {
            if let Some(row) = rows
                .iter_mut()
                .find(|r| r.lease == lease && r.record.id == failure.id)
            {
                row.lease = 0;
                row.available = false;
                row.attempts += 1;
                row.dead = failure.dead;
                row.error = failure.error.clone();
                n += 1;
            }
        }
        Ok(n)
    }

    fn release(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        self.update_leased(lease, ids, |_| {})
    }

    fn release_expired(&self, _older_than: Duration) -> Result<u64> {
        Ok(0)
    }

    fn purge_delivered(&self, _older_than: Duration, _limit: usize) -> Result<u64> {
        Ok(0)
    }

    fn purge_dead(&self, _older_than: Duration, _limit: usize) -> Result<u64> {
        Ok(0)
    }
}

/// Acknowledges everything but the payloads it was told to refuse.
pub(crate) struct FakeBroker {
    refuse: Vec<Vec<u8>>,
}

impl FakeBroker {
    pub fn failing_payloads<const N: usize>(payloads: [&str; N]) -> FakeBroker {
        FakeBroker {
            refuse: payloads.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }
}

impl Broker for FakeBroker {
    fn publish(&mut self, records: &[Record]) -> Vec<Result<()>> {
        records
            .iter()
            .map(|r| {
                if self.refuse.iter().any(|p| p == r.message.payload()) {
                    let text = String::from_utf8_lossy(r.message.payload()).into_owned();
                    Err(Error::Broker(format!("refused {text}").into()))
                } else {
                    Ok(())
                }
            })
            .collect()
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}
