//! A TCP proxy that can stop moving bytes while both of its sockets stay open: a cut
//! link or a host gone dark, as neither end can tell from a closed connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    trigger: Trigger,
}

/// Bytes that, once sent by a client, cut the link before they go through.
type Trigger = Arc<Mutex<Option<Vec<u8>>>>;

impl Proxy {
    /// A proxy on a free local port in front of `target` (`host:port`).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let trigger = Trigger::default();
        let (target, switch, done) = (target.to_string(), cut.clone(), closed.clone());
        let armed = trigger.clone();
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
                        for (from, to, trigger) in [
                            (
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                Some(armed.clone()),
                            ),
                            (server, client, None),
                        ] {
                            let (switch, done) = (switch.clone(), done.clone());
                            std::thread::spawn(move || {
                                pump(from, to, &switch, &done, trigger.as_ref())
                            });
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
            trigger,
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

    /// Cuts the link as a client sends `bytes` (in one read), before they go through:
    /// `b"\x03COMMIT"` cuts a transaction off before its commit reaches the server.
    pub fn cut_before(&self, bytes: &[u8]) {
        *self.trigger.lock().unwrap() = Some(bytes.to_vec());
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
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
/// the sender's buffers fill as over a dead link) while it is cut. Bytes holding the
/// armed `trigger` cut the link, and go through once it is mended.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: &AtomicBool,
    closed: &AtomicBool,
    trigger: Option<&Trigger>,
) {
    from.set_read_timeout(Some(TICK)).unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut held = Vec::new();
    while !closed.load(Ordering::SeqCst) {
        if cut.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        if !held.is_empty() && to.write_all(&std::mem::take(&mut held)).is_err() {
            break;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(trigger) = trigger {
                    let mut armed = trigger.lock().unwrap();
                    let hit = armed
                        .as_ref()
                        .is_some_and(|bytes| buffer[..n].windows(bytes.len()).any(|w| w == bytes));
                    if hit {
                        *armed = None;
                        cut.store(true, Ordering::SeqCst);
                        held.extend_from_slice(&buffer[..n]);
                        continue;
                    }
                }
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
