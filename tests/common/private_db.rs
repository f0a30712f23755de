//! A database server of a test's own: MariaDB, started with `mariadb-install-db` and
//! `mariadbd` from the machine's MariaDB server package, or MySQL, from the directory
//! `make mysql` unpacks it into.

use std::time::Duration;

use mysql::prelude::Queryable;

use super::{unique, wait_for};

/// Which server a private database runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    MariaDb,
    MySql,
}

/// A server of the test's own (its own data directory and port), that the test can kill
/// and restart without disturbing the tests that share the main server.
pub struct PrivateDatabase {
    server: Server,
    dir: std::path::PathBuf,
    port: u16,
    process: Option<std::process::Child>,
    /// Server options beyond the defaults below.
    pub options: Vec<String>,
}

/// Where `make mysql` unpacked MySQL (`OUTBOX_TEST_MYSQL` overrides it).
fn mysql_root() -> std::path::PathBuf {
    std::env::var_os("OUTBOX_TEST_MYSQL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".services/mysql/root")
        })
}

/// The unpacked `mysqld`, run through the unpacked dynamic loader and libraries: they
/// are newer than the machine's.
fn mysqld() -> std::process::Command {
    let root = mysql_root();
    let loader = root.join("usr/lib64/ld-linux-x86-64.so.2");
    assert!(
        loader.exists(),
        "MySQL is not unpacked at {} (`make mysql` does it)",
        root.display()
    );
    let libraries = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
        .map(|dir| root.join(dir).display().to_string())
        .join(":");
    let mut command = std::process::Command::new(loader);
    command
        .arg("--library-path")
        .arg(libraries)
        .arg(root.join("usr/sbin/mysqld"))
        .arg("--no-defaults")
        .arg(format!("--basedir={}", root.join("usr").display()))
        .arg(format!(
            "--lc-messages-dir={}",
            root.join("usr/share/mysql").display()
        ));
    command
}

impl PrivateDatabase {
    /// A private server of the kind the tests run on: MariaDB, or MySQL when
    /// `OUTBOX_TEST_SERVER` is `mysql` (`make test-mysql` sets it).
    pub fn new() -> PrivateDatabase {
        let mysql =
            std::env::var("OUTBOX_TEST_SERVER").is_ok_and(|s| s.eq_ignore_ascii_case("mysql"));
        PrivateDatabase::of(if mysql {
            Server::MySql
        } else {
            Server::MariaDb
        })
    }

    /// A private server of `server`'s kind.
    pub fn of(server: Server) -> PrivateDatabase {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("outbox-db"));
        std::fs::create_dir_all(&dir).unwrap();
        let data = format!("--datadir={}", dir.join("data").display());
        // Tried twice: under load a first install has been seen to fail once.
        let install = || match server {
            Server::MariaDb => std::process::Command::new("mariadb-install-db")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .arg(&data)
                .output()
                .expect("mariadb-install-db runs (MariaDB server package)"),
            // root without a password, as on the machine's MariaDB.
            Server::MySql => mysqld()
                .args(["--initialize-insecure", "--user=root"])
                .arg(&data)
                .output()
                .expect("mysqld runs"),
        };
        let mut output = install();
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(dir.join("data"));
            output = install();
        }
        assert!(
            output.status.success(),
            "the {server:?} data directory is installed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PrivateDatabase {
            server,
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
        let mut command = match self.server {
            Server::MariaDb => {
                let mut command = std::process::Command::new("/usr/sbin/mariadbd");
                command.arg("--no-defaults");
                command
            }
            Server::MySql => {
                let mut command = mysqld();
                // No X protocol port, and no directory of its own for LOAD DATA.
                command.args(["--mysqlx=OFF", "--secure-file-priv="]);
                command
            }
        };
        let child = command
            .args(["--user=root", "--bind-address=127.0.0.1"])
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
            .expect("the server starts");
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
