//! What the feature `opentelemetry` costs the add: with no span current, against a build
//! without the feature (`BENCH_PEER`, run in turn with this one); and with a span current,
//! against none.

use super::*;

/// Transactions of one add each, per measurement.
const ADDS: usize = 3_000;

/// The `trace` section: in a build with the feature, its adds with and without a span
/// current, and, run in turn, the adds of the build without it named by `BENCH_PEER`.
pub(crate) fn trace_cost(
    bench: &Bench,
    runs: usize,
    table: &mut Table,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("trace context cost ({runs} runs)");
    let peer = std::env::var("BENCH_PEER").ok();
    let (mut off, mut no_span, mut in_span) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        if let Some(peer) = &peer {
            off.push(peer_adds(peer)?);
        }
        let [plain, traced] = bench.adds(ADDS)?;
        no_span.push(plain);
        in_span.push(traced);
    }
    table.rate(
        "add, feature opentelemetry, no span current (tx/s)",
        &no_span,
    );
    table.rate(
        "add, feature opentelemetry, a span current (tx/s)",
        &in_span,
    );
    table.ratio("  a span current / none", &in_span, &no_span);
    if !off.is_empty() {
        table.rate("add, built without the feature (tx/s)", &off);
        table.ratio("  feature on, no span / feature off", &no_span, &off);
    }
    Ok(())
}

/// The `adds` section, for a peer: one measurement of adds with no span current, printed
/// alone on a line of its own.
pub(crate) fn print_adds(bench: &Bench) -> Result<(), Box<dyn std::error::Error>> {
    let [plain, _] = bench.adds(ADDS)?;
    println!("adds {plain}");
    Ok(())
}

/// Runs the bench binary `peer` for one measurement of its adds.
fn peer_adds(peer: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let output = std::process::Command::new(peer)
        .env("BENCH_ONLY", "adds")
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("adds "))
        .and_then(|rate| rate.trim().parse().ok())
        .ok_or_else(|| format!("the peer {peer} printed no rate: {text}").into())
}

impl Bench {
    /// `n` transactions of one add each with no span current, and `n` with one (with the
    /// feature; without it, the same adds again), interleaved in blocks of 100;
    /// transactions per second of each.
    pub(crate) fn adds(&self, n: usize) -> Result<[f64; 2], Box<dyn std::error::Error>> {
        const BLOCK: usize = 100;
        let store = self.store("trace")?;
        let outbox = Outbox::new(&store);
        let topic = self.name("topic");
        let mut conn = self.pool.get_conn()?;
        let mut spent = [Duration::ZERO; 2];
        for block in 0..n.div_ceil(BLOCK) {
            for (which, spent) in spent.iter_mut().enumerate() {
                let _current = (which == 1).then(span);
                let start = Instant::now();
                for i in block * BLOCK..((block + 1) * BLOCK).min(n) {
                    let mut tx = conn.start_transaction(TxOpts::default())?;
                    outbox.add(&mut tx, &sample_message(&topic, i, KEYS))?;
                    tx.commit()?;
                }
                *spent += start.elapsed();
            }
        }
        self.drop_table(store.table())?;
        Ok(spent.map(|d| n as f64 / d.as_secs_f64()))
    }
}

/// A span made current until the guard is dropped: a sampled remote span context, which
/// the add propagates as any span.
#[cfg(feature = "opentelemetry")]
fn span() -> opentelemetry::ContextGuard {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId};
    let context = SpanContext::new(
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        SpanId::from(0x00f0_67aa_0ba9_02b7),
        TraceFlags::SAMPLED,
        true,
        Default::default(),
    );
    opentelemetry::Context::new()
        .with_remote_span_context(context)
        .attach()
}

/// Without the feature there is no span to make current.
#[cfg(not(feature = "opentelemetry"))]
fn span() {}
