//! The producer's properties: the crate's defaults, the user's under librdkafka's
//! canonical names, and the checks that keep the outbox's guarantees.

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::time::Duration;

use crate::error::{Error, Result};

/// `message.timeout.ms` when not set: how long librdkafka tries a message.
const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// librdkafka's default `request.timeout.ms`.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// librdkafka's aliases, and the name each stands for. Properties are set under the
/// second name only, so that two names of one property cannot both be set and leave
/// librdkafka's choice between them to the order of a map.
const ALIASES: [(&str, &str); 10] = [
    ("bootstrap.servers", "metadata.broker.list"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanism", "sasl.mechanisms"),
    (
        "sasl.oauthbearer.client.credentials.client.id",
        "sasl.oauthbearer.client.id",
    ),
    (
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.client.secret",
    ),
    ("linger.ms", "queue.buffering.max.ms"),
    ("retries", "message.send.max.retries"),
    ("compression.type", "compression.codec"),
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
];

/// The property that lets a user weaken the crate's delivery guarantees on purpose:
/// `acks` other than `all`, idempotence off, or a `random` partitioner. It is the
/// crate's, and never reaches librdkafka.
pub const ALLOW_WEAK_DELIVERY: &str = "outbox.allow.weak.delivery";

/// The property that makes a [`KafkaBroker`](super::KafkaBroker) send one message of a key at a time, each
/// after the one before it was acknowledged: a key's order then holds on brokers that do
/// not enforce the idempotent producer's sequence numbers. It is the crate's, and never
/// reaches librdkafka. Defaults to `false`.
pub const STRICT_KEY_ORDER: &str = "outbox.strict.key.order";

/// The property that says what a record's timestamp is: `created` (the default), the time
/// its message was added, from its row's `created_on` by the database's clock; or
/// `publish`, the relay host's clock when it is published. It is the crate's, and never
/// reaches librdkafka.
pub const RECORD_TIMESTAMP: &str = "outbox.record.timestamp";

/// What a record's timestamp is; see [`RECORD_TIMESTAMP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordTimestamp {
    /// When its message was added.
    Created,
    /// When it is published.
    Publish,
}

/// What replaces a secret's value wherever the crate would print it.
pub(crate) const REDACTED: &str = "[redacted]";

/// Whether the property `name` holds a secret, by its name: passwords, keys and
/// certificates in PEM, anything called secret, OAuth settings, JAAS configurations.
pub(crate) fn is_secret(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    name.ends_with("password")
        || name.ends_with(".pem")
        || name.contains("secret")
        || name.starts_with("sasl.oauthbearer.")
        || name == "sasl.jaas.config"
}

/// The value of the property `name`, if it is a secret: what to blot out of librdkafka's
/// words.
pub(crate) fn secret_values(name: &str, value: &str) -> Option<String> {
    (is_secret(name) && !value.is_empty()).then(|| value.to_string())
}

/// The properties a [`KafkaBroker`](super::KafkaBroker) is made with. Their `Debug`
/// shows secret values as [`REDACTED`].
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Properties {
    /// What librdkafka is given, each under its canonical name.
    pub librdkafka: BTreeMap<String, String>,
    /// [`STRICT_KEY_ORDER`].
    pub strict_key_order: bool,
    /// [`RECORD_TIMESTAMP`].
    pub timestamps: RecordTimestamp,
    /// `message.timeout.ms` + `request.timeout.ms`: the longest a publish waits.
    pub delivery_timeout: Duration,
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(name, value)| {
                let value = if is_secret(name) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (name.as_str(), value)
            })
            .collect();
        f.debug_struct("Properties")
            .field("librdkafka", &shown)
            .field("strict_key_order", &self.strict_key_order)
            .field("timestamps", &self.timestamps)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish()
    }
}

impl Properties {
    /// The values of the secret properties, to blot out of whatever librdkafka says.
    pub fn secrets(&self) -> Vec<String> {
        self.librdkafka
            .iter()
            .filter_map(|(name, value)| secret_values(name, value))
            .collect()
    }

    /// The crate's defaults, then `properties`, resolved and checked.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a server list of which nothing resolves, a property given
    /// two values under two names, a timeout that is not a number or never ends, and
    /// settings that weaken the guarantees without [`ALLOW_WEAK_DELIVERY`].
    pub fn resolve<K, V>(
        bootstrap_servers: &str,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Properties>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let (properties, strict_key_order, timestamps) = resolve(bootstrap_servers, properties)?;
        let servers = properties
            .get("metadata.broker.list")
            .cloned()
            .unwrap_or_default();
        if !servers.split(',').any(resolves) {
            return Err(Error::config(format!(
                "none of the Kafka bootstrap servers {servers:?} resolves to an address"
            )));
        }
        let millis = |name: &str, default: Duration| -> Result<Duration> {
            match properties.get(name) {
                None => Ok(default),
                Some(value) => value
                    .trim()
                    .parse()
                    .map(Duration::from_millis)
                    .map_err(|_| {
                        Error::config(format!(
                            "{name}={value:?} is not a whole number of milliseconds"
                        ))
                    }),
            }
        };
        let message_timeout = millis("message.timeout.ms", DEFAULT_MESSAGE_TIMEOUT)?;
        if message_timeout.is_zero() {
            return Err(Error::config(
                "message.timeout.ms (delivery.timeout.ms) = 0 would let a message be tried \
                 forever: the relay needs every publish to end, so that a lease can outlast it",
            ));
        }
        let delivery_timeout =
            message_timeout.saturating_add(millis("request.timeout.ms", DEFAULT_REQUEST_TIMEOUT)?);
        Ok(Properties {
            librdkafka: properties,
            strict_key_order,
            timestamps,
            delivery_timeout,
        })
    }
}

/// The producer's properties: the crate's defaults, then the user's, every one under its
/// canonical name, checked against the guarantees.
fn resolve<K, V>(
    bootstrap_servers: &str,
    properties: impl IntoIterator<Item = (K, V)>,
) -> Result<(BTreeMap<String, String>, bool, RecordTimestamp)>
where
    K: Into<String>,
    V: Into<String>,
{
    let canonical = |name: &str| -> String {
        let name = name.trim();
        ALIASES
            .iter()
            .find(|(alias, _)| *alias == name)
            .map_or(name, |(_, canonical)| canonical)
            .to_string()
    };
    let mut resolved = BTreeMap::new();
    for (name, value) in [
        ("metadata.broker.list", bootstrap_servers),
        ("request.required.acks", "all"),
        ("enable.idempotence", "true"),
        ("partitioner", "murmur2_random"),
        ("message.timeout.ms", "30000"),
        // Room for the largest message `Message::validate` accepts plus its overhead.
        ("message.max.bytes", "1048576"),
        // A batch is handed over whole and then awaited: waiting for more adds only delay.
        ("queue.buffering.max.ms", "0"),
        // A refusal that would leave a gap in a partition stops the producer: the
        // messages behind it are purged unsent, and the producer is replaced.
        ("enable.gapless.guarantee", "true"),
    ] {
        resolved.insert(name.to_string(), value.to_string());
    }
    let mut given: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, value) in properties {
        let (name, value): (String, String) = (name.into(), value.into());
        let key = canonical(&name);
        if let Some((first, earlier)) = given.get(&key) {
            if *earlier != value && *first != name {
                return Err(Error::config(format!(
                    "{first} and {name} are one librdkafka property ({key}), given two values"
                )));
            }
        }
        given.insert(key, (name, value));
    }
    let weak = given
        .remove(ALLOW_WEAK_DELIVERY)
        .is_some_and(|(_, value)| value.trim() == "true");
    let strict = given
        .remove(STRICT_KEY_ORDER)
        .is_some_and(|(_, value)| value.trim() == "true");
    let timestamps = match given.remove(RECORD_TIMESTAMP) {
        None => RecordTimestamp::Created,
        Some((_, value)) => match value.trim() {
            "created" => RecordTimestamp::Created,
            "publish" => RecordTimestamp::Publish,
            other => {
                return Err(Error::config(format!(
                    "{RECORD_TIMESTAMP}={other:?}: it is `created` or `publish`"
                )))
            }
        },
    };
    let gapless_given = given.contains_key("enable.gapless.guarantee");
    for (key, (_, value)) in given {
        resolved.insert(key, value);
    }
    let idempotent = resolved
        .get("enable.idempotence")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !idempotent && !gapless_given {
        // librdkafka allows the gapless guarantee only with idempotence.
        resolved.remove("enable.gapless.guarantee");
    }
    if !weak {
        let setting = |name: &str| resolved.get(name).map(|v| v.trim().to_ascii_lowercase());
        let mut weakened = Vec::new();
        if !matches!(
            setting("request.required.acks").as_deref(),
            Some("all" | "-1")
        ) {
            weakened.push("acks other than all can lose acknowledged messages");
        }
        if setting("enable.idempotence").as_deref() != Some("true") {
            weakened
                .push("without idempotence, retries can reorder and duplicate a key's messages");
        }
        if setting("partitioner").as_deref() == Some("random") {
            weakened
                .push("the random partitioner scatters a key over partitions, losing its order");
        }
        if !weakened.is_empty() {
            return Err(Error::config(format!(
                "{}; set {ALLOW_WEAK_DELIVERY}=true to accept that",
                weakened.join("; ")
            )));
        }
    }
    Ok((resolved, strict, timestamps))
}

/// Reads Kafka client properties written as Java's `.properties` files are (Kafka's
/// `client.properties`): `name=value`, `name: value` or `name value` per line; `#` and `!`
/// start comments; a line ending in a backslash goes on on the next; `\t`, `\n`, `\r`,
/// `\f`, `\uXXXX` and `\` before any other character are escapes.
///
/// # Errors
///
/// [`Error::Config`] naming the line of a malformed `\u` escape (never its text, which may
/// be a secret's).
pub(crate) fn parse_java_properties(text: &str) -> Result<Vec<(String, String)>> {
    let mut properties = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        let mut logical = line.trim_start().to_string();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        // A line ending in an odd number of backslashes continues on the next one.
        while logical.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1 {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let (name, value) = split_property(&logical);
        let unescaped = |part: &str| {
            unescape(part).ok_or_else(|| {
                Error::config(format!("line {}: a malformed \\u escape", number + 1))
            })
        };
        properties.push((unescaped(name)?, unescaped(value)?));
    }
    Ok(properties)
}

/// A logical line's name and value, both still escaped: the name ends at the first
/// unescaped `=`, `:` or white space, and one `=` or `:` (with white space around it)
/// separates it from the value.
fn split_property(line: &str) -> (&str, &str) {
    let mut escaped = false;
    let end = line
        .char_indices()
        .find(|&(_, c)| {
            let ends = !escaped && (c == '=' || c == ':' || c.is_whitespace());
            escaped = !escaped && c == '\\';
            ends
        })
        .map_or(line.len(), |(i, _)| i);
    let (name, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix('=')
        .or_else(|| rest.strip_prefix(':'))
        .unwrap_or(rest);
    (name, rest.trim_start())
}

/// `text` with its escapes resolved; `None` for a malformed `\u`.
fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 4)?;
                out.push(char::from_u32(code)?);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Some(out)
}

/// True when a bootstrap server (`[protocol://]host[:port]`) resolves to an address.
pub(crate) fn resolves(server: &str) -> bool {
    let server = server.trim();
    let address = server.split_once("://").map_or(server, |(_, rest)| rest);
    if address.is_empty() {
        return false;
    }
    let with_port = if address
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        address.to_string()
    } else {
        format!("{address}:9092")
    };
    with_port
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: [(&str, &str); 0] = [];

    fn refused(properties: &[(&str, &str)]) -> String {
        match Properties::resolve("127.0.0.1:9", properties.iter().copied()) {
            Err(Error::Config(reason)) => reason,
            other => panic!("{properties:?} should be refused, got {other:?}"),
        }
    }

    fn property(properties: &Properties, name: &str) -> Option<String> {
        properties.librdkafka.get(name).cloned()
    }

    #[test]
    fn aliases_are_resolved_before_the_delivery_timeout_is_computed() {
        let resolved = Properties::resolve(
            "127.0.0.1:9",
            [
                ("delivery.timeout.ms", "1500"),
                ("request.timeout.ms", "700"),
            ],
        )
        .unwrap();
        assert_eq!(resolved.delivery_timeout, Duration::from_millis(2200));
        assert_eq!(
            property(&resolved, "message.timeout.ms").as_deref(),
            Some("1500")
        );
        assert_eq!(property(&resolved, "delivery.timeout.ms"), None);

        let resolved =
            Properties::resolve("127.0.0.1:9", [("linger.ms", "5"), ("acks", "-1")]).unwrap();
        assert_eq!(
            property(&resolved, "queue.buffering.max.ms").as_deref(),
            Some("5")
        );
        assert_eq!(
            property(&resolved, "linger.ms"),
            None,
            "one name per property"
        );
        assert_eq!(
            property(&resolved, "request.required.acks").as_deref(),
            Some("-1")
        );
        assert!(
            refused(&[("linger.ms", "5"), ("queue.buffering.max.ms", "10")]).contains("two values")
        );
    }

    #[test]
    fn java_properties_files_are_read_as_kafka_clients_write_them() {
        let text = "# Kafka client settings\n\
            ! another comment\n\
            \n\
            bootstrap.servers=kafka-1:9092,kafka-2:9092\n\
            security.protocol = SASL_SSL\n\
            sasl.mechanism: SCRAM-SHA-512\n\
            debug broker,topic\n\
            sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \\\n\
            \x20   required username=\"u\" password=\"p=\\\\w\";\n\
            key\\=with\\:odd\\ name=v\\u00e9\\t\n\
            empty=\n";
        let properties = parse_java_properties(text).unwrap();
        let expected = [
            ("bootstrap.servers", "kafka-1:9092,kafka-2:9092"),
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("debug", "broker,topic"),
            (
                "sasl.jaas.config",
                "org.apache.kafka.common.security.scram.ScramLoginModule required \
                 username=\"u\" password=\"p=\\w\";",
            ),
            ("key=with:odd name", "v\u{e9}\t"),
            ("empty", ""),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(properties, expected);
        let bad = parse_java_properties("a=1\nsasl.password=s3cret\\u12").unwrap_err();
        assert!(bad.to_string().contains("line 2"), "{bad}");
        assert!(!bad.to_string().contains("s3cret"), "{bad}");
    }

    #[test]
    fn secrets_are_known_by_their_names_and_hidden_from_debug() {
        for secret in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.jaas.config",
        ] {
            assert!(is_secret(secret), "{secret}");
        }
        for plain in [
            "sasl.username",
            "security.protocol",
            "ssl.ca.location",
            "acks",
        ] {
            assert!(!is_secret(plain), "{plain}");
        }
        let resolved = Properties::resolve(
            "127.0.0.1:9",
            [("sasl.username", "alice"), ("sasl.password", "hunter2")],
        )
        .unwrap();
        let shown = format!("{resolved:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(resolved.secrets(), vec!["hunter2".to_string()]);
    }

    #[test]
    fn record_timestamps_are_the_adds_unless_told_otherwise() {
        let resolve = |properties: &[(&str, &str)]| {
            Properties::resolve("127.0.0.1:9", properties.iter().copied()).map(|p| p.timestamps)
        };
        assert_eq!(resolve(&[]).unwrap(), RecordTimestamp::Created);
        assert_eq!(
            resolve(&[(RECORD_TIMESTAMP, "publish")]).unwrap(),
            RecordTimestamp::Publish
        );
        assert!(refused(&[(RECORD_TIMESTAMP, "now")]).contains("created"));
        let kept = Properties::resolve("127.0.0.1:9", [(RECORD_TIMESTAMP, "created")]).unwrap();
        assert_eq!(property(&kept, RECORD_TIMESTAMP), None, "the crate's own");
    }

    #[test]
    fn settings_that_break_the_guarantees_need_an_explicit_opt_out() {
        for (name, value) in [
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("enable.idempotence", "false"),
            ("partitioner", "random"),
        ] {
            assert!(
                refused(&[(name, value)]).contains(ALLOW_WEAK_DELIVERY),
                "{name}"
            );
            // librdkafka itself wants idempotence off for acks other than all.
            let resolved = Properties::resolve(
                "127.0.0.1:9",
                [
                    (name, value),
                    ("enable.idempotence", "false"),
                    (ALLOW_WEAK_DELIVERY, "true"),
                ],
            )
            .unwrap();
            assert_eq!(
                property(&resolved, ALLOW_WEAK_DELIVERY),
                None,
                "the crate's own"
            );
        }
        for never in [("message.timeout.ms", "0"), ("delivery.timeout.ms", "0")] {
            assert!(refused(&[never, (ALLOW_WEAK_DELIVERY, "true")]).contains("forever"));
        }
        assert!(refused(&[("request.timeout.ms", "soon")]).contains("milliseconds"));
    }

    #[test]
    fn addresses_that_do_not_resolve_are_refused() {
        for servers in [
            "",
            " , ",
            "no-such-host.invalid:9092",
            "PLAINTEXT://no-such-host.invalid",
        ] {
            assert!(
                matches!(Properties::resolve(servers, NONE), Err(Error::Config(_))),
                "{servers:?}"
            );
        }
        for servers in [
            "127.0.0.1:9",
            "localhost",
            "PLAINTEXT://127.0.0.1:9092",
            "no-such-host.invalid:1,127.0.0.1:9",
        ] {
            assert!(Properties::resolve(servers, NONE).is_ok(), "{servers:?}");
        }
    }
}
