//! A record as the inbox hands it to a handler, and the message id it is known by.

use rdkafka::message::Headers;
use uuid::Uuid;

use crate::message::MESSAGE_ID_HEADER;

/// The namespace of the name-based ids (UUIDv5) given to records without a usable
/// [`MESSAGE_ID_HEADER`]: the name is `topic/partition/offset`.
pub const FALLBACK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f75_7462_6f78_4a00_8000_6b61_666b_6100);

/// One Kafka record received by an inbox consumer: what the handler reads.
///
/// Its [`message_id`](Delivery::message_id) is the outbox's
/// [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER); a record without that header (or with
/// one that is not a UUID) is known by its place instead, a UUIDv5 of
/// `topic/partition/offset`: a redelivery of the same record is then recognised, but the
/// same message published twice is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp: Option<i64>,
    message_id: Uuid,
    from_header: bool,
}

impl Delivery {
    /// The delivery of a record read with any rdkafka consumer, for applications that
    /// run their own loop and call [`Inbox::record`](super::Inbox::record) themselves.
    pub fn from_kafka(record: &impl rdkafka::Message) -> Delivery {
        let headers: Vec<(String, Vec<u8>)> = record
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Delivery::new(
            record.topic(),
            record.partition(),
            record.offset(),
            record.key().map(<[u8]>::to_vec),
            record.payload().unwrap_or_default().to_vec(),
            headers,
            record.timestamp().to_millis(),
        )
    }

    /// A delivery made of its parts; its message id is taken from `headers` as
    /// [`from_kafka`](Delivery::from_kafka) takes it.
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
        timestamp: Option<i64>,
    ) -> Delivery {
        let header_id = headers
            .iter()
            .rev()
            .find(|(name, _)| name == MESSAGE_ID_HEADER)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
            .and_then(|text| Uuid::try_parse(text.trim()).ok());
        let (message_id, from_header) = match header_id {
            Some(id) => (id, true),
            None => (fallback_id(topic, partition, offset), false),
        };
        Delivery {
            topic: topic.to_string(),
            partition,
            offset,
            key,
            payload,
            headers,
            timestamp,
            message_id,
            from_header,
        }
    }

    /// The topic it was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition it was read from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset in that partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Its key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// Its payload (empty for a record without one).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Its headers, in order, as received (the message id header included).
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The value of the last header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_slice())
    }

    /// Its timestamp in milliseconds since the Unix epoch, if it has one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }

    /// The id the inbox knows it by: the outbox's message id, or for a record without
    /// one, the name-based id of its place (see [`Delivery`]).
    pub fn message_id(&self) -> Uuid {
        self.message_id
    }

    /// Whether [`message_id`](Delivery::message_id) came from the
    /// [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER) (true) or from the record's place.
    pub fn has_message_id_header(&self) -> bool {
        self.from_header
    }
}

/// The id of the record at `topic`/`partition`/`offset`: a UUIDv5 (SHA-1, name-based) in
/// [`FALLBACK_ID_NAMESPACE`], never equal to an outbox's UUIDv7.
pub(crate) fn fallback_id(topic: &str, partition: i32, offset: i64) -> Uuid {
    use sha1::Digest;
    let mut hash = sha1::Sha1::new();
    hash.update(FALLBACK_ID_NAMESPACE.as_bytes());
    hash.update(format!("{topic}/{partition}/{offset}").as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(headers: Vec<(&str, &str)>) -> Delivery {
        let headers = headers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        Delivery::new("orders", 2, 41, None, b"p".to_vec(), headers, None)
    }

    #[test]
    fn the_message_id_comes_from_its_header() {
        let id = Uuid::now_v7();
        let delivery = with_headers(vec![("a", "b"), (MESSAGE_ID_HEADER, &id.to_string())]);
        assert_eq!(delivery.message_id(), id);
        assert!(delivery.has_message_id_header());
        assert_eq!(delivery.header("a"), Some(&b"b"[..]));
    }

    #[test]
    fn without_a_usable_header_the_id_is_the_records_place() {
        let none = with_headers(vec![]);
        let garbled = with_headers(vec![(MESSAGE_ID_HEADER, "not-a-uuid")]);
        assert!(!none.has_message_id_header());
        assert_eq!(none.message_id(), garbled.message_id());
        assert_eq!(none.message_id().get_version_num(), 5);
        assert_eq!(none.message_id(), fallback_id("orders", 2, 41));
        assert_ne!(none.message_id(), fallback_id("orders", 2, 42));
        assert_ne!(none.message_id(), fallback_id("orders", 3, 41));
        assert_ne!(none.message_id(), fallback_id("orders2", 2, 41));
    }

    #[test]
    fn the_fallback_id_is_a_standard_uuid_v5() {
        // The same name in the same namespace gives the same id everywhere: this is the
        // UUIDv5 of "t/0/0" in FALLBACK_ID_NAMESPACE, computed by Python's uuid.uuid5.
        assert_eq!(
            fallback_id("t", 0, 0).to_string(),
            "5b5e38f5-88f3-567b-b0ae-5c43c25a17fe",
        );
    }
}
