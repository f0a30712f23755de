//! Trace context (feature `opentelemetry`): a message added while a span is current is
//! stored with that span's W3C context, by `Outbox::add`, `add_all` and
//! `OutboxTransaction` alike; without a current span nothing is added.
#![cfg(feature = "opentelemetry")]

mod common;

use common::*;
use mysql::prelude::Queryable;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use outbox::{Message, Outbox};

/// The stored headers of the row with `payload`, as JSON (null when it has none).
fn stored_headers(table: &TestTable, payload: &str) -> serde_json::Value {
    let text: String = table
        .conn()
        .query_first(format!(
            "SELECT COALESCE(CAST(headers AS CHAR), 'null') FROM `{}` WHERE payload = '{payload}'",
            table.name
        ))
        .unwrap()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_message_added_in_a_span_carries_its_w3c_context_and_one_added_outside_does_not() {
    let table = TestTable::new("trace_add");
    let outbox = Outbox::new(&table.store);
    table.commit(&[Message::new("t", "outside")]);

    let span = SpanContext::new(
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        SpanId::from(0x00f0_67aa_0ba9_02b7),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _guard = Context::new().with_remote_span_context(span).attach();
    let mut tx = table
        .pool
        .start_transaction(mysql::TxOpts::default())
        .unwrap();
    outbox.add(&mut tx, &Message::new("t", "add")).unwrap();
    outbox
        .add_all(
            &mut tx,
            &[Message::new("t", "add_all").with_header("traceparent", "mine")],
        )
        .unwrap();
    tx.commit().unwrap();
    let mut tx = outbox.start_transaction(mysql::TxOpts::default()).unwrap();
    tx.add(&Message::new("t", "on commit")).unwrap();
    tx.commit().unwrap();

    let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(stored_headers(&table, "outside"), serde_json::Value::Null);
    for payload in ["add", "on commit"] {
        assert_eq!(
            stored_headers(&table, payload),
            serde_json::json!([["traceparent", w3c]]),
            "{payload}"
        );
    }
    assert_eq!(
        stored_headers(&table, "add_all"),
        serde_json::json!([["traceparent", "mine"]]),
        "the caller's header is kept"
    );
}
