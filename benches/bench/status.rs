//! `outbox status`, `Admin::status` and the gauges' read on a large table.

use super::*;

/// How long `outbox status` takes on a large table: the command as an operator runs it
/// (a process that connects, checks the table and queries), and the library call alone.
pub(crate) fn status(
    bench: &Bench,
    runs: usize,
    rows: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("status, {rows} rows ({runs} runs)");
    let store = bench.status_table(rows)?;
    let admin = outbox::admin::Admin::new(store.clone())?;
    let command = std::env::var("BENCH_OUTBOX").unwrap_or_else(|_| "target/release/outbox".into());
    let mut process = Vec::new();
    let mut library = Vec::new();
    let mut gauges = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let output = std::process::Command::new(&command)
            .args(["--table", store.table(), "status"])
            .env("OUTBOX_DATABASE_URL", &bench.url)
            .output()?;
        process.push(start.elapsed().as_secs_f64() * 1e3);
        if !output.status.success() {
            return Err(format!("outbox status failed: {output:?}").into());
        }
        let start = Instant::now();
        let status = admin.status()?;
        library.push(start.elapsed().as_secs_f64() * 1e3);
        if status.total.delivered + status.total.pending + status.total.dead != rows as u64 {
            return Err(format!("status counted {:?} of {rows} rows", status.total).into());
        }
        // Each dead row has pending rows of its key after it: the blocked keys are read.
        if status.total.blocked_keys == 0 {
            return Err(format!("status found no blocked key: {:?}", status.total).into());
        }
        // The read behind a dispatcher's gauges (gauge_interval).
        let start = Instant::now();
        let backlog = store.backlog()?.ok_or("MySqlStore reports a backlog")?;
        gauges.push(start.elapsed().as_secs_f64() * 1e3);
        let pending: u64 = backlog.topics.iter().map(|t| t.pending).sum();
        if pending != status.total.pending {
            return Err(format!("the gauges counted {pending} pending").into());
        }
    }
    table.millis(&format!("`outbox status`, {rows} rows (ms)"), &process);
    table.millis(&format!("Admin::status, {rows} rows (ms)"), &library);
    table.millis(
        &format!("gauge read (Store::backlog), {rows} rows (ms)"),
        &gauges,
    );
    bench.drop_table(store.table())?;
    Ok(())
}

impl Bench {
    /// A table of `rows` messages over 10 topics, as a busy outbox holds them: the first
    /// 90 % delivered, then one in a hundred of the rest dead and the others pending, 500
    /// of those leased.
    pub(crate) fn status_table(
        &self,
        rows: usize,
    ) -> Result<MySqlStore, Box<dyn std::error::Error>> {
        let store = self.store("status")?;
        let outbox = Outbox::new(&store);
        let topic = self.name("topic");
        for chunk in (0..rows).collect::<Vec<_>>().chunks(2_000) {
            let messages: Vec<Message> = chunk
                .iter()
                .map(|&i| sample_message(&format!("{topic}-{}", i % 10), i, KEYS))
                .collect();
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        let t = store.table();
        let mut conn = self.pool.get_conn()?;
        let first: u64 = conn
            .query_first(format!("SELECT MIN(id) FROM `{t}`"))?
            .unwrap_or(1);
        let delivered_below = first + (rows as u64) * 9 / 10;
        for start in (first..delivered_below).step_by(50_000) {
            conn.query_drop(format!(
                "UPDATE `{t}` SET state = 1, processed_on = UTC_TIMESTAMP(6), \
                 last_attempted_on = UTC_TIMESTAMP(6), number_of_attempts = 1 \
                 WHERE id >= {start} AND id < {}",
                (start + 50_000).min(delivered_below)
            ))?;
        }
        conn.query_drop(format!(
            "UPDATE `{t}` SET state = 2, processed_on = UTC_TIMESTAMP(6), number_of_attempts = 5, \
             error = 'broker refused: message size too large' \
             WHERE id >= {delivered_below} AND id % 100 = 0"
        ))?;
        conn.query_drop(format!(
            "UPDATE `{t}` SET locked_by = {}, locked_on = UTC_TIMESTAMP(6) \
             WHERE state = 0 ORDER BY id LIMIT 500",
            MySqlStore::leases_of("bench#00000000").start()
        ))?;
        Ok(store)
    }
}
