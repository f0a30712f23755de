//! `outbox-relay`: a dispatcher as a process of its own, for services that would rather
//! not run the relay in-process, and for the crash tests.
//!
//! Configured by environment variables (all optional):
//!
//! | variable | default |
//! | --- | --- |
//! | `OUTBOX_DATABASE_URL` | `mysql://root@127.0.0.1:3306/test` |
//! | `OUTBOX_KAFKA_BROKERS` | `127.0.0.1:9092` |
//! | `OUTBOX_TABLE` | `outbox` |
//! | `OUTBOX_INSTANCE` | `relay-<pid>` |
//! | `OUTBOX_KAFKA_PROPERTIES` | none; `name=value` pairs separated by commas |
//! | `OUTBOX_BATCH_SIZE`, `OUTBOX_MAX_ATTEMPTS` | as `DispatcherSettings` |
//! | `OUTBOX_PROCESS_INTERVAL_MS`, `OUTBOX_LOCK_CHECK_INTERVAL_MS`, `OUTBOX_MAX_LOCK_MS` | as `DispatcherSettings` |
//! | `OUTBOX_BACKOFF_MIN_MS`, `OUTBOX_BACKOFF_MAX_MS` | as `DispatcherSettings` |
//!
//! It runs until its standard input closes (then it settles the batch in flight and
//! exits 0). Killed in any other way, it loses nothing: its leases expire and other
//! dispatchers take its rows over. Logs go to standard error (`RUST_LOG`, default `info`).

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use crossbeam_channel::{bounded, select};
use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, MySqlStore};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("outbox-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let database_url =
        var("OUTBOX_DATABASE_URL").unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".into());
    let brokers = var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|| "127.0.0.1:9092".into());
    let table = var("OUTBOX_TABLE").unwrap_or_else(|| "outbox".into());
    let instance =
        var("OUTBOX_INSTANCE").unwrap_or_else(|| format!("relay-{}", std::process::id()));
    let properties = parse_properties(&var("OUTBOX_KAFKA_PROPERTIES").unwrap_or_default())?;

    let mut settings = DispatcherSettings::default();
    if let Some(n) = number("OUTBOX_BATCH_SIZE")? {
        settings.batch_size = usize::try_from(n)?;
    }
    if let Some(n) = number("OUTBOX_MAX_ATTEMPTS")? {
        settings.max_attempts = Some(u32::try_from(n)?);
    }
    if let Some(ms) = number("OUTBOX_PROCESS_INTERVAL_MS")? {
        settings.process_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = number("OUTBOX_LOCK_CHECK_INTERVAL_MS")? {
        settings.lock_check_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = number("OUTBOX_MAX_LOCK_MS")? {
        settings.max_lock_duration = Duration::from_millis(ms);
    }
    if let Some(ms) = number("OUTBOX_BACKOFF_MIN_MS")? {
        settings.backoff_min = Duration::from_millis(ms);
    }
    if let Some(ms) = number("OUTBOX_BACKOFF_MAX_MS")? {
        settings.backoff_max = Duration::from_millis(ms);
    }

    let store = MySqlStore::with_table(pool(&database_url)?, &table)?;
    store.migrate()?;
    let broker = KafkaBroker::with_properties(&brokers, properties)?;
    let mut handle = Dispatcher::new(store, broker, settings, &instance)?.start()?;
    // Print the lease owner so that a supervisor (or a test) can find this process's rows.
    println!("{}", handle.owner());
    log::info!(
        "{} holds its leases as locked_by = {}",
        handle.owner(),
        MySqlStore::lease_token(handle.owner())
    );

    let (closed_tx, closed_rx) = bounded::<()>(1);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed_tx.send(());
    });
    loop {
        select! {
            recv(closed_rx) -> _ => break,
            // Errors are logged by the library; the channel only closes if every worker died.
            recv(handle.errors()) -> error => if error.is_err() { break },
        }
    }
    handle.stop()?;
    Ok(())
}

/// The relay's pool. The dispatcher keeps at most four connections, so unless the URL
/// sets `pool_min`/`pool_max`, the pool opens one connection at start and at most eight
/// (the mysql crate's default opens ten at once, each with its own buffers).
fn pool(url: &str) -> Result<mysql::Pool, mysql::Error> {
    let opts = mysql::Opts::from_url(url)?;
    if url.contains("pool_min") || url.contains("pool_max") {
        return mysql::Pool::new(opts);
    }
    let constraints = mysql::PoolConstraints::new_const::<1, 8>();
    let pool_opts = mysql::PoolOpts::default().with_constraints(constraints);
    mysql::Pool::new(mysql::OptsBuilder::from_opts(opts).pool_opts(pool_opts))
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number(name: &str) -> Result<Option<u64>, String> {
    var(name)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{name}={v:?} is not a whole number"))
        })
        .transpose()
}

fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!(
                "OUTBOX_KAFKA_PROPERTIES: {pair:?} is not name=value"
            )),
        })
        .collect()
}
