//! The roles of a Magnetar deployment put together into processes:
//! standalone, broker, bookie and metadata node, with their command-line
//! settings, TLS and authentication. The `magnetar` binary runs them;
//! `magnetar-perf` embeds a standalone from here for its in-process
//! benches, so the server itself links no client library.

pub mod auth_args;
pub mod bookie;
pub mod broker;
pub mod ops;
pub mod tls;

/// The payload `magnetar-perf ledger` and `magnetar admin ledgers write`
/// give an entry: its id, then bytes that depend on it, so that a
/// read-back can be checked.
pub fn entry_payload(entry: u64, size: usize) -> bytes::Bytes {
    let mut v = Vec::with_capacity(size.max(8));
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend((8..size).map(|i| (entry as usize).wrapping_add(i) as u8));
    bytes::Bytes::from(v)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr, filtered by `MAGNETAR_LOG` (`info` by default); with
/// the `otlp` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, also exports
/// spans (see [`otlp`]).
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAGNETAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    // Without an exporter no layer is added at all, so that `debug` spans
    // stay disabled at their call sites and cost nothing.
    #[cfg(feature = "otlp")]
    if let Some(otlp) = otlp::layer() {
        registry.with(otlp).init();
        return;
    }
    registry.init();
}

/// Sends the spans still buffered for export; call before the process
/// exits.
pub fn flush_tracing() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

/// Spans exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: protobuf, or JSON with
/// `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`. `MAGNETAR_OTLP_FILTER` picks
/// the spans (`magnetar_broker=debug,magnetar_kafka=debug` by default:
/// publishes and Kafka produce requests). A publish whose message carries
/// a W3C `traceparent` continues that trace.
#[cfg(feature = "otlp")]
pub mod otlp {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The exporting layer, or `None` when no endpoint is configured (or
    /// the exporter cannot be built, which is logged to stderr since
    /// tracing is not up yet).
    pub fn layer<S>() -> Option<impl Layer<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        if !configured {
            return None;
        }
        let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
            Ok("http/json") => Protocol::HttpJson,
            _ => Protocol::HttpBinary,
        };
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("OTLP exporter not started: {e}");
                return None;
            }
        };
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "magnetar".into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let tracer = provider.tracer("magnetar");
        let _ = PROVIDER.set(provider);
        magnetar_broker::trace::set_parent_hook(set_parent);
        let filter = tracing_subscriber::EnvFilter::try_from_env("MAGNETAR_OTLP_FILTER")
            .unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("magnetar_broker=debug,magnetar_kafka=debug")
            });
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter),
        )
    }

    fn set_parent(span: &tracing::Span, traceparent: &str) {
        use opentelemetry::propagation::TextMapPropagator;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let carrier = std::collections::HashMap::from([(
            magnetar_broker::trace::TRACEPARENT.to_string(),
            traceparent.to_string(),
        )]);
        let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
    }

    pub fn shutdown() {
        if let Some(p) = PROVIDER.get() {
            let _ = p.shutdown();
        }
    }
}
