//! Trace context through the binlog relay (feature `opentelemetry`): a message added in a
//! span is published in a child span `{topic} publish`, whose context the record carries.

use super::*;
use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer, TracerProvider};

fn the_binlog_relay_publishes_a_traced_message_in_a_child_span(server: Server) {
    let (collected, provider) = common::spans::installed();
    let f = fixture(server, "binlog_trace");
    let (url, pool, store, table, topic) = f.parts();
    let mut relay = start_relay(url, table, "binlog-trace").unwrap();
    wait_until_following(pool, table);

    let request = provider.tracer("service").start("POST /orders");
    let request_context = request.span_context().clone();
    let cx = opentelemetry::Context::current_with_span(request);
    {
        let _guard = cx.clone().attach();
        commit(
            pool,
            store,
            &[outbox::Message::new(topic, "traced").with_key("k")],
        );
    }
    cx.span().end();
    assert!(delivered(pool, table, 1));
    let got = consume(
        topic,
        1,
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    relay.stop().unwrap();

    let name = format!("{topic} publish");
    let spans = collected.spans();
    let publish = spans
        .iter()
        .find(|s| s.name == name)
        .expect("a publish span");
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(publish.span_context.trace_id(), request_context.trace_id());
    assert_eq!(publish.parent_span_id, request_context.span_id());
    let header = got[0].header("traceparent").expect("a traceparent");
    assert_eq!(
        std::str::from_utf8(header).unwrap(),
        format!(
            "00-{:032x}-{:016x}-01",
            publish.span_context.trace_id(),
            publish.span_context.span_id()
        )
    );
}

on_both_servers!(the_binlog_relay_publishes_a_traced_message_in_a_child_span);
