//! Messages published compressed (gzip, zstd, lz4, snappy) come out of the broker byte for
//! byte: the default build carries every codec production clusters use.

mod common;

use std::time::Duration;

use common::*;
use outbox::{KafkaBroker, Message};

#[test]
fn every_codec_round_trips() {
    for codec in ["gzip", "zstd", "lz4", "snappy"] {
        let table = TestTable::new("compression");
        let topic = unique(codec);
        // Compressible, and not: both must come back as they went.
        let payloads: Vec<Vec<u8>> = vec![
            format!("{codec} ").repeat(2_000).into_bytes(),
            (0..5_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ];
        let messages: Vec<Message> = payloads
            .iter()
            .map(|p| Message::new(&topic, p.clone()).with_key("k"))
            .collect();
        table.commit(&messages);
        let mut properties = test_properties();
        properties.push(("compression.type".into(), codec.into()));
        let broker = KafkaBroker::with_properties(&brokers(), properties)
            .unwrap_or_else(|e| panic!("{codec} is built in: {e}"));
        let handle = table.dispatch(broker, fast_settings(), codec);
        assert!(
            wait_for(Duration::from_secs(20), || table.count("state = 1") == 2),
            "{codec}: published"
        );
        drop(handle);
        let got = consume(&topic, 2, Duration::from_secs(10), Duration::ZERO);
        let read: Vec<Vec<u8>> = got.into_iter().map(|r| r.payload).collect();
        assert_eq!(read, payloads, "{codec}: byte for byte, in order");
    }
}
