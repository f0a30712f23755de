//! Commit to acknowledgement at a steady rate, with and without a wake-up.

use super::*;

pub(crate) fn latency(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("latency at 1,000 msg/s ({runs} runs)");
    for (label, wake) in [("default settings", false), ("wake-up after commit", true)] {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut steady_p99 = Vec::new();
        let mut max = Vec::new();
        for _ in 0..runs {
            let timed = bench.latency(1_000, Duration::from_secs(10), wake)?;
            let mut latencies: Vec<f64> = timed.iter().map(|&(_, ms)| ms).collect();
            latencies.sort_by(f64::total_cmp);
            p50.push(percentile(&latencies, 0.50));
            p99.push(percentile(&latencies, 0.99));
            max.push(*latencies.last().unwrap_or(&0.0));
            // Past the first second: the relay started on an empty table and backed off
            // to `process_interval` before the first commit.
            let mut steady: Vec<f64> = timed
                .iter()
                .filter(|&&(after, _)| after >= Duration::from_secs(1))
                .map(|&(_, ms)| ms)
                .collect();
            steady.sort_by(f64::total_cmp);
            steady_p99.push(percentile(&steady, 0.99));
        }
        table.millis(&format!("latency p50, {label} (ms)"), &p50);
        table.millis(&format!("latency p99, {label} (ms)"), &p99);
        table.millis(
            &format!("latency p99 after the first second, {label} (ms)"),
            &steady_p99,
        );
        table.millis(&format!("latency max, {label} (ms)"), &max);
    }
    Ok(())
}

impl Bench {
    /// Commits `rate` single-message transactions per second for `duration`, from 4 writer
    /// threads (enough to offer the rate even when one commit is slow); `committed` is told
    /// each message id as its commit returns.
    pub(crate) fn paced_writes(
        &self,
        outbox: &Outbox,
        topic: &str,
        rate: u32,
        duration: Duration,
        committed: impl Fn(outbox::uuid::Uuid) + Send + Sync + 'static,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let writers = 4u32;
        let per_writer = rate / writers;
        let committed = Arc::new(committed);
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let (pool, outbox, topic, committed) = (
                    self.pool.clone(),
                    outbox.clone(),
                    topic.to_string(),
                    committed.clone(),
                );
                std::thread::spawn(move || -> Result<(), outbox::Error> {
                    let ticks = crossbeam_channel::tick(Duration::from_secs(1) / per_writer);
                    let end = Instant::now() + duration;
                    let mut i = w as usize;
                    while Instant::now() < end {
                        let _ = ticks.recv();
                        let mut tx = pool.start_transaction(TxOpts::default())?;
                        let id = outbox.add(&mut tx, &sample_message(&topic, i, KEYS))?;
                        tx.commit()?;
                        committed(id);
                        i += writers as usize;
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| "writer panicked")??;
        }
        Ok(())
    }

    /// Commits `rate` single-message transactions per second for `duration` and returns,
    /// for each message, when it was committed (from the first commit) and the
    /// milliseconds from its commit to the broker's acknowledgement.
    pub(crate) fn latency(
        &self,
        rate: u32,
        duration: Duration,
        wake: bool,
    ) -> Result<Vec<(Duration, f64)>, Box<dyn std::error::Error>> {
        let topic = self.name("topic");
        let store = self.store("latency")?;
        let outbox = Outbox::new(&store);
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let broker = TimingBroker {
            inner: KafkaBroker::new(&self.brokers)?,
            acked: acked.clone(),
        };
        let handle = Dispatcher::new(
            store.clone(),
            broker,
            DispatcherSettings::default(),
            "latency",
        )?
        .start()?;
        let waker = handle.waker();

        let committed = Arc::new(Mutex::new(HashMap::new()));
        let stamps = committed.clone();
        self.paced_writes(&outbox, &topic, rate, duration, move |id| {
            stamps.lock().insert(id, Instant::now());
            if wake {
                waker.wake();
            }
        })?;
        let total = committed.lock().len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().len() < total && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(handle);
        let committed = committed.lock();
        let acked = acked.lock();
        let first = committed
            .values()
            .min()
            .copied()
            .unwrap_or_else(Instant::now);
        let latencies = committed
            .iter()
            .filter_map(|(id, at)| {
                acked.get(id).map(|done: &Instant| {
                    (
                        at.duration_since(first),
                        done.duration_since(*at).as_secs_f64() * 1e3,
                    )
                })
            })
            .collect();
        self.drop_table(store.table())?;
        Ok(latencies)
    }
}

/// Records when each message's publish call came back acknowledged.
pub(crate) struct TimingBroker {
    pub(crate) inner: KafkaBroker,
    pub(crate) acked: Arc<Mutex<HashMap<outbox::uuid::Uuid, Instant>>>,
}

impl Broker for TimingBroker {
    fn publish(&mut self, records: &[Record]) -> Vec<outbox::Result<()>> {
        let outcomes = self.inner.publish(records);
        let now = Instant::now();
        let mut acked = self.acked.lock();
        for (record, outcome) in records.iter().zip(&outcomes) {
            if outcome.is_ok() {
                acked.insert(record.message_id, now);
            }
        }
        outcomes
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}
