//! `outbox`: the relay as a process, and what the person on call needs to see and act
//! on an outbox table without reading its schema.
//!
//! Every subcommand takes `--database-url` (`OUTBOX_DATABASE_URL`) and `--table`
//! (`OUTBOX_TABLE`); `outbox <subcommand> --help` says the rest. An environment variable
//! set to the empty string counts as unset.
//!
//! Exit status: 0 done; 1 the relay's worker died or `status --max-lag` was exceeded;
//! 2 bad input or an unreachable database, after one line on standard error and with
//! nothing changed. Nothing printed carries the password of the database URL.

mod dead;
mod inbox;
mod leases;
mod relay;
mod render;
mod serve;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox::admin::Admin;
use outbox::MySqlStore;

/// Exit status for bad input and unreachable databases.
const BAD_INPUT: u8 = 2;

/// See and act on an outbox table, or run its relay.
#[derive(Parser)]
#[command(name = "outbox", version, about, long_about = None)]
struct Cli {
    /// The database, as a MySQL URL.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_DATABASE_URL",
        hide_env_values = true,
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    database_url: String,

    /// The outbox table.
    #[arg(long, global = true, env = "OUTBOX_TABLE", default_value = "outbox")]
    table: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay committed messages to Kafka until SIGTERM or SIGINT.
    Relay(relay::Args),
    /// Create the table, or bring one made by an earlier version up to date.
    Migrate,
    /// Counts by state, lag and leases, in all and per topic.
    Status(status::Args),
    /// List dead messages, or show one message whole.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Make dead messages pending again, in their place in their key's order.
    Replay(dead::ChangeArgs),
    /// Give up on dead messages: never sent, no longer counted as work, deleted by retention.
    Discard(dead::ChangeArgs),
    /// The leases dispatchers hold, by owner; or release those of a dispatcher that is gone.
    Leases(leases::Args),
    /// An inbox (the consumer's side): its tables, its dead records and their replay.
    Inbox(inbox::Args),
}

/// What a subcommand's failure prints; `Box<dyn Error>` for any error.
type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    drop_empty_variables();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to standard output, with status 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("outbox: {}", one_line(&e.to_string()));
            return ExitCode::from(BAD_INPUT);
        }
    };
    let secrets = render::url_secrets(&cli.database_url);
    let (url, table) = (cli.database_url.as_str(), cli.table.as_str());
    let result = match cli.command {
        // The relay blocks its stop signals before any thread starts, and logs at info.
        Command::Relay(args) => relay::main(url, table, args),
        Command::Migrate => with_store(url, table, |store| {
            store.migrate()?;
            println!("table `{table}` is up to date");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Status(args) => with_admin(url, table, |admin| status::run(admin, &args)),
        Command::Dead(command) => with_admin(url, table, |admin| dead::run(admin, command)),
        Command::Replay(args) => with_admin(url, table, |admin| dead::replay(admin, &args)),
        Command::Discard(args) => with_admin(url, table, |admin| dead::discard(admin, &args)),
        Command::Leases(args) => with_admin(url, table, |admin| leases::run(admin, &args)),
        Command::Inbox(args) => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
                .init();
            pool(url, 1).and_then(|pool| inbox::run(pool, args))
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("outbox: {}", render::redact(&error.to_string(), &secrets));
            ExitCode::from(BAD_INPUT)
        }
    }
}

/// Runs `work` on the store of `table`, with the logger of the commands other than the
/// relay (`RUST_LOG`, default `warn`).
fn with_store(
    url: &str,
    table: &str,
    work: impl FnOnce(&MySqlStore) -> Result<ExitCode, Failure>,
) -> Result<ExitCode, Failure> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Two connections: `status` runs its two queries at once.
    let store = MySqlStore::with_table(pool(url, 2)?, table)?;
    work(&store)
}

/// Runs `work` on an [`Admin`] of `table`, once it is checked to be an outbox table.
fn with_admin(
    url: &str,
    table: &str,
    work: impl FnOnce(&Admin) -> Result<ExitCode, Failure>,
) -> Result<ExitCode, Failure> {
    with_store(url, table, |store| work(&Admin::new(store.clone())?))
}

/// A pool opening one connection at once and at most `max`, unless the URL sets
/// `pool_min`/`pool_max`; connecting gives up after 10 s unless it sets
/// `tcp_connect_timeout_ms`. Opening it connects: an unreachable database fails here.
fn pool(url: &str, max: usize) -> Result<mysql::Pool, Failure> {
    mysql::Pool::new(opts(url, max)?).map_err(|e| format!("cannot reach the database: {e}").into())
}

/// The connection options of `url`, with a pool of 1 to `max` connections and a connect
/// timeout of 10 s unless the URL sets them.
fn opts(url: &str, max: usize) -> Result<mysql::Opts, Failure> {
    let opts = mysql::Opts::from_url(url)
        .map_err(|e| format!("--database-url (OUTBOX_DATABASE_URL) is not a MySQL URL: {e}"))?;
    let mut builder = mysql::OptsBuilder::from_opts(opts);
    if !url.contains("pool_min") && !url.contains("pool_max") {
        let constraints = mysql::PoolConstraints::new(1, max).unwrap_or_default();
        builder = builder.pool_opts(mysql::PoolOpts::default().with_constraints(constraints));
    }
    if !url.contains("tcp_connect_timeout") {
        builder = builder.tcp_connect_timeout(Some(std::time::Duration::from_secs(10)));
    }
    Ok(builder.into())
}

/// A parse error's text on one line: its first paragraph, without the usage after it.
fn one_line(text: &str) -> String {
    text.lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Removes `OUTBOX_*` variables set to the empty string, so that they count as unset.
fn drop_empty_variables() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(name, value)| {
            name.to_str().is_some_and(|n| n.starts_with("OUTBOX_")) && value.is_empty()
        })
        .map(|(name, _)| name)
        .collect();
    for name in empty {
        // Single-threaded still: nothing else reads the environment at the same time.
        std::env::remove_var(name);
    }
}
