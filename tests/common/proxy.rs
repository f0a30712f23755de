//! A TCP proxy that can stop moving bytes while both of its sockets stay open: a cut
//! link or a host gone dark, as neither end can tell from a closed connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a pump waits for bytes before it looks at the switch again.
const TICK: Duration = Duration::from_millis(20);

/// Forwards every connection made to [`address`](Proxy::address) to the target, until
/// dropped; [`cut`](Proxy::cut) stops every byte both ways, [`mend`](Proxy::mend) lets
/// them through again.
pub struct Proxy {
    address: String,
    cut: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free local port in front of `target` (`host:port`).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (target, switch, done) = (target.to_string(), cut.clone(), closed.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        // A host gone dark answers no new connection either: it waits.
                        while switch.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                            std::thread::sleep(TICK);
                        }
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        for (from, to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let (switch, done) = (switch.clone(), done.clone());
                            std::thread::spawn(move || pump(from, to, &switch, &done));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
                    Err(_) => return,
                }
            }
        });
        Proxy {
            address,
            cut,
            closed,
        }
    }

    /// Where to connect, `127.0.0.1:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops every byte, both ways, on every connection; the sockets stay open.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Lets the bytes through again.
    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Proxy {
    /// Ends every connection and takes no more: their ends see them closed.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

/// Closes a proxy when dropped. Declared after the relays that go through it, it is
/// dropped before them when a test fails, so that they see their connections end
/// instead of waiting on a cut link while they stop.
pub struct CloseOnDrop<'a>(pub &'a Proxy);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Copies `from` to `to` while the link is whole; holds still (reading nothing, so that
/// the sender's buffers fill as over a dead link) while it is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, closed: &AtomicBool) {
    from.set_read_timeout(Some(TICK)).unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    while !closed.load(Ordering::SeqCst) {
        if cut.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
