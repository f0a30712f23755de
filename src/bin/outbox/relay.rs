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
//! | `OUTBOX_KAFKA_CONFIG_FILE` | none; a Java `.properties` file (Kafka's `client.properties`), also `--kafka-config FILE` |
//! | `OUTBOX_KAFKA_PROPERTIES` | none; `name=value` pairs separated by commas, `\,` for a comma in a value; they override the file's |
//! | `OUTBOX_BATCH_SIZE`, `OUTBOX_MAX_ATTEMPTS` | as `DispatcherSettings` |
//! | `OUTBOX_PROCESS_INTERVAL_MS`, `OUTBOX_LOCK_CHECK_INTERVAL_MS`, `OUTBOX_MAX_LOCK_MS` | as `DispatcherSettings` |
//! | `OUTBOX_BACKOFF_MIN_MS`, `OUTBOX_BACKOFF_MAX_MS` | as `DispatcherSettings` |
//!
//! It runs until SIGTERM or SIGINT, or until its standard input closes when that is a
//! pipe (a parent that dies stops it): then it settles the batch in flight and exits 0.
//! A second signal while it settles makes it exit at once, with 1; so does a worker of
//! the dispatcher that died (after its leases were released). Killed in any other
//! way, it loses nothing: its leases expire and other dispatchers take its rows over.
//! Logs go to standard error (`RUST_LOG`, default `info`).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use outbox::{Dispatcher, DispatcherSettings, KafkaBroker, MySqlStore};

fn main() -> ExitCode {
    // Before any thread starts, so that every thread inherits the mask and only the
    // signal thread ever takes these signals.
    let signals = block_stop_signals();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let signals = match signals {
        Ok(signals) => signals,
        Err(e) => {
            log::error!("outbox-relay: could not block SIGTERM and SIGINT to wait for them: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("outbox-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(signals: libc::sigset_t) -> Result<(), Box<dyn std::error::Error>> {
    let database_url =
        var("OUTBOX_DATABASE_URL").unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".into());
    let brokers = var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|| "127.0.0.1:9092".into());
    let table = var("OUTBOX_TABLE").unwrap_or_else(|| "outbox".into());
    let instance =
        var("OUTBOX_INSTANCE").unwrap_or_else(|| format!("relay-{}", std::process::id()));
    // The file's properties first; OUTBOX_KAFKA_PROPERTIES overrides them.
    let mut properties = match kafka_config_file()? {
        Some(path) => KafkaBroker::properties_file(path)?,
        None => Vec::new(),
    };
    properties.extend(parse_properties(
        &var("OUTBOX_KAFKA_PROPERTIES").unwrap_or_default(),
    )?);

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
    let leases = MySqlStore::leases_of(handle.owner());
    log::info!(
        "{} holds its leases as locked_by BETWEEN {} AND {}",
        handle.owner(),
        leases.start(),
        leases.end()
    );

    let stop = stop_requests(signals);
    // Until a stop request or a worker's death; Err, and so exit status 1, for a death.
    if let Some(why) = handle.run_until(&stop)? {
        log::info!("{}: {why}, stopped", handle.owner());
    }
    Ok(())
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

/// The relay's pool. The dispatcher keeps at most five connections, so unless the URL
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

/// The Kafka properties file: `--kafka-config FILE` (or `--kafka-config=FILE`), else
/// `OUTBOX_KAFKA_CONFIG_FILE`. Any other argument is refused.
fn kafka_config_file() -> Result<Option<String>, String> {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--kafka-config") {
            Some("") => file = Some(args.next().ok_or("--kafka-config needs a file")?),
            Some(rest) if rest.starts_with('=') => file = Some(rest[1..].to_string()),
            _ => {
                return Err(format!(
                    "unknown argument {arg:?}; the only one is --kafka-config FILE \
                     (everything else is set by environment variables)"
                ))
            }
        }
    }
    Ok(file.or_else(|| var("OUTBOX_KAFKA_CONFIG_FILE")))
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
