//! A MariaDB server of a test's own, started with `mariadb-install-db` and `mariadbd`
//! from the MariaDB server package.

use std::time::Duration;

use mysql::prelude::Queryable;

use super::{unique, wait_for};

/// A MariaDB server of the test's own (its own data directory and port), that the test
/// can kill and restart without disturbing the tests that share the main server.
pub struct PrivateDatabase {
    dir: std::path::PathBuf,
    port: u16,
    process: Option<std::process::Child>,
    /// Server options beyond the defaults below.
    pub options: Vec<String>,
}

impl PrivateDatabase {
    pub fn new() -> PrivateDatabase {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("outbox-db"));
        std::fs::create_dir_all(&dir).unwrap();
        // Tried twice: under load a first install has been seen to fail once.
        let install = || {
            std::process::Command::new("mariadb-install-db")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .arg(format!("--datadir={}", dir.join("data").display()))
                .output()
                .expect("mariadb-install-db runs (MariaDB server package)")
        };
        let mut output = install();
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(dir.join("data"));
            output = install();
        }
        assert!(
            output.status.success(),
            "mariadb-install-db succeeds: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PrivateDatabase {
            dir,
            port,
            process: None,
            options: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        format!(
            "mysql://root@127.0.0.1:{}/test?pool_min=1&pool_max=10",
            self.port
        )
    }

    pub fn start(&mut self) {
        let child = std::process::Command::new("/usr/sbin/mariadbd")
            .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
            // Short lock waits, so that the lock-wait test sees timeouts within seconds.
            .arg("--innodb-lock-wait-timeout=1")
            .args(&self.options)
            .arg(format!("--port={}", self.port))
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        self.process = Some(child);
        let url = format!("mysql://root@127.0.0.1:{}/", self.port);
        assert!(
            wait_for(Duration::from_secs(30), || mysql::Conn::new(url.as_str())
                .and_then(|mut c| c.query_drop("CREATE DATABASE IF NOT EXISTS test"))
                .is_ok()),
            "the private database accepts connections"
        );
    }

    pub fn kill(&mut self) {
        kill_child(&mut self.process);
    }
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills a private server's process (SIGKILL) and reaps it, if it runs.
pub fn kill_child(process: &mut Option<std::process::Child>) {
    if let Some(mut child) = process.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
