//! The relay publishes over TLS, verifying the broker's certificate against a CA: a
//! private Tansu behind Debian's stunnel, with a CA and a certificate the test makes with
//! `openssl`. With the wrong CA, nothing is delivered and the relay says why.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tansu::Tansu;
use common::*;
use outbox::{KafkaBroker, Message};

/// A CA, and a certificate for 127.0.0.1 it signed, in a directory of their own.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn new() -> Certificates {
        let dir = std::env::temp_dir().join(unique("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?}");
        };
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Certificates { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// stunnel terminating TLS on `accept` and passing the bytes to `connect`.
struct Terminator(Child);

impl Terminator {
    fn start(certificates: &Certificates, accept: &str, connect: &str) -> Terminator {
        let config = certificates.dir.join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = {accept}\nconnect = {connect}\n\
                 cert = {}\nkey = {}\n",
                certificates.path("server.pem"),
                certificates.path("server.key")
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 runs (make services installs it)");
        assert!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(
                accept
            )
            .is_ok()),
            "stunnel listens"
        );
        Terminator(child)
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn tls_properties(ca: &Path) -> Vec<(String, String)> {
    let mut properties = test_properties();
    properties.push(("security.protocol".into(), "ssl".into()));
    properties.push(("ssl.ca.location".into(), ca.display().to_string()));
    properties
}

#[test]
fn the_relay_publishes_over_tls_and_refuses_a_broker_its_ca_did_not_sign() {
    let certificates = Certificates::new();
    let tls = free_address();
    let mut tansu = Tansu::on_free_port().unwrap();
    tansu.advertised = Some(tls.clone());
    tansu.start().unwrap();
    let _terminator = Terminator::start(&certificates, &tls, tansu.address());

    let table = TestTable::new("tls");
    let topic = unique("tls");
    table.commit(&[Message::new(&topic, "over tls").with_key("k")]);
    let ca = certificates.dir.join("ca.pem");
    let broker = KafkaBroker::with_properties(&tls, tls_properties(&ca)).unwrap();
    let handle = table.dispatch(broker, fast_settings(), "tls");
    assert!(
        wait_for(Duration::from_secs(20), || table.count("state = 1") == 1),
        "published through TLS"
    );
    drop(handle);
    let ca = certificates.path("ca.pem");
    let read = consume_with(
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca)],
        &tls,
        &topic,
        1,
        Duration::from_secs(10),
        Duration::ZERO,
    );
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].payload, b"over tls");

    // Another CA: the relay process never sends, marks nothing, and says why.
    let other = unique("tls_other");
    table.commit(&[Message::new(&other, "must not arrive")]);
    let mut command = relay_command(&table.name, "tls-wrong-ca", "", &[]);
    command
        .env("OUTBOX_KAFKA_BROKERS", &tls)
        .env(
            "OUTBOX_KAFKA_PROPERTIES",
            format!(
                "message.timeout.ms={MESSAGE_TIMEOUT_MS},request.timeout.ms={REQUEST_TIMEOUT_MS},\
                 security.protocol=ssl,ssl.ca.location={}",
                certificates.path("other-ca.pem")
            ),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped());
    let (relay, _owner) = start_relay(command);
    assert!(
        wait_for(
            Duration::from_millis(DELIVERY_TIMEOUT_MS) + Duration::from_secs(30),
            || table.count("state = 0 AND number_of_attempts > 0") == 1
        ),
        "the message failed, and waits"
    );
    assert_eq!(table.count("state = 1"), 1, "nothing more was delivered");
    let mut relay = relay;
    drop(relay.stdin.take());
    let output = relay.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(
        printed.contains("certificate verify failed"),
        "the relay says why: {printed}"
    );
}
