//! The benchmark's servers and names, and what every section shares: sample messages,
//! medians and the table of results.

use super::*;

/// The servers, and a name for every table and topic the benchmark makes.
pub(crate) struct Bench {
    pub(crate) pool: Pool,
    pub(crate) url: String,
    pub(crate) brokers: String,
    pub(crate) run: String,
    pub(crate) counter: Mutex<u32>,
    /// The CPUs its relay processes run on (`taskset -c`); all when `None`.
    pub(crate) relay_cpus: Option<String>,
}

impl Bench {
    pub(crate) fn new() -> Result<Bench, Box<dyn std::error::Error>> {
        let url = std::env::var("OUTBOX_DATABASE_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
        Bench::at(url)
    }

    /// A bench on the server of `url`.
    pub(crate) fn at(url: String) -> Result<Bench, Box<dyn std::error::Error>> {
        let brokers =
            std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let pool = Pool::new(url.as_str())?;
        let run = outbox::uuid::Uuid::now_v7().simple().to_string();
        Ok(Bench {
            pool,
            url,
            brokers,
            run: run[run.len() - 8..].to_string(),
            counter: Mutex::new(0),
            relay_cpus: None,
        })
    }

    pub(crate) fn name(&self, what: &str) -> String {
        let mut counter = self.counter.lock();
        *counter += 1;
        format!("bench_{what}_{}_{}", self.run, counter)
    }

    pub(crate) fn store(&self, what: &str) -> Result<MySqlStore, outbox::Error> {
        let store = MySqlStore::with_table(self.pool.clone(), &self.name(what))?;
        store.migrate()?;
        Ok(store)
    }

    pub(crate) fn drop_table(&self, table: &str) -> Result<(), mysql::Error> {
        self.pool
            .get_conn()?
            .query_drop(format!("DROP TABLE IF EXISTS `{table}`"))
    }

    /// Whether any row is still pending: one index dive, so that watching a drain costs
    /// the server little (a `COUNT(*)` every 20 ms would take CPU from the drain itself).
    /// Whether any row of `table` is pending and due.
    pub(crate) fn any_pending(&self, table: &str) -> Result<bool, mysql::Error> {
        let found: Option<u8> = self.pool.get_conn()?.query_first(format!(
            "SELECT EXISTS (SELECT 1 FROM `{table}` WHERE state = 0 \
             AND available_on <= UTC_TIMESTAMP(6))"
        ))?;
        Ok(found == Some(1))
    }

    /// A fresh table holding a committed backlog of `n` messages over `keys` keys.
    pub(crate) fn backlog(
        &self,
        n: usize,
        keys: usize,
        topic: &str,
    ) -> Result<MySqlStore, Box<dyn std::error::Error>> {
        self.backlog_behind(0, n, keys, topic)
    }

    /// As [`backlog`](Bench::backlog), behind `delayed` older messages due in an hour,
    /// each with a key of its own: rows every claim passes over.
    pub(crate) fn backlog_behind(
        &self,
        delayed: usize,
        n: usize,
        keys: usize,
        topic: &str,
    ) -> Result<MySqlStore, Box<dyn std::error::Error>> {
        let store = self.store("drain")?;
        let outbox = Outbox::new(&store);
        let later = |i: usize| {
            sample_message(topic, i, keys)
                .with_key(format!("reminder-{i}"))
                .deliver_after(Duration::from_secs(3_600))
        };
        for chunk in (0..delayed + n).collect::<Vec<_>>().chunks(2_000) {
            let messages: Vec<Message> = chunk
                .iter()
                .map(|&i| {
                    if i < delayed {
                        later(i)
                    } else {
                        sample_message(topic, i - delayed, keys)
                    }
                })
                .collect();
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        Ok(store)
    }
}

pub(crate) const KEYS: usize = 1_000;

pub(crate) const PAYLOAD: usize = 200;

pub(crate) fn sample_message(topic: &str, i: usize, keys: usize) -> Message {
    let mut payload = format!(
        "{{\"order\":{i},\"customer\":\"customer-{}\",\"items\":[",
        i % keys
    );
    while payload.len() < PAYLOAD - 3 {
        payload.push_str("\"sku-000\",");
    }
    payload.truncate(PAYLOAD - 2);
    payload.push_str("]}");
    Message::new(topic, payload)
        .with_key(format!("key-{}", i % keys))
        .with_header("event-type", "OrderCreated")
        .with_header("source", "bench")
        .with_header("trace-id", format!("{i:016x}"))
}

pub(crate) fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// The result table: one row per figure, its median and its spread over the runs.
#[derive(Default)]
pub(crate) struct Table {
    pub(crate) rows: Vec<(String, String, String)>,
}

impl Table {
    pub(crate) fn add(&mut self, label: &str, values: &[f64], format: impl Fn(f64) -> String) {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.rows.push((
            label.to_string(),
            format(median(values)),
            format!("{} .. {}", format(min), format(max)),
        ));
        eprintln!("  {label}: {}", format(median(values)));
    }

    pub(crate) fn rate(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.0}"));
    }

    pub(crate) fn millis(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.1}"));
    }

    pub(crate) fn value(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.2}"));
    }

    pub(crate) fn mib(&mut self, label: &str, values: &[f64]) {
        self.add(label, values, |v| format!("{v:.1}"));
    }

    /// Ratio run by run (each pair measured in the same run), then its median.
    pub(crate) fn ratio(&mut self, label: &str, numerator: &[f64], denominator: &[f64]) {
        let ratios: Vec<f64> = numerator
            .iter()
            .zip(denominator)
            .map(|(a, b)| a / b)
            .collect();
        self.add(label, &ratios, |v| format!("{v:.2}"));
    }

    pub(crate) fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut out = format!(
            "| {:width$} | median | spread (min .. max) |\n| {} | ---: | --- |\n",
            "figure",
            "-".repeat(width)
        );
        for (label, median, spread) in &self.rows {
            out.push_str(&format!("| {label:width$} | {median} | {spread} |\n"));
        }
        out
    }
}
