//! `outbox relay`: a dispatcher as a process of its own, for services that would rather
//! not run the relay in-process, and for the crash tests.
//!
//! Configured by flags or environment variables (all optional; `outbox relay --help`):
//!
//! | variable | default |
//! | --- | --- |
//! | `OUTBOX_DATABASE_URL`, `OUTBOX_TABLE` | `mysql://root@127.0.0.1:3306/test`, `outbox` |
//! | `OUTBOX_KAFKA_BROKERS` | `127.0.0.1:9092` |
//! | `OUTBOX_INSTANCE` | `relay-<pid>` |
//! | `OUTBOX_SOURCE`, `OUTBOX_SERVER_ID` | `polling`; `binlog` reads the binary log (under a random server id) |
//! | `OUTBOX_BINLOG_LOCK_TIMEOUT_MS` | 10,000: how soon a standby binlog relay replaces one cut off |
//! | `OUTBOX_BINLOG_SWEEP_AFTER_MS` | 30,000: a row still pending behind the binlog relay this long is swept |
//! | `OUTBOX_BINLOG_LINGER_MS` | 0: how long the binlog relay lets a batch of a few rows wait for more |
//! | `OUTBOX_KAFKA_CONFIG_FILE` | none; a Java `.properties` file (Kafka's `client.properties`), also `--kafka-config FILE` |
//! | `OUTBOX_KAFKA_PROPERTIES` | none; `name=value` pairs separated by commas, `\,` for a comma in a value; they override the file's |
//! | `OUTBOX_BATCH_SIZE`, `OUTBOX_MAX_ATTEMPTS`, `OUTBOX_DEAD_BLOCKS_KEY` | as `DispatcherSettings` |
//! | `OUTBOX_PROCESS_INTERVAL_MS`, `OUTBOX_LINGER_MS`, `OUTBOX_LOCK_CHECK_INTERVAL_MS`, `OUTBOX_MAX_LOCK_MS` | as `DispatcherSettings` |
//! | `OUTBOX_BACKOFF_MIN_MS`, `OUTBOX_BACKOFF_MAX_MS` | as `DispatcherSettings` |
//! | `OUTBOX_METRICS_ADDR` | none; serve /metrics, /healthz, /readyz there (a port alone: 127.0.0.1) |
//! | `OUTBOX_GAUGE_INTERVAL_MS` | 15,000, when serving metrics |
//!
//! It prints its lease owner on standard output, then runs until SIGTERM or SIGINT, or
//! until its standard input closes when that is a pipe (a parent that dies stops it):
//! then it settles the batch in flight and exits 0. A second signal while it settles
//! makes it exit at once, with 1; so does a worker of the dispatcher that died (after its
//! leases were released). A configuration refused exits 2. Killed in any other way, it
//! loses nothing: its leases expire and other dispatchers take its rows over. Logs go to
//! standard error (`RUST_LOG`, default `info`).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use outbox::admin::Owner;
use outbox::binlog::{BinlogRelay, BinlogSettings};
use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, MySqlStore};

use crate::{serve, Failure};

#[derive(clap::Args)]
pub struct Args {
    /// Where messages are read from: `polling` claims committed rows from the table;
    /// `binlog` reads them from the server's binary log as they commit (needs log_bin,
    /// binlog_format=ROW, binlog_row_image=FULL and REPLICATION SLAVE and CLIENT).
    #[arg(long, value_enum, env = "OUTBOX_SOURCE", default_value_t = Source::Polling)]
    source: Source,
    /// With --source binlog: the server id to read the binary log under, unique among
    /// the server's replicas. Default: random, from 1,000,000,000 up.
    #[arg(long, env = "OUTBOX_SERVER_ID")]
    server_id: Option<u32>,
    /// With --source binlog: milliseconds the server keeps the table's lock for an
    /// active relay it hears nothing from; a standby takes over within about that.
    /// Default 10,000.
    #[arg(long, value_name = "MS", env = "OUTBOX_BINLOG_LOCK_TIMEOUT_MS")]
    lock_timeout_ms: Option<u64>,
    /// With --source binlog: milliseconds after which a row still pending behind the
    /// relay is published by its sweep, with a warning. Default 30,000.
    #[arg(long, value_name = "MS", env = "OUTBOX_BINLOG_SWEEP_AFTER_MS")]
    sweep_after_ms: Option<u64>,
    /// With --source binlog: milliseconds a batch of a few rows waits for more before it
    /// is published (fewer, larger produce requests under a stream). Default 0.
    #[arg(long, value_name = "MS", env = "OUTBOX_BINLOG_LINGER_MS")]
    binlog_linger_ms: Option<u64>,
    /// Kafka's bootstrap servers.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// This relay's instance id; its lease owner adds a random suffix. Default relay-<pid>.
    #[arg(long, env = "OUTBOX_INSTANCE")]
    instance: Option<String>,
    /// A Java .properties file of Kafka client settings (Kafka's client.properties).
    #[arg(long, value_name = "FILE", env = "OUTBOX_KAFKA_CONFIG_FILE")]
    kafka_config: Option<String>,
    /// Kafka properties as name=value pairs separated by commas (\, for a comma in a
    /// value); they override the file's.
    #[arg(
        long,
        value_name = "PAIRS",
        env = "OUTBOX_KAFKA_PROPERTIES",
        hide_env_values = true
    )]
    kafka_properties: Option<String>,
    /// Most messages claimed and published in one round.
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Failed sends after which a message is dead; unlimited when unset.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// A dead message holds back the later messages of its key until it is replayed or
    /// discarded (true), or lets them go on (false, the default).
    #[arg(long, value_name = "BOOL", env = "OUTBOX_DEAD_BLOCKS_KEY", default_value_t = false, action = clap::ArgAction::Set)]
    dead_blocks_key: bool,
    /// Longest wait in milliseconds between polls, while they find nothing.
    #[arg(long, value_name = "MS", env = "OUTBOX_PROCESS_INTERVAL_MS")]
    process_interval_ms: Option<u64>,
    /// Milliseconds new messages may gather before the next claim, after a claim that
    /// did not fill its batch (default 10).
    #[arg(long, value_name = "MS", env = "OUTBOX_LINGER_MS")]
    linger_ms: Option<u64>,
    /// Milliseconds between looks for expired leases.
    #[arg(long, value_name = "MS", env = "OUTBOX_LOCK_CHECK_INTERVAL_MS")]
    lock_check_interval_ms: Option<u64>,
    /// Milliseconds a lease lasts before other dispatchers may take its rows.
    #[arg(long, value_name = "MS", env = "OUTBOX_MAX_LOCK_MS")]
    max_lock_ms: Option<u64>,
    /// Least wait in milliseconds before a failed message is tried again.
    #[arg(long, value_name = "MS", env = "OUTBOX_BACKOFF_MIN_MS")]
    backoff_min_ms: Option<u64>,
    /// Longest wait in milliseconds between retries.
    #[arg(long, value_name = "MS", env = "OUTBOX_BACKOFF_MAX_MS")]
    backoff_max_ms: Option<u64>,
    /// Serve /metrics (Prometheus), /healthz and /readyz at this address: host:port, or
    /// a port alone for 127.0.0.1.
    #[arg(long, value_name = "ADDR", env = "OUTBOX_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Milliseconds between reads of the table's backlog into the gauges, when serving
    /// metrics.
    #[arg(
        long,
        value_name = "MS",
        env = "OUTBOX_GAUGE_INTERVAL_MS",
        default_value_t = 15_000
    )]
    gauge_interval_ms: u64,
}

/// Where `outbox relay` reads messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// Claim committed rows from the table, every process interval.
    Polling,
    /// Read committed rows from the server's binary log as they commit.
    Binlog,
}

impl Args {
    fn settings(&self) -> DispatcherSettings {
        let mut settings = DispatcherSettings::default();
        let ms = Duration::from_millis;
        if let Some(n) = self.batch_size {
            settings.batch_size = n;
        }
        if self.max_attempts.is_some() {
            settings.max_attempts = self.max_attempts;
        }
        settings.dead_blocks_key = self.dead_blocks_key;
        if let Some(n) = self.process_interval_ms {
            settings.process_interval = ms(n);
        }
        if let Some(n) = self.linger_ms {
            settings.linger = ms(n);
        }
        if let Some(n) = self.lock_check_interval_ms {
            settings.lock_check_interval = ms(n);
        }
        if let Some(n) = self.max_lock_ms {
            settings.max_lock_duration = ms(n);
        }
        if let Some(n) = self.backoff_min_ms {
            settings.backoff_min = ms(n);
        }
        if let Some(n) = self.backoff_max_ms {
            settings.backoff_max = ms(n);
        }
        if self.metrics_addr.is_some() {
            settings.gauge_interval = Some(ms(self.gauge_interval_ms));
        }
        settings
    }
}

/// Runs the relay until a stop request: exit 0, or 1 when a worker died; a refused
/// configuration is an error (exit 2).
pub fn main(database_url: &str, table: &str, args: Args) -> Result<ExitCode, Failure> {
    // Before any thread starts, so that every thread inherits the mask and only the
    // signal thread ever takes these signals.
    let signals = block_stop_signals();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let signals =
        signals.map_err(|e| format!("could not block SIGTERM and SIGINT to wait for them: {e}"))?;

    let instance = args
        .instance
        .clone()
        .unwrap_or_else(|| format!("relay-{}", std::process::id()));
    // The file's properties first; --kafka-properties overrides them.
    let mut properties = match &args.kafka_config {
        Some(path) => KafkaBroker::properties_file(path)?,
        None => Vec::new(),
    };
    properties.extend(parse_properties(
        args.kafka_properties.as_deref().unwrap_or_default(),
    )?);

    let opts = crate::opts(database_url, 8)?;
    let store = MySqlStore::with_table(crate::pool(database_url, 8)?, table)?;
    store.migrate()?;
    let prometheus = match &args.metrics_addr {
        Some(_) => Some(serve::install_recorder()?),
        None => None,
    };
    let broker = KafkaBroker::with_properties(&args.brokers, properties.clone())?;
    let mut handle = match args.source {
        Source::Polling => {
            Dispatcher::new(store.clone(), broker, args.settings(), &instance)?.start()?
        }
        Source::Binlog => {
            let mut binlog = BinlogSettings::default();
            if let Some(id) = args.server_id {
                binlog.server_id = id;
            }
            if let Some(ms) = args.lock_timeout_ms {
                binlog.lock_timeout = Duration::from_millis(ms);
            }
            if let Some(ms) = args.sweep_after_ms {
                binlog.sweep_after = Duration::from_millis(ms);
            }
            if let Some(ms) = args.binlog_linger_ms {
                binlog.linger = Duration::from_millis(ms);
            }
            BinlogRelay::new(opts, table, broker, args.settings(), binlog, &instance)?.start()?
        }
    };
    // Print the lease owner so that a supervisor (or a test) can find this process's rows.
    println!("{}", handle.owner());
    if let (Some(addr), Some(prometheus)) = (&args.metrics_addr, prometheus) {
        let endpoints = serve::Endpoints {
            prometheus,
            health: handle.health_probe(),
            store,
            brokers: args.brokers.clone(),
            properties,
            broker: std::sync::Mutex::new(None),
            secrets: crate::render::url_secrets(database_url),
        };
        let bound = serve::serve(addr, endpoints)?;
        println!("metrics http://{bound}/metrics");
        log::info!("serving /metrics, /healthz and /readyz at http://{bound}");
    }
    log::info!(
        "{} holds its leases as owner {} (`outbox leases` lists them)",
        handle.owner(),
        Owner::of(handle.owner())
    );

    let stop = stop_requests(signals);
    // Until a stop request or a worker's death.
    match handle.run_until(&stop) {
        Ok(why) => {
            if let Some(why) = why {
                log::info!("{}: {why}, stopped", handle.owner());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            log::error!("outbox relay: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts
/// later); returns the set, for [`stop_requests`] to wait on.
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: the set is a local initialised by sigemptyset before use, and
    // pthread_sigmask only reads it.
    let failed = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => return Ok(set),
            code => code,
        }
    };
    Err(std::io::Error::from_raw_os_error(failed))
}

/// Why the relay should stop, when it should: the first of `signals`, or standard input
/// closing when it is a pipe or a socket. A terminal or `/dev/null` (a service manager's
/// usual standard input) is not watched. A second signal exits the process at once.
fn stop_requests(signals: libc::sigset_t) -> Receiver<&'static str> {
    let (stop_tx, stop_rx) = bounded(2);
    let signal_stop = stop_tx.clone();
    std::thread::spawn(move || {
        let mut received = 0;
        loop {
            let mut signal = 0;
            // SAFETY: `signals` is a valid set and `signal` a valid place for the answer.
            let failed = unsafe { libc::sigwait(&signals, &mut signal) };
            if failed != 0 {
                log::error!("waiting for signals failed ({failed}): SIGTERM will not stop the relay cleanly");
                return;
            }
            received += 1;
            if received > 1 {
                log::error!("a second signal: exiting without settling the batch in flight");
                std::process::exit(1);
            }
            let name = if signal == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            let _ = signal_stop.send(name);
        }
    });
    if stdin_is_a_pipe() {
        std::thread::spawn(move || {
            // Whatever a parent writes is read and dropped, a buffer at a time.
            let mut buffer = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
            let _ = stop_tx.send("standard input closed");
        });
    }
    stop_rx
}

/// Whether standard input is a pipe or a socket, which a parent process holds.
fn stdin_is_a_pipe() -> bool {
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        .unwrap_or(false)
}

/// `name=value` pairs separated by commas; `\,` is a comma inside a value and `\\` a
/// backslash (`debug=broker\,topic`). Errors name the entry by its place, never its
/// text, which may be a secret.
fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut entries = Vec::new();
    let mut entry = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ (',' | '\\')) => entry.push(escaped),
                Some(other) => {
                    entry.push('\\');
                    entry.push(other);
                }
                None => return Err("OUTBOX_KAFKA_PROPERTIES ends in a lone backslash".into()),
            },
            ',' => entries.push(std::mem::take(&mut entry)),
            c => entry.push(c),
        }
    }
    entries.push(entry);
    entries
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.trim().is_empty())
        .map(|(index, entry)| match entry.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!(
                "OUTBOX_KAFKA_PROPERTIES: entry {} is not name=value \
                 (a comma inside a value is written \\,)",
                index + 1
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_inside_values_are_escaped_and_errors_never_echo_values() {
        let parsed =
            parse_properties("debug=broker\\,topic, sasl.password = a\\\\b\\,c ,, linger.ms=5")
                .unwrap();
        assert_eq!(
            parsed,
            [
                ("debug", "broker,topic"),
                ("sasl.password", "a\\b,c"),
                ("linger.ms", "5")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let error = parse_properties("acks=all,sasl.password=x,y0secret").unwrap_err();
        assert!(error.contains("entry 3"), "{error}");
        assert!(!error.contains("y0secret"), "{error}");
        assert!(parse_properties("a=b\\").is_err());
    }
}
