//! Trace context (feature `opentelemetry`): a message added while a span is current is
//! stored with that span's W3C context, by `Outbox::add`, `add_all` and
//! `OutboxTransaction` alike, without a current span nothing is added; the relay publishes
//! it in a child span whose context the record carries, and the inbox runs its handler in
//! a child of that.
#![cfg(feature = "opentelemetry")]

mod common;

use std::time::Duration;

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

#[test]
fn one_trace_goes_from_a_span_around_the_add_through_the_publish_span_to_the_handler() {
    use opentelemetry::trace::{Span, SpanKind, Tracer, TracerProvider};
    use opentelemetry::Value;

    let (collected, provider) = common::spans::installed();
    let table = TestTable::new("trace_publish");
    let topic = unique("trace_publish");
    let outbox = Outbox::new(&table.store);

    // The service's span around the add.
    let tracer = provider.tracer("service");
    let request = tracer.start("POST /orders");
    let request_context = request.span_context().clone();
    let cx = Context::current_with_span(request);
    {
        let _guard = cx.clone().attach();
        let mut tx = table
            .pool
            .start_transaction(mysql::TxOpts::default())
            .unwrap();
        outbox
            .add(&mut tx, &Message::new(&topic, "traced").with_key("k"))
            .unwrap();
        tx.commit().unwrap();
    }
    table.commit(&[Message::new(&topic, "untraced")]);
    cx.span().end();

    let handle = table.dispatch(broker(), fast_settings(), "trace-publish");
    let got = consume(
        &topic,
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    drop(handle);
    assert_eq!(got.len(), 2);
    let publish_name = format!("{topic} publish");
    let spans = collected.spans();
    let publishes: Vec<_> = spans.iter().filter(|s| s.name == publish_name).collect();
    assert_eq!(
        publishes.len(),
        2,
        "one publish span per message: {spans:?}"
    );
    let child = publishes
        .iter()
        .find(|s| s.span_context.trace_id() == request_context.trace_id())
        .expect("the traced message's publish span is in the request's trace");
    assert_eq!(child.parent_span_id, request_context.span_id());
    assert_eq!(child.span_kind, SpanKind::Producer);
    let attribute = |name: &str| {
        child
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == name)
            .map(|kv| kv.value.clone())
    };
    assert_eq!(attribute("messaging.system"), Some(Value::from("kafka")));
    assert_eq!(
        attribute("messaging.destination.name"),
        Some(Value::from(topic.clone()))
    );
    let traced = got
        .iter()
        .find(|c| c.payload == b"traced")
        .expect("the traced record");
    assert_eq!(
        attribute("messaging.message.id"),
        Some(Value::from(traced.message_id()))
    );
    assert_eq!(
        attribute("messaging.kafka.message.offset"),
        Some(Value::from(traced.offset))
    );
    assert!(attribute("outbox.wait_seconds").is_some());
    // The record read by a plain Kafka client names the publish span, in W3C form.
    let header = std::str::from_utf8(traced.header("traceparent").expect("a traceparent"))
        .unwrap()
        .to_string();
    assert_eq!(
        header,
        format!(
            "00-{:032x}-{:016x}-01",
            child.span_context.trace_id(),
            child.span_context.span_id()
        )
    );
    // The inbox runs its handler in a span `{topic} process`, a child of the publish
    // span, current while the handler runs.
    use outbox::inbox::{Assignment, Delivery, HandlerError, Inbox, InboxConsumer, InboxSettings};
    let inbox = Inbox::with_table(table.pool.clone(), &unique("trace_inbox")).unwrap();
    inbox.migrate().unwrap();
    type Seen = std::sync::Mutex<Vec<(Vec<u8>, opentelemetry::trace::SpanContext)>>;
    let seen: std::sync::Arc<Seen> = Default::default();
    let publish_span = child.span_context.span_id();
    let handler = {
        let seen = seen.clone();
        move |_: &mut mysql::Transaction<'_>, d: &Delivery| -> Result<(), HandlerError> {
            let current = Context::current().span().span_context().clone();
            eprintln!(
                "DEBUG {:?} {:?} current {:?}",
                String::from_utf8_lossy(d.payload()),
                d.headers()
                    .iter()
                    .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect::<Vec<_>>(),
                current.span_id()
            );
            assert_eq!(
                d.context().span().span_context().span_id(),
                if d.payload() == b"traced" {
                    publish_span
                } else {
                    d.context().span().span_context().span_id()
                }
            );
            seen.lock().unwrap().push((d.payload().to_vec(), current));
            Ok(())
        }
    };
    let mut consumer = InboxConsumer::new(
        inbox,
        &unique("trace_consumer"),
        &brokers(),
        Assignment::Topics(vec![topic.clone()]),
        InboxSettings::default(),
    )
    .unwrap()
    .start(handler)
    .unwrap();
    assert!(wait_for(Duration::from_secs(60), || seen
        .lock()
        .unwrap()
        .len()
        == 2));
    consumer.stop().unwrap();
    let handled = seen
        .lock()
        .unwrap()
        .iter()
        .find(|(payload, _)| payload == b"traced")
        .map(|(_, cx)| cx.clone())
        .unwrap();
    assert_eq!(handled.trace_id(), request_context.trace_id(), "one trace");
    let ended = collected.spans();
    let process = ended
        .iter()
        .find(|s| s.span_context.span_id() == handled.span_id())
        .expect("the handler ran in a span the SDK ended");
    assert_eq!(process.name, format!("{topic} process"));
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(process.parent_span_id, child.span_context.span_id());

    // The message added outside any span is published in a span of a trace of its own.
    let root = publishes.iter().find(|s| {
        s.name == publish_name && s.parent_span_id == opentelemetry::trace::SpanId::INVALID
    });
    assert!(root.is_some(), "{publishes:?}");
    let untraced = got.iter().find(|c| c.payload == b"untraced").unwrap();
    assert!(untraced.header("traceparent").is_some());
}
