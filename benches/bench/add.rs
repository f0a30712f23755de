//! The add's cost: a business transaction with and without the outbox's write.

use super::*;

pub(crate) fn add_cost(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("add cost ({runs} runs)");
    let mut plain = Vec::new();
    let mut with_add = Vec::new();
    let mut with_noop = Vec::new();
    let mut on_commit = Vec::new();
    let mut tiny_row = Vec::new();
    let mut batch = Vec::new();
    for _ in 0..runs {
        let [a, b, c, d, e] = bench.business_transactions(5_000)?;
        plain.push(a);
        with_add.push(b);
        with_noop.push(c);
        on_commit.push(d);
        tiny_row.push(e);
        batch.push(bench.batch_add(200, 100)?);
    }
    table.rate("transaction without outbox (tx/s)", &plain);
    table.rate("transaction with Outbox::add (tx/s)", &with_add);
    table.ratio("  with / without", &with_add, &plain);
    table.rate("transaction with a no-op statement (tx/s)", &with_noop);
    table.ratio("  no-op / without: ceiling of any add", &with_noop, &plain);
    table.rate("OutboxTransaction, add on the commit (tx/s)", &on_commit);
    table.ratio("  on the commit / without", &on_commit, &plain);
    table.rate("one-value row on the commit (tx/s)", &tiny_row);
    table.ratio(
        "  one-value row / without: ceiling of any row",
        &tiny_row,
        &plain,
    );
    table.rate("batch add, 100 per tx (msg/s)", &batch);
    Ok(())
}

impl Bench {
    /// `n` transactions of one business INSERT each for each [`Extra`], interleaved in
    /// blocks of 100 so that all of them meet the same server weather; transactions per
    /// second for each, in the order of [`Extra`].
    pub(crate) fn business_transactions(
        &self,
        n: usize,
    ) -> Result<[f64; 5], Box<dyn std::error::Error>> {
        const BLOCK: usize = 100;
        let store = self.store("add")?;
        let outbox = Outbox::new(&store);
        let business = self.name("orders");
        let tiny = self.name("tiny");
        let mut conn = self.pool.get_conn()?;
        conn.query_drop(format!(
            "CREATE TABLE `{business}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             customer VARCHAR(100) NOT NULL, total BIGINT NOT NULL)"
        ))?;
        conn.query_drop(format!(
            "CREATE TABLE `{tiny}` (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
             v BIGINT NOT NULL)"
        ))?;
        let insert = format!("INSERT INTO `{business}` (customer, total) VALUES (?, ?)");
        let topic = self.name("topic");
        let mut order = [
            Extra::Nothing,
            Extra::Outbox,
            Extra::NoOp,
            Extra::OnCommit,
            Extra::TinyRow,
        ];
        let mut spent = [Duration::ZERO; 5];
        for block in 0..n.div_ceil(BLOCK) {
            for extra in order {
                let start = Instant::now();
                for i in block * BLOCK..((block + 1) * BLOCK).min(n) {
                    let row = (format!("customer-{}", i % KEYS), i as i64);
                    match extra {
                        Extra::OnCommit => {
                            let mut tx =
                                outbox.start_transaction_on(conn.as_mut(), TxOpts::default())?;
                            tx.exec_drop(&insert, row)?;
                            tx.add(&sample_message(&topic, i, KEYS))?;
                            tx.commit()?;
                        }
                        Extra::TinyRow => {
                            conn.query_drop("START TRANSACTION")?;
                            conn.exec_drop(&insert, row)?;
                            let mut result = conn.query_iter(format!(
                                "INSERT INTO `{tiny}` (v) VALUES ({i}); COMMIT"
                            ))?;
                            while let Some(set) = result.iter() {
                                for row in set {
                                    row?;
                                }
                            }
                        }
                        Extra::Nothing | Extra::Outbox | Extra::NoOp => {
                            let mut tx = conn.start_transaction(TxOpts::default())?;
                            tx.exec_drop(&insert, row)?;
                            match extra {
                                Extra::Outbox => {
                                    outbox.add(&mut tx, &sample_message(&topic, i, KEYS))?;
                                }
                                Extra::NoOp => tx.query_drop("DO 0")?,
                                _ => {}
                            }
                            tx.commit()?;
                        }
                    }
                }
                spent[extra as usize] += start.elapsed();
            }
            order.rotate_left(1);
        }
        self.drop_table(&business)?;
        self.drop_table(&tiny)?;
        self.drop_table(store.table())?;
        Ok(spent.map(|d| n as f64 / d.as_secs_f64()))
    }

    /// `n` transactions of `per_tx` messages through `add_all`; messages per second.
    pub(crate) fn batch_add(
        &self,
        n: usize,
        per_tx: usize,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let store = self.store("batch")?;
        let outbox = Outbox::new(&store);
        let topic = self.name("topic");
        let messages: Vec<Message> = (0..per_tx)
            .map(|i| sample_message(&topic, i, KEYS))
            .collect();
        let start = Instant::now();
        for _ in 0..n {
            let mut tx = self.pool.start_transaction(TxOpts::default())?;
            outbox.add_all(&mut tx, &messages)?;
            tx.commit()?;
        }
        let rate = (n * per_tx) as f64 / start.elapsed().as_secs_f64();
        self.drop_table(store.table())?;
        Ok(rate)
    }
}

/// What a business transaction does besides its INSERT.
#[derive(Clone, Copy)]
pub(crate) enum Extra {
    Nothing = 0,
    /// One `Outbox::add`.
    Outbox = 1,
    /// One statement that does nothing (`DO 0`): the round trip any add that is a
    /// statement of its own costs at the least.
    NoOp = 2,
    /// The transaction is an `OutboxTransaction` and its one add is written with the
    /// COMMIT.
    OnCommit = 3,
    /// An INSERT of a row of one 8-byte value (and its AUTO_INCREMENT key) sent in one
    /// packet with the COMMIT: the least any row written with the commit costs.
    TinyRow = 4,
}
