//! Spans of the message paths, for an OpenTelemetry exporter.
//!
//! A publish gets a `publish` span (at `debug`, so that without an
//! exporter the span is never built) from its arrival at the topic's
//! publisher until it is durable. A message that carries a W3C
//! `traceparent` header, however it came (a Kafka header, an AMQP header,
//! an MQTT 5 user property, a WebSocket property), continues that trace:
//! the exporter is told through a hook, so that the broker itself
//! depends on no tracing backend.

use std::sync::OnceLock;

/// The header that carries a W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

static PARENT_HOOK: OnceLock<fn(&tracing::Span, &str)> = OnceLock::new();

/// Installs how a span takes its parent from a `traceparent` value (the
/// binary's OTLP exporter does).
pub fn set_parent_hook(hook: fn(&tracing::Span, &str)) {
    let _ = PARENT_HOOK.set(hook);
}

/// The span of one publish to `topic`, continuing the trace its headers
/// name, if any.
pub fn publish_span(
    topic: &impl std::fmt::Display,
    headers: &[(String, Option<bytes::Bytes>)],
) -> tracing::Span {
    let span = tracing::debug_span!("publish", topic = %topic, otel.kind = "producer");
    if span.is_disabled() {
        return span;
    }
    if let Some(hook) = PARENT_HOOK.get() {
        let parent = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok());
        if let Some(p) = parent {
            hook(&span, p);
        }
    }
    span
}
