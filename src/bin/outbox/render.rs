//! How the command prints for people: aligned tables, durations and times as people
//! read them, and nothing of the database URL's password.

use std::time::{Duration, SystemTime};

use outbox::admin::rfc3339;

/// A table printed with its columns aligned: numbers to the right, text to the left.
pub struct Table {
    header: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of these columns; a name ending in `>` is a numeric column (the `>` is
    /// not printed).
    pub fn new(columns: &[&'static str]) -> Table {
        Table {
            header: columns.iter().map(|c| c.trim_end_matches('>')).collect(),
            numeric: columns.iter().map(|c| c.ends_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, a line per row after the header, two spaces between columns.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len().min(widths.len()).saturating_sub(1);
            let mut out = String::new();
            for (i, ((cell, width), numeric)) in
                cells.iter().zip(&widths).zip(&self.numeric).enumerate()
            {
                let width = *width;
                if *numeric {
                    out.push_str(&format!("{cell:>width$}"));
                } else if i == last {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<width$}"));
                }
                if i != last {
                    out.push_str("  ");
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(self.header.clone());
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// A duration as people say it: `850ms`, `4.2s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..=9 => format!("{:.1}s", d.as_secs_f64()),
        10..=59 => format!("{secs}s"),
        60..=3_599 => format!("{}m {}s", secs / 60, secs % 60),
        3_600..=86_399 => format!("{}h {}m", secs / 3_600, secs % 3_600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3_600),
    }
}

/// A time in RFC 3339, UTC, to the second.
pub fn time(at: SystemTime) -> String {
    let text = rfc3339(at);
    match text.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => text,
    }
}

/// Bytes as text when they are printable UTF-8, else as `0x` and hexadecimal.
pub fn bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_string(),
        _ => format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// `text` cut to `max` characters, with `…` where it was cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The secrets a MySQL URL holds: its password (after the user, and as a `password`
/// parameter), as written and percent-decoded.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = userinfo.split_once(':') {
            secrets.push(password.to_string());
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some(("password" | "pass", value)) = pair.split_once('=') {
                secrets.push(value.to_string());
            }
        }
    }
    let decoded: Vec<String> = secrets.iter().map(|s| percent_decoded(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// `text` with every secret replaced by `***`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| {
        text.replace(secret.as_str(), "***")
    })
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_either_place_and_redacted_as_written_and_decoded() {
        let url = "mysql://app:s%40cret@db:3306/orders?password=other&pool_max=3";
        let secrets = url_secrets(url);
        assert!(secrets.contains(&"s%40cret".to_string()));
        assert!(secrets.contains(&"s@cret".to_string()));
        assert!(secrets.contains(&"other".to_string()));
        let line = redact("failed for app:s%40cret (s@cret) other", &secrets);
        assert_eq!(line, "failed for app:*** (***) ***");
        assert!(url_secrets("mysql://root@127.0.0.1:3306/test").is_empty());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        let cases = [
            (Duration::from_millis(850), "850ms"),
            (Duration::from_millis(4_240), "4.2s"),
            (Duration::from_secs(42), "42s"),
            (Duration::from_secs(192), "3m 12s"),
            (Duration::from_secs(7_500), "2h 5m"),
            (Duration::from_secs(273_600), "3d 4h"),
        ];
        for (d, text) in cases {
            assert_eq!(duration(d), text);
        }
    }

    #[test]
    fn tables_align_numbers_right_and_text_left() {
        let mut table = Table::new(&["topic", "pending>", "lag"]);
        table.row(vec!["orders".into(), "7".into(), "2s".into()]);
        table.row(vec!["t".into(), "1200".into(), "-".into()]);
        assert_eq!(
            table.render(),
            "topic   pending  lag\norders        7  2s\nt          1200  -"
        );
    }

    #[test]
    fn bytes_print_as_text_or_hex() {
        assert_eq!(bytes(b"order-42"), "order-42");
        assert_eq!(bytes(&[0, 0xff]), "0x00ff");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
