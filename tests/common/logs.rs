//! What a child process logs, read as it comes, for tests that wait on a log line.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The lines a child wrote to a stream, gathered by a thread of their own and echoed to
/// the test's standard error, so that a failing test shows them.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Logs {
    /// Starts reading `stream` (a child's piped standard error, say) to its end.
    pub fn capture(stream: impl Read + Send + 'static, label: &str) -> Logs {
        let logs = Logs::default();
        let (kept, label) = (logs.clone(), label.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                let (lines, arrived) = &*kept.lines;
                lines.lock().unwrap().push(line);
                arrived.notify_all();
            }
        });
        logs
    }

    /// The first line, so far or within `timeout`, that holds `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lines, arrived) = &*self.lines;
        let mut seen = lines.lock().unwrap();
        loop {
            if let Some(line) = seen.iter().find(|l| l.contains(text)) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            seen = arrived.wait_timeout(seen, left).unwrap().0;
        }
    }

    /// Every line so far that holds `text`.
    pub fn matching(&self, text: &str) -> Vec<String> {
        let lines = self.lines.0.lock().unwrap();
        lines.iter().filter(|l| l.contains(text)).cloned().collect()
    }
}
