//! The `outbox` command as a process of its own, and an HTTP exchange with it.

#![allow(dead_code)]

use std::time::Duration;

use super::*;

/// Starts `outbox relay` on `table` (run through `wrapper`, a command and its
/// arguments, when not empty); returns the process and its lease owner, which it prints.
/// Closing its standard input stops it gracefully.
pub fn spawn_relay(
    table: &str,
    instance: &str,
    extra_properties: &str,
    wrapper: &[&str],
) -> (std::process::Child, String) {
    let mut command = relay_command(table, instance, extra_properties, wrapper);
    command.stdin(std::process::Stdio::piped());
    start_relay(command)
}

/// The command that runs `outbox relay` on `table` with the tests' settings
/// and brokers, as [`spawn_relay`] starts it; its standard input is left to the caller.
pub fn relay_command(
    table: &str,
    instance: &str,
    extra_properties: &str,
    wrapper: &[&str],
) -> std::process::Command {
    use std::process::{Command, Stdio};
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(outbox_command());
            command
        }
        None => Command::new(outbox_command()),
    };
    command.arg("relay");
    command
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TABLE", table)
        .env("OUTBOX_INSTANCE", instance)
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("OUTBOX_PROCESS_INTERVAL_MS", "50")
        .env("OUTBOX_LOCK_CHECK_INTERVAL_MS", "100")
        .env("OUTBOX_MAX_LOCK_MS", shortest_lease().as_millis().to_string())
        .env(
            "OUTBOX_KAFKA_PROPERTIES",
            format!(
                "message.timeout.ms={MESSAGE_TIMEOUT_MS},request.timeout.ms={REQUEST_TIMEOUT_MS}{extra_properties}"
            ),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    command
}

/// The path of the `outbox` command, built for the tests.
pub fn outbox_command() -> &'static str {
    let Some(path) = option_env!("CARGO_BIN_EXE_outbox") else {
        panic!("the outbox command: run the tests with `--features cli` (make test)");
    };
    path
}

/// Starts a relay from [`relay_command`]; returns the process and its lease owner.
pub fn start_relay(mut command: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("outbox relay starts ({command:?}): {e}"));
    let mut owner = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut owner)
        .unwrap();
    (child, owner.trim().to_string())
}

/// One HTTP/1.0 exchange on a fresh connection: the status code and the body.
pub fn exchange(address: &str, request: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::Write::write_all(&mut stream, request).unwrap();
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    (status, body)
}

/// A child process killed when dropped, so that a failing test leaves none running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
