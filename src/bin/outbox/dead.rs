//! `outbox dead list|show`, `outbox replay` and `outbox discard`.

use std::process::ExitCode;

use outbox::admin::{Admin, DeadFilter, DeadMessage, MessageRef, StoredMessage, TimeBound};
use serde_json::json;

use crate::render::{bytes, shorten, time, Table};
use crate::status::parse_duration;
use crate::Failure;

/// Most dead messages `dead list` prints unless `--limit` says otherwise.
const LIST_LIMIT: usize = 50;

#[derive(clap::Subcommand)]
pub enum DeadCommand {
    /// Dead messages, oldest first, with their last error.
    List(ListArgs),
    /// One message whole, in whatever state: every column, its headers and payload.
    Show(ShowArgs),
}

/// Which dead messages: every option given narrows the selection.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// This message: a row id, or a message id (UUID). Repeat for more.
    #[arg(long = "id", value_name = "ID", value_parser = parse_message)]
    ids: Vec<MessageRef>,
    /// Of this topic.
    #[arg(long)]
    topic: Option<String>,
    /// With this key (text).
    #[arg(long, conflicts_with = "key_hex")]
    key: Option<String>,
    /// With this key, in hexadecimal (for keys that are not text).
    #[arg(long, value_name = "HEX", value_parser = parse_hex)]
    key_hex: Option<Vec<u8>>,
    /// Whose last error contains this text (ignoring case).
    #[arg(long, value_name = "TEXT")]
    error: Option<String>,
    /// That died at or after this time: 2026-12-02T09:00:00Z, or a while ago (2h).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    died_after: Option<TimeBound>,
    /// That died before this time: 2026-12-02T09:00:00Z, or a while ago (30m).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    died_before: Option<TimeBound>,
    /// That hold back at least one pending message of their key (with
    /// dead_blocks_key, the relays send none of those until this one is replayed or
    /// discarded).
    #[arg(long)]
    blocking: bool,
}

impl FilterArgs {
    fn filter(&self, after_id: Option<u64>, limit: Option<usize>) -> DeadFilter {
        DeadFilter {
            messages: self.ids.clone(),
            topic: self.topic.clone(),
            key: self
                .key
                .as_ref()
                .map(|k| k.as_bytes().to_vec())
                .or_else(|| self.key_hex.clone()),
            error_contains: self.error.clone(),
            died_after: self.died_after,
            died_before: self.died_before,
            after_id,
            blocking: self.blocking,
            limit,
        }
    }
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Only messages with a row id above this one: the next page.
    #[arg(long, value_name = "ID")]
    after_id: Option<u64>,
    /// At most this many.
    #[arg(long, default_value_t = LIST_LIMIT)]
    limit: usize,
    /// Print JSON: {"messages": [...], "next_after_id": id or null}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// A row id, or a message id (UUID).
    #[arg(value_parser = parse_message)]
    id: MessageRef,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Every dead message (when no --id or filter narrows the selection).
    #[arg(long)]
    all: bool,
    /// At most this many, the oldest first.
    #[arg(long)]
    limit: Option<usize>,
    /// Say how many and which, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON: {"dry_run": bool, "count": n, "messages": [...]}.
    #[arg(long)]
    json: bool,
}

fn parse_message(text: &str) -> Result<MessageRef, String> {
    text.parse().map_err(|e: outbox::Error| e.to_string())
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if !digits.len().is_multiple_of(2) {
        return Err(format!("{text:?} is not hexadecimal bytes"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("{text:?} is not hexadecimal bytes"))
        })
        .collect()
}

/// A time: RFC 3339 with its offset, or a duration meaning that long ago.
fn parse_time(text: &str) -> Result<TimeBound, String> {
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        let micros = at.as_microsecond();
        let at = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_micros(
                micros.max(0).unsigned_abs(),
            ))
            .ok_or_else(|| format!("{text:?} is out of range"))?;
        return Ok(TimeBound::At(at));
    }
    parse_duration(text).map(TimeBound::Ago).map_err(|_| {
        format!("{text:?} is neither a time (2026-12-02T09:00:00Z) nor a while ago (2h)")
    })
}

pub fn run(admin: &Admin, command: DeadCommand) -> Result<ExitCode, Failure> {
    match command {
        DeadCommand::List(args) => list(admin, &args),
        DeadCommand::Show(args) => show(admin, &args),
    }
}

fn list(admin: &Admin, args: &ListArgs) -> Result<ExitCode, Failure> {
    let messages = admin.dead(&args.filter.filter(args.after_id, Some(args.limit)))?;
    // A full page may have a next one.
    let next = (messages.len() == args.limit)
        .then(|| messages.last().map(|m| m.id))
        .flatten();
    if args.json {
        let messages: Vec<_> = messages.iter().map(DeadMessage::to_json).collect();
        println!("{}", json!({ "messages": messages, "next_after_id": next }));
        return Ok(ExitCode::SUCCESS);
    }
    if messages.is_empty() {
        println!("no dead message matches");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", table(&messages));
    if let Some(next) = next {
        println!(
            "(first {}; the next page: --after-id {next})",
            messages.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn show(admin: &Admin, args: &ShowArgs) -> Result<ExitCode, Failure> {
    let Some(message) = admin.message(args.id)? else {
        return Err(format!("no message {} in `{}`", args.id, admin.table()).into());
    };
    if args.json {
        println!("{}", message.to_json());
    } else {
        println!("{}", whole(&message));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn replay(admin: &Admin, args: &ChangeArgs) -> Result<ExitCode, Failure> {
    change(admin, args, "replay", "replayed", Admin::replay)
}

pub fn discard(admin: &Admin, args: &ChangeArgs) -> Result<ExitCode, Failure> {
    change(admin, args, "discard", "discarded", Admin::discard)
}

fn change(
    admin: &Admin,
    args: &ChangeArgs,
    verb: &str,
    done: &str,
    operation: fn(&Admin, &DeadFilter, bool) -> outbox::Result<Vec<DeadMessage>>,
) -> Result<ExitCode, Failure> {
    let filter = args.filter.filter(None, args.limit);
    if filter.selects_all() && !args.all {
        return Err(format!(
            "name the messages to {verb}: --id, a filter such as --topic or --error, \
             or --all for every dead message"
        )
        .into());
    }
    let messages = operation(admin, &filter, args.dry_run)?;
    if args.json {
        let list: Vec<_> = messages.iter().map(DeadMessage::to_json).collect();
        println!(
            "{}",
            json!({ "dry_run": args.dry_run, "count": messages.len(), "messages": list })
        );
        return Ok(ExitCode::SUCCESS);
    }
    if messages.is_empty() {
        println!("no dead message matches; nothing changed");
        return Ok(ExitCode::SUCCESS);
    }
    let count = messages.len();
    let plural = if count == 1 { "" } else { "s" };
    if args.dry_run {
        println!("would {verb} {count} dead message{plural} (a dry run: nothing changed):");
    } else {
        println!("{done} {count} dead message{plural}:");
    }
    println!("{}", table(&messages));
    Ok(ExitCode::SUCCESS)
}

fn table(messages: &[DeadMessage]) -> String {
    let mut table = Table::new(&[
        "id>",
        "message id",
        "topic",
        "key",
        "attempts>",
        "holds back>",
        "died",
        "error",
    ]);
    for m in messages {
        table.row(vec![
            m.id.to_string(),
            m.message_id.to_string(),
            m.topic.clone(),
            m.key
                .as_deref()
                .map_or("-".into(), |k| shorten(&bytes(k), 24)),
            m.attempts.to_string(),
            m.holds_back.to_string(),
            time(m.died),
            shorten(m.error.as_deref().unwrap_or("-"), 60),
        ]);
    }
    table.render()
}

/// Every column, a line each, then the headers and the payload.
fn whole(m: &StoredMessage) -> String {
    let never = |t: Option<std::time::SystemTime>| t.map_or("never".into(), time);
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<15} {value}\n"));
    field("id", m.id.to_string());
    field("message id", m.message_id.to_string());
    field("topic", m.topic.clone());
    field("key", m.key.as_deref().map_or("(none)".into(), bytes));
    field("state", m.state.to_string());
    field("attempts", m.attempts.to_string());
    field("error", m.error.clone().unwrap_or_else(|| "(none)".into()));
    field("created", time(m.created));
    field("available", time(m.available));
    field("processed", never(m.processed));
    field("last attempted", never(m.last_attempted));
    field(
        "lease",
        if m.locked_by == 0 {
            "(none)".into()
        } else {
            format!(
                "{} (owner {:08x}), taken {}",
                m.locked_by,
                m.locked_by >> 32,
                never(m.locked_on)
            )
        },
    );
    out.push_str("headers\n");
    match m
        .headers
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => out.push_str("  (none)\n"),
        Some(Ok(serde_json::Value::Array(pairs))) => {
            for pair in pairs {
                match (pair.get(0).and_then(|n| n.as_str()), pair.get(1)) {
                    (Some(name), Some(serde_json::Value::String(value))) => {
                        out.push_str(&format!("  {name}: {value}\n"));
                    }
                    (Some(name), Some(value)) => out.push_str(&format!("  {name}: {value}\n")),
                    _ => out.push_str(&format!("  {pair}\n")),
                }
            }
        }
        Some(_) => out.push_str(&format!(
            "  (not as stored by outbox) {}\n",
            m.headers.as_deref().unwrap_or("")
        )),
    }
    out.push_str(&format!("payload ({} bytes)\n", m.payload.len()));
    match std::str::from_utf8(&m.payload) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && !"\n\r\t".contains(c)) =>
        {
            out.push_str(text)
        }
        _ => out.push_str(&bytes(&m.payload)),
    }
    out
}
