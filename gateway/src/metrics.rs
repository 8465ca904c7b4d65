//! Prometheus metrics (`prometheus-client`), served as text exposition at the admin
//! API's `GET /metrics`.
//!
//! Counters and histograms are updated where things happen; gauges that mirror state
//! (spool depth, open sessions) are set when the endpoint is scraped. One set per
//! process: a process runs one gateway.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set with one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    /// The message's status, refusal code or outcome.
    pub status: String,
}

/// A label set naming a sink.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// `kinesis`, `iot-core` or `local`.
    pub sink: String,
}

/// Records leaving the spool, by sink and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOutcome {
    /// The sink.
    pub sink: String,
    /// `delivered` or `dead-lettered`.
    pub outcome: String,
}

/// Every metric.
pub struct Metrics {
    registry: Registry,
    /// Input messages by what happened to them.
    pub messages: Family<Status, Counter>,
    /// Requests and frames refused, by error code.
    pub refused: Family<Status, Counter>,
    /// Records that left the spool, by sink and outcome.
    pub sink_records: Family<SinkOutcome, Counter>,
    /// Windows a sink failed to confirm (retried).
    pub sink_failures: Family<SinkLabel, Counter>,
    /// Seconds from receipt to the sink's confirmation.
    pub delivery_latency: Family<SinkLabel, Histogram>,
    /// Records waiting in the spool, per sink (set at scrape time).
    pub spool_records: Family<SinkLabel, Gauge>,
    /// Bytes waiting in the spool, per sink (set at scrape time).
    pub spool_bytes: Family<SinkLabel, Gauge>,
    /// `fsync`ed spool commits since start (set at scrape time).
    pub spool_fsyncs: Gauge,
    /// Dead letters stored (set at scrape time).
    pub dead_letters: Gauge,
    /// Open WebSocket sessions (set at scrape time).
    pub sessions: Gauge,
    /// The `messages` counters of the four statuses, fetched once: counting a message
    /// on the hot path is then one atomic add.
    by_status: [(&'static str, Counter); 4],
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("sluice");
    let messages = Family::<Status, Counter>::default();
    registry.register(
        "messages",
        "Input messages by status (accepted, dropped, dead-lettered, rejected)",
        messages.clone(),
    );
    let refused = Family::<Status, Counter>::default();
    registry.register(
        "refused",
        "Requests and frames refused, by error code",
        refused.clone(),
    );
    let sink_records = Family::<SinkOutcome, Counter>::default();
    registry.register(
        "sink_records",
        "Records that left the spool, by sink and outcome",
        sink_records.clone(),
    );
    let sink_failures = Family::<SinkLabel, Counter>::default();
    registry.register(
        "sink_failures",
        "Delivery windows a sink did not confirm (sent again)",
        sink_failures.clone(),
    );
    let delivery_latency = Family::<SinkLabel, Histogram>::new_with_constructor(
        latency_histogram as fn() -> Histogram,
    );
    registry.register(
        "delivery_latency_seconds",
        "Seconds from receipt to the sink's confirmation",
        delivery_latency.clone(),
    );
    let spool_records = Family::<SinkLabel, Gauge>::default();
    registry.register(
        "spool_records",
        "Records waiting in the spool",
        spool_records.clone(),
    );
    let spool_bytes = Family::<SinkLabel, Gauge>::default();
    registry.register(
        "spool_bytes",
        "Bytes waiting in the spool",
        spool_bytes.clone(),
    );
    let spool_fsyncs = Gauge::default();
    registry.register(
        "spool_fsyncs",
        "fsync-ed spool commits since start",
        spool_fsyncs.clone(),
    );
    let dead_letters = Gauge::default();
    registry.register("dead_letters", "Dead letters stored", dead_letters.clone());
    let sessions = Gauge::default();
    registry.register(
        "websocket_sessions",
        "Open WebSocket sessions",
        sessions.clone(),
    );
    let by_status = ["accepted", "dropped", "dead-lettered", "rejected"].map(|status| {
        let counter = messages
            .get_or_create(&Status {
                status: status.to_string(),
            })
            .clone();
        (status, counter)
    });
    Metrics {
        registry,
        by_status,
        messages,
        refused,
        sink_records,
        sink_failures,
        delivery_latency,
        spool_records,
        spool_bytes,
        spool_fsyncs,
        dead_letters,
        sessions,
    }
});

impl Metrics {
    /// Counts one input message's status.
    pub fn message(&self, status: &str) {
        match self.by_status.iter().find(|(name, _)| *name == status) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                self.messages
                    .get_or_create(&Status {
                        status: status.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// Counts one refusal.
    pub fn refusal(&self, code: &str) {
        self.refused
            .get_or_create(&Status {
                status: code.to_string(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
