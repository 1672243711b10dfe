//! Prometheus exposition for every Magnetar process (broker, metadata
//! node, bookie; standalone serves all three on one port).
//!
//! Metrics live in `prometheus-client` registries: typed label sets keep
//! cardinality reviewable, and values read from live state at scrape time
//! need no bookkeeping when a topic unloads. [`render`] encodes one or
//! more registries in the format the scraper asked for, with the
//! `Content-Type` Prometheus 3 requires; [`ProcessCollector`] adds the
//! `process_*` families from `/proc`.

mod process;

pub use process::ProcessCollector;
pub use prometheus_client;

use prometheus_client::encoding::{
    prometheus_text, text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The OpenMetrics `Content-Type`, served when the scraper accepts it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus text format's, served otherwise.
pub const PROMETHEUS_TEXT: &str = prometheus_text::CONTENT_TYPE;

/// Edges of every latency histogram, in seconds: Pulsar's
/// `storage_write_latency` buckets (0.5 ms to 1 s), so that its
/// dashboards' thresholds keep their meaning.
pub const LATENCY_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Whether an `Accept` header asks for OpenMetrics (as Prometheus does
/// by default) rather than the plain text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// A scrape's answer: its `Content-Type` and body.
#[derive(Debug)]
pub struct Exposition {
    pub content_type: &'static str,
    pub body: String,
}

/// Encodes `registries` one after the other, as OpenMetrics (closed by
/// its `# EOF`) or as Prometheus text. A family name must live in one
/// registry only: the formats allow one `# TYPE` line per name.
pub fn render(registries: &[&Registry], openmetrics: bool) -> Result<Exposition, MetricsError> {
    let mut body = String::with_capacity(16 << 10);
    if openmetrics {
        for r in registries {
            text::encode_registry(&mut body, r)?;
        }
        text::encode_eof(&mut body)?;
    } else {
        for r in registries {
            prometheus_text::encode(&mut body, r)?;
        }
    }
    Ok(Exposition {
        content_type: if openmetrics {
            OPENMETRICS
        } else {
            PROMETHEUS_TEXT
        },
        body,
    })
}

/// Encodes `(name, help, value)` gauges read at scrape time, for a
/// collector.
pub fn encode_gauges<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    gauges: impl IntoIterator<Item = (&'static str, &'static str, N)>,
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in gauges {
        let g = ConstGauge::new(v);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
    }
    Ok(())
}

/// Encodes `(name, help, value)` counters read at scrape time (the
/// encoder adds `_total`), for a collector.
pub fn encode_counters<N: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    counters: impl IntoIterator<Item = (&'static str, &'static str, N)>,
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in counters {
        let c = ConstCounter::new(v);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    fn registries() -> (Registry, Registry) {
        let mut a = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(3);
        a.register("pulsar_in_messages", "Messages accepted", c);
        let mut b = Registry::default();
        let g: Gauge = Gauge::default();
        g.set(2);
        b.register("bookie_SERVER_STATUS", "1 writable, 0 read-only", g);
        (a, b)
    }

    #[test]
    fn openmetrics_is_served_to_scrapers_that_accept_it() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn several_registries_make_one_openmetrics_document() {
        let (a, b) = registries();
        let e = render(&[&a, &b], true).expect("encodes");
        assert_eq!(e.content_type, OPENMETRICS);
        assert!(
            e.body.contains("pulsar_in_messages_total 3\n"),
            "{}",
            e.body
        );
        assert!(e.body.contains("bookie_SERVER_STATUS 2\n"), "{}", e.body);
        assert!(e.body.ends_with("# EOF\n"), "{}", e.body);
        assert_eq!(e.body.matches("# EOF").count(), 1);
    }

    #[test]
    fn the_text_format_has_no_eof_and_its_own_content_type() {
        let (a, b) = registries();
        let e = render(&[&a, &b], false).expect("encodes");
        assert_eq!(e.content_type, PROMETHEUS_TEXT);
        assert!(e.content_type.contains("version=0.0.4"));
        assert!(!e.body.contains("# EOF"));
        assert!(
            e.body.contains("# TYPE pulsar_in_messages_total counter"),
            "{}",
            e.body
        );
    }
}
