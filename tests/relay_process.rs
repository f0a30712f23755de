//! `outbox relay` as service managers run it: standard input from `/dev/null`, stopped by
//! a signal.

mod common;

use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::logs::Logs;
use common::*;
use outbox::Message;

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill takes any pid and signal number and only reports failure.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal sent");
}

/// The child's exit status, if it exits within `timeout`.
fn exit_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_stdin_from_dev_null_the_relay_runs_until_sigterm_then_exits_0_holding_nothing() {
    let table = TestTable::new("relay_term");
    let topic = unique("relay_term");
    let first: Vec<Message> = (0..20)
        .map(|i| Message::new(&topic, format!("m{i}")).with_key(format!("k{}", i % 4)))
        .collect();
    table.commit(&first);
    let mut command = relay_command(&table.name, "term", "", &[]);
    command.stdin(Stdio::null());
    let (mut relay, _owner) = start_relay(command);

    assert!(
        wait_for(Duration::from_secs(30), || table.count("state = 1") == 20),
        "the relay delivers"
    );
    // A message committed later is delivered too: the relay did not stop after a round.
    table.commit(&[Message::new(&topic, "later").with_key("k0")]);
    assert!(
        wait_for(Duration::from_secs(30), || table.count("state = 1") == 21),
        "the relay is still running"
    );
    assert!(relay.try_wait().unwrap().is_none());

    send_signal(&relay, libc::SIGTERM);
    let status = exit_within(&mut relay, Duration::from_secs(20)).expect("SIGTERM stops it");
    assert_eq!(status.code(), Some(0), "a clean stop, not a kill: {status}");
    assert_eq!(table.count("locked_by <> 0"), 0, "no lease left behind");
}

#[test]
fn a_second_signal_while_the_relay_settles_exits_at_once_and_loses_nothing() {
    let table = TestTable::new("relay_twice");
    let topic = unique("relay_twice");
    table.commit(&[Message::new(&topic, "never arrives")]);
    // Nothing listens on port 9: the publish in flight waits out message.timeout.ms.
    let mut command = relay_command(&table.name, "twice", ",message.timeout.ms=60000", &[]);
    command
        .env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9")
        .env("OUTBOX_MAX_LOCK_MS", "200000") // longer than the test: no lease expires
        // The refused connections are not logged; the start of each publish is.
        .env("RUST_LOG", "warn,outbox=debug,rdkafka=off,librdkafka=off")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let (mut relay, _owner) = start_relay(command);
    let logs = Logs::capture(relay.stderr.take().unwrap(), "relay");
    // The lease is written just before the batch reaches the publisher, and a stop in
    // between would release it untried: wait until the publish began. It then waits 60 s.
    assert!(
        logs.wait_for("publishing a batch of 1 ", Duration::from_secs(30))
            .is_some(),
        "the message is being published"
    );
    assert_eq!(table.count("locked_by <> 0"), 1, "under its lease");

    send_signal(&relay, libc::SIGINT);
    assert!(
        exit_within(&mut relay, Duration::from_secs(1)).is_none(),
        "the first signal waits for the publish in flight"
    );
    send_signal(&relay, libc::SIGINT);
    let status = exit_within(&mut relay, Duration::from_secs(5)).expect("the second exits");
    assert_eq!(status.code(), Some(1), "{status}");
    assert_eq!(
        table.count("state = 0"),
        1,
        "still pending: its lease expires and another relay sends it"
    );
}

/// Runs a relay whose configuration is refused: checks that it exits 2 and returns all
/// it printed.
fn run_refused(mut command: std::process::Command) -> String {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(2), "{printed}");
    printed
}

#[test]
fn the_relay_reads_a_java_client_properties_file_whose_values_hold_commas() {
    let table = TestTable::new("relay_config");
    let topic = unique("relay_config");
    table.commit(&[Message::new(&topic, "configured").with_key("k")]);
    let file = std::env::temp_dir()
        .join(unique("client"))
        .with_extension("properties");
    std::fs::write(
        &file,
        format!(
            "# as a Kafka client is configured\n\
             message.timeout.ms = {MESSAGE_TIMEOUT_MS}\n\
             request.timeout.ms: {REQUEST_TIMEOUT_MS}\n\
             debug=broker,topic\n"
        ),
    )
    .unwrap();
    let mut command = relay_command(&table.name, "config", "", &[]);
    command
        .arg("--kafka-config")
        .arg(&file)
        .env("OUTBOX_KAFKA_PROPERTIES", "")
        .stdin(Stdio::null());
    let (mut relay, _owner) = start_relay(command);
    assert!(
        wait_for(Duration::from_secs(30), || table.count("state = 1") == 1),
        "the relay runs with the file's properties"
    );
    send_signal(&relay, libc::SIGTERM);
    let status = exit_within(&mut relay, Duration::from_secs(20)).expect("SIGTERM stops it");
    assert_eq!(status.code(), Some(0));

    // A file the producer refuses: a clear error, exit 2, and no value of it printed.
    std::fs::write(&file, "sasl.password=hunter2-secret\nno.such.property=1\n").unwrap();
    let mut command = relay_command(&table.name, "config", "", &[]);
    command
        .env("OUTBOX_KAFKA_CONFIG_FILE", &file)
        .env("OUTBOX_KAFKA_PROPERTIES", "")
        .env("RUST_LOG", "info");
    let printed = run_refused(command);
    assert!(printed.contains("no.such.property"), "{printed}");
    assert!(!printed.contains("hunter2-secret"), "{printed}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_refused_secret_property_is_named_but_its_value_never_printed() {
    let table = TestTable::new("relay_secret");
    let mut command = relay_command(&table.name, "secret", "", &[]);
    command
        .env(
            "OUTBOX_KAFKA_PROPERTIES",
            "sasl.oauthbearer.method=hunter2-secret,sasl.password=also\\,secret",
        )
        .env("RUST_LOG", "debug");
    let printed = run_refused(command);
    assert!(printed.contains("sasl.oauthbearer.method"), "{printed}");
    for secret in ["hunter2-secret", "also,secret"] {
        assert!(!printed.contains(secret), "{secret} printed: {printed}");
    }
}
