//! `outbox inbox migrate|dead|replay|discard`: an inbox's tables and its dead records.

use std::process::ExitCode;

use outbox::inbox::{DeadDelivery, Inbox};
use serde_json::json;

use crate::render::{bytes, shorten, time, Table};
use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// The inbox's table (its dead records are in `<table>_dead`).
    #[arg(long, env = "OUTBOX_INBOX_TABLE", default_value = "inbox")]
    inbox_table: String,
    #[command(subcommand)]
    command: InboxCommand,
}

#[derive(clap::Subcommand)]
enum InboxCommand {
    /// Create the inbox's tables if they do not exist.
    Migrate,
    /// Records whose handler failed `max_attempts` times, oldest first, with their error.
    Dead(ListArgs),
    /// Have the consumer run its handler again on these dead records (row ids).
    Replay(IdArgs),
    /// Delete these dead records (row ids) without applying them.
    Discard(IdArgs),
}

#[derive(clap::Args)]
struct ListArgs {
    /// Only this consumer's.
    #[arg(long)]
    consumer: Option<String>,
    /// Only records with a row id above this one: the next page.
    #[arg(long, value_name = "ID", default_value_t = 0)]
    after_id: u64,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON: {"records": [...], "next_after_id": id or null}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct IdArgs {
    /// Row ids, as `outbox inbox dead` lists them.
    #[arg(required = true, value_name = "ID")]
    ids: Vec<u64>,
}

pub fn run(pool: mysql::Pool, args: Args) -> Result<ExitCode, Failure> {
    let inbox = Inbox::with_table(pool, &args.inbox_table)?;
    let table = inbox.table().to_string();
    match args.command {
        InboxCommand::Migrate => {
            inbox.migrate()?;
            println!("inbox `{table}` is up to date");
        }
        InboxCommand::Dead(list) => {
            let dead = inbox.dead(list.consumer.as_deref(), list.after_id, list.limit)?;
            let next = (dead.len() == list.limit)
                .then(|| dead.last().map(|d| d.id))
                .flatten();
            if list.json {
                let records: Vec<_> = dead.iter().map(to_json).collect();
                println!("{}", json!({"records": records, "next_after_id": next}));
            } else {
                print!("{}", render(&dead));
                if let Some(next) = next {
                    println!("more: --after-id {next}");
                }
            }
        }
        InboxCommand::Replay(ids) => {
            let found = inbox.replay(&ids.ids)?;
            println!(
                "{found} of {} dead records asked for replay; each consumer replays its own",
                ids.ids.len()
            );
        }
        InboxCommand::Discard(ids) => {
            let found = inbox.discard(&ids.ids)?;
            println!("{found} of {} dead records deleted", ids.ids.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(dead: &[DeadDelivery]) -> String {
    if dead.is_empty() {
        return "no dead records\n".into();
    }
    let mut table = Table::new(&[
        "id",
        "consumer",
        "message",
        "topic",
        "partition",
        "offset",
        "attempts",
        "died",
        "replay",
        "error",
    ]);
    for d in dead {
        table.row(vec![
            d.id.to_string(),
            d.consumer.clone(),
            d.delivery.message_id().to_string(),
            d.delivery.topic().to_string(),
            d.delivery.partition().to_string(),
            d.delivery.offset().to_string(),
            d.attempts.to_string(),
            time(d.died_on),
            if d.replay_requested_on.is_some() {
                "asked".into()
            } else {
                String::new()
            },
            shorten(&d.error, 60),
        ]);
    }
    table.render()
}

fn to_json(d: &DeadDelivery) -> serde_json::Value {
    let headers: Vec<_> = d
        .delivery
        .headers()
        .iter()
        .map(|(name, value)| json!([name, bytes(value)]))
        .collect();
    json!({
        "id": d.id,
        "consumer": d.consumer,
        "message_id": d.delivery.message_id().to_string(),
        "topic": d.delivery.topic(),
        "partition": d.delivery.partition(),
        "offset": d.delivery.offset(),
        "key": d.delivery.key().map(bytes),
        "headers": headers,
        "payload": bytes(d.delivery.payload()),
        "attempts": d.attempts,
        "died_on": outbox::admin::rfc3339(d.died_on),
        "replay_requested_on": d.replay_requested_on.map(outbox::admin::rfc3339),
        "error": d.error,
    })
}
