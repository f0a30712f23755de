//! A backlog of messages that keep failing (a topic the broker refuses) delays the other
//! messages by a bounded amount, not by its length: every other key flows.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use outbox::{Broker, Error, Message, Record};

/// The real broker, except for one topic it refuses, as a broker refuses a deleted topic
/// or one its ACLs forbid.
struct RefusingTopic {
    inner: outbox::KafkaBroker,
    refused: String,
}

impl Broker for RefusingTopic {
    fn publish(&mut self, records: &[Record]) -> Vec<outbox::Result<()>> {
        let (refused, sent): (Vec<usize>, Vec<usize>) =
            (0..records.len()).partition(|&i| records[i].message.topic() == self.refused);
        let batch: Vec<Record> = sent.iter().map(|&i| records[i].clone()).collect();
        let mut outcomes: Vec<Option<outbox::Result<()>>> =
            (0..records.len()).map(|_| None).collect();
        for (i, outcome) in sent.into_iter().zip(self.inner.publish(&batch)) {
            outcomes[i] = Some(outcome);
        }
        for i in refused {
            outcomes[i] = Some(Err(Error::Broker("topic authorization failed".into())));
        }
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }
}

/// `failing` messages for a refused topic (half without a key, half over 30 keys), then
/// 300 for a healthy one over 30 keys: the healthy ones are all published, each key in
/// order, while the refused ones keep failing and coming back every 50 to 200 ms.
fn healthy_messages_flow_past(failing: usize) {
    let table = TestTable::new("failing_backlog");
    let broken = unique("broken");
    let healthy = unique("healthy");
    let refused: Vec<Message> = (0..failing)
        .map(|i| {
            let message = Message::new(&broken, format!("b{i}"));
            if i % 2 == 0 {
                message
            } else {
                message.with_key(format!("b{}", i % 30))
            }
        })
        .collect();
    for chunk in refused.chunks(2_000) {
        table.commit(chunk);
    }
    let fine: Vec<Message> = (0..300)
        .map(|i| {
            Message::new(&healthy, format!("k{}:{}", i % 30, i / 30 + 1))
                .with_key(format!("k{}", i % 30))
        })
        .collect();
    table.commit(&fine);

    let broker = RefusingTopic {
        inner: broker(),
        refused: broken.clone(),
    };
    let handle = table.dispatch(broker, fast_settings(), "failing-backlog");
    let delivered = wait_for(Duration::from_secs(30), || table.count("state = 1") == 300);
    assert!(
        delivered,
        "every healthy message is published behind {failing} failing ones: {} of 300",
        table.count("state = 1")
    );
    let got = consume(&healthy, 300, Duration::from_secs(10), Duration::ZERO);
    let read = versions_read(&got);
    let finals: HashMap<String, u32> = (0..30).map(|k| (format!("k{k}"), 10)).collect();
    assert_commit_order(&read, &finals, false);
    assert!(
        table.count("state = 0 AND number_of_attempts > 0") > 0,
        "the refused ones were tried, and are still pending"
    );
    assert_eq!(
        table.count("state = 0"),
        failing as u64,
        "none of them lost"
    );
    drop(handle);
}

#[test]
fn three_thousand_failing_messages_do_not_stall_three_hundred_healthy_ones() {
    healthy_messages_flow_past(3_000);
}

#[test]
fn twenty_thousand_failing_messages_do_not_stall_them_either() {
    healthy_messages_flow_past(20_000);
}
