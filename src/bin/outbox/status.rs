//! `outbox status`: counts, lag and leases; `--max-lag` for checks, `--watch` like `top`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use outbox::admin::{Admin, Counts, Status};
use serde_json::Value as Json;

use crate::render::{duration, time, Table};
use crate::Failure;

/// How often `--watch` redraws, and the window its delivery rate is measured over.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (one object; with --watch, one line per second).
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when the oldest pending message is older than this (30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "watch")]
    max_lag: Option<Duration>,
    /// Redraw every second, with the rate of deliveries, until interrupted.
    #[arg(long)]
    watch: bool,
}

/// A duration as people write it: `30s`, `5m`, `1h 30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (30s, 5m, 1h 30m)"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} is negative"))
}

pub fn run(admin: &Admin, args: &Args) -> Result<ExitCode, Failure> {
    if args.watch {
        return watch(admin, args.json);
    }
    let status = admin.status()?;
    if args.json {
        println!("{}", status.to_json());
    } else {
        println!("{}", render(&status, None));
    }
    match (args.max_lag, status.total.lag) {
        (Some(max), Some(lag)) if lag > max => {
            eprintln!(
                "outbox: the oldest pending message is {} old, above --max-lag {}",
                duration(lag),
                duration(max)
            );
            Ok(ExitCode::from(1))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Redraws the status every [`WATCH_INTERVAL`], with deliveries per second, until the
/// process is interrupted or a query fails.
fn watch(admin: &Admin, json: bool) -> Result<ExitCode, Failure> {
    let mut out = std::io::stdout().lock();
    loop {
        let started = Instant::now();
        let status = admin.status()?;
        let delivered = admin.delivered_in_last(WATCH_INTERVAL)?;
        let per_second = |count: u64| count as f64 / WATCH_INTERVAL.as_secs_f64();
        if json {
            let mut line = status.to_json();
            line["total"]["delivered_per_second"] =
                Json::from(per_second(delivered.values().sum()));
            if let Some(topics) = line["topics"].as_array_mut() {
                for topic in topics {
                    let name = topic["topic"].as_str().unwrap_or_default();
                    let count = delivered.get(name).copied().unwrap_or(0);
                    topic["delivered_per_second"] = Json::from(per_second(count));
                }
            }
            writeln!(out, "{line}")?;
        } else {
            // Home, clear the screen, draw.
            writeln!(out, "\x1b[H\x1b[2J{}", render(&status, Some(&delivered)))?;
        }
        out.flush()?;
        std::thread::sleep(WATCH_INTERVAL.saturating_sub(started.elapsed()));
    }
}

/// The status as tables: one line per topic and one for all, then the leases.
fn render(status: &Status, delivered: Option<&BTreeMap<String, u64>>) -> String {
    let mut columns = vec![
        "topic",
        "pending>",
        "backing off>",
        "scheduled>",
        "leased>",
        "delivered>",
        "dead>",
        "discarded>",
        "lag",
        "blocked keys>",
        "behind them>",
    ];
    if delivered.is_some() {
        columns.insert(6, "delivered/s>");
    }
    let mut table = Table::new(&columns);
    let row = |name: &str, counts: &Counts, rate: Option<u64>| {
        let mut cells = vec![
            name.to_string(),
            counts.pending.to_string(),
            counts.backing_off.to_string(),
            counts.scheduled.to_string(),
            counts.leased.to_string(),
            counts.delivered.to_string(),
            counts.dead.to_string(),
            counts.discarded.to_string(),
            counts.lag.map_or("-".into(), duration),
            counts.blocked_keys.to_string(),
            counts.blocked_pending.to_string(),
        ];
        if let Some(rate) = rate {
            cells.insert(6, rate.to_string());
        }
        cells
    };
    for topic in &status.topics {
        let rate = delivered.map(|d| d.get(&topic.topic).copied().unwrap_or(0));
        table.row(row(&topic.topic, &topic.counts, rate));
    }
    let total_rate = delivered.map(|d| d.values().sum());
    table.row(row("(all)", &status.total, total_rate));

    let mut out = format!(
        "outbox table `{}` at {} (database clock)\n\n{}\n\n",
        status.table,
        time(status.at),
        table.render()
    );
    if status.leases.is_empty() {
        out.push_str("no leases held");
    } else {
        let mut leases = Table::new(&["lease owner", "rows>", "oldest lease", "newest lease"]);
        for holder in &status.leases {
            leases.row(vec![
                holder.owner.to_string(),
                holder.rows.to_string(),
                duration(holder.oldest),
                duration(holder.newest),
            ]);
        }
        out.push_str(&leases.render());
    }
    out
}
