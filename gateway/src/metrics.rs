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

/// A label set naming a plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    /// The configured plugin name.
    pub plugin: String,
}

/// Messages out of a plugin call, by plugin and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginOutcome {
    /// The plugin.
    pub plugin: String,
    /// `passed`, `split`, `dropped`, `routed`, or a failure code (`plugin_refused`,
    /// `plugin_trap`, `plugin_timeout`, …).
    pub outcome: String,
}

/// A counter a plugin keeps through `counter-add`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginCounter {
    /// The plugin.
    pub plugin: String,
    /// The counter's name, as the plugin gave it.
    pub counter: String,
}

/// Messages by the route that decided where they went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The deciding rule: `rule:NAME`, `builtin:…`, `plugin:NAME`, `failure:CODE`.
    pub route: String,
    /// `kinesis`, `iot-core`, `local`, `dead-letter` or `drop`.
    pub destination: String,
}

/// A label set naming a device listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `http` (the device listener) or, for later listeners, their name.
    pub listener: String,
}

/// Connections a listener closed, by listener and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionEnd {
    /// The listener.
    pub listener: String,
    /// `refused_full`, `handshake_timeout` or `idle_timeout`.
    pub reason: String,
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
    /// Bytes of dead letters stored (set at scrape time).
    pub dead_letter_bytes: Gauge,
    /// Messages not kept as dead letters, by why: `store_full` (the store was at
    /// `spool.max_dead_letter_bytes`) or `expired_dropped` (`spool.expired = "drop"`).
    pub dead_letters_refused: Family<Status, Counter>,
    /// Damaged spool entries skipped when the spool was read at start.
    pub spool_damaged_entries: Counter,
    /// `fdatasync`s of the local sink's files (one per file per group of windows).
    pub local_sink_syncs: Counter,
    /// Open device connections, per listener.
    pub connections: Family<ListenerLabel, Gauge>,
    /// Connections the gateway closed or refused, by listener and reason.
    pub connections_closed: Family<ConnectionEnd, Counter>,
    /// Open WebSocket sessions (set at scrape time).
    pub sessions: Gauge,
    /// Seconds since the registry snapshot was read from the IoT control plane.
    pub registry_age: Gauge,
    /// MQTT publishes by outcome: `accepted`, or the reason code they were refused with.
    pub mqtt_publishes: Family<Status, Counter>,
    /// Events of the devices' own sessions at IoT Core (`[upstream]`): `connected`,
    /// `connect_failed`, `refused`, `taken_over`, `lost`, `session_gone` (IoT Core no
    /// longer had a session its device was told went on), `subscribe_refused` (a command
    /// topic), `relayed` (a message sent to its device), `too_large` (over the device's
    /// Maximum Packet Size), `denied` (the policy no longer allows the device to receive
    /// it), `dropped_qos0` (the device far behind), `telemetry` (a record delivered
    /// through its device's session), `telemetry_elsewhere` (one that session could not
    /// take, delivered through the sink's connection).
    pub upstream: Family<Status, Counter>,
    /// Seconds from reading a batch of MQTT publishes to writing their PUBACKs.
    pub mqtt_puback_seconds: Histogram,
    /// Message parts routed, by route and destination.
    pub routes: Family<RouteLabel, Counter>,
    /// Records per delivery window taken from the spool, per sink.
    pub sink_window_records: Family<SinkLabel, Histogram>,
    /// Records per call to the sink's service (PutRecords), per sink.
    pub sink_call_records: Family<SinkLabel, Histogram>,
    /// Records sent again after the service asked for a retry, per sink.
    pub sink_retries: Family<SinkLabel, Counter>,
    /// Calls the service throttled, per sink.
    pub sink_throttles: Family<SinkLabel, Counter>,
    /// Connections a sink's own client made to its service (the IoT Core MQTT sink's
    /// CONNACKs): 1 for a connection that stays up.
    pub sink_connections: Family<SinkLabel, Counter>,
    /// Plugin calls (one per batch), per plugin.
    pub plugin_calls: Family<PluginLabel, Counter>,
    /// Seconds per plugin call, per plugin.
    pub plugin_call_seconds: Family<PluginLabel, Histogram>,
    /// Messages per plugin call, per plugin.
    pub plugin_batch_messages: Family<PluginLabel, Histogram>,
    /// Messages out of plugin calls, by plugin and outcome.
    pub plugin_messages: Family<PluginOutcome, Counter>,
    /// Plugins' own counters (`counter-add`).
    pub plugin_counters: Family<PluginCounter, Counter>,
    /// The `messages` counters of the four statuses, fetched once: counting a message
    /// on the hot path is then one atomic add.
    by_status: [(&'static str, Counter); 4],
    /// `mqtt_publishes{status="accepted"}`, fetched once for the same reason.
    mqtt_accepted: Counter,
}

/// Per thread, the route counters used last: counting a routed record is then a string
/// comparison and one atomic add, not two label strings made, hashed and dropped under
/// the family's lock (the routes' family is never cleared, so a cached counter stays
/// the one the registry shows).
const ROUTES_CACHED: usize = 16;

thread_local! {
    static ROUTES: std::cell::RefCell<Vec<(String, String, Counter)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn call_histogram() -> Histogram {
    // 10 µs to about 1.3 s: plugin calls are short, and their limit is in milliseconds.
    Histogram::new(exponential_buckets(0.00001, 2.0, 18))
}

fn count_histogram() -> Histogram {
    // 1 to 4,096 items.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// One plugin's metric handles, fetched once when it is loaded: counting a call is then
/// a few atomic adds, without label lookups.
#[derive(Clone, Debug)]
pub struct PluginMetrics {
    plugin: String,
    /// Calls.
    pub calls: Counter,
    /// Seconds per call.
    pub call_seconds: Histogram,
    /// Messages per call.
    pub batch_messages: Histogram,
    /// Messages a transform passed on (unchanged or changed).
    pub passed: Counter,
    /// Messages a transform split into parts.
    pub split: Counter,
    /// Messages a transform dropped.
    pub dropped: Counter,
    /// Messages a router decided on.
    pub routed: Counter,
    /// Messages outside the plugin's `topics`, passed on without it.
    pub out_of_scope: Counter,
}

impl PluginMetrics {
    /// The handles of `plugin`'s metrics.
    pub fn new(plugin: &str) -> PluginMetrics {
        let m = &METRICS;
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        let outcome = |outcome: &str| {
            m.plugin_messages
                .get_or_create(&PluginOutcome {
                    plugin: plugin.to_string(),
                    outcome: outcome.to_string(),
                })
                .clone()
        };
        PluginMetrics {
            plugin: plugin.to_string(),
            calls: m.plugin_calls.get_or_create(&label).clone(),
            call_seconds: m.plugin_call_seconds.get_or_create(&label).clone(),
            batch_messages: m.plugin_batch_messages.get_or_create(&label).clone(),
            passed: outcome("passed"),
            split: outcome("split"),
            dropped: outcome("dropped"),
            routed: outcome("routed"),
            out_of_scope: outcome("out_of_scope"),
        }
    }

    /// Counts `n` messages that failed with `code` (rare: looked up each time).
    pub fn failed(&self, code: &str, n: u64) {
        METRICS
            .plugin_messages
            .get_or_create(&PluginOutcome {
                plugin: self.plugin.clone(),
                outcome: code.to_string(),
            })
            .inc_by(n);
    }

    /// Messages that failed with `code` so far.
    pub fn failures(&self, code: &str) -> u64 {
        METRICS
            .plugin_messages
            .get_or_create(&PluginOutcome {
                plugin: self.plugin.clone(),
                outcome: code.to_string(),
            })
            .get()
    }

    /// Adds to the plugin's own counter `name`.
    pub fn counter_add(&self, name: &str, delta: u64) {
        METRICS
            .plugin_counters
            .get_or_create(&PluginCounter {
                plugin: self.plugin.clone(),
                counter: name.to_string(),
            })
            .inc_by(delta);
    }
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
    let dead_letter_bytes = Gauge::default();
    registry.register(
        "dead_letter_bytes",
        "Bytes of dead letters stored",
        dead_letter_bytes.clone(),
    );
    let dead_letters_refused = Family::<Status, Counter>::default();
    registry.register(
        "dead_letters_refused",
        "Messages not kept as dead letters (store_full, expired_dropped)",
        dead_letters_refused.clone(),
    );
    let spool_damaged_entries = Counter::default();
    registry.register(
        "spool_damaged_entries",
        "Damaged spool entries skipped when the spool was read at start",
        spool_damaged_entries.clone(),
    );
    let local_sink_syncs = Counter::default();
    registry.register(
        "local_sink_syncs",
        "fdatasyncs of the local sink's files",
        local_sink_syncs.clone(),
    );
    let connections = Family::<ListenerLabel, Gauge>::default();
    registry.register(
        "connections",
        "Open device connections, per listener",
        connections.clone(),
    );
    let connections_closed = Family::<ConnectionEnd, Counter>::default();
    registry.register(
        "connections_closed",
        "Connections the gateway refused or closed (refused_full, handshake_timeout, idle_timeout)",
        connections_closed.clone(),
    );
    let upstream = Family::<Status, Counter>::default();
    registry.register(
        "upstream_events",
        "Events of the devices' own sessions at IoT Core, by event",
        upstream.clone(),
    );
    let mqtt_publishes = Family::<Status, Counter>::default();
    registry.register(
        "mqtt_publishes",
        "MQTT publishes by outcome (accepted, or the reason code of a refusal)",
        mqtt_publishes.clone(),
    );
    let mqtt_puback_seconds = latency_histogram();
    registry.register(
        "mqtt_puback_seconds",
        "Seconds from reading MQTT publishes to writing their PUBACKs",
        mqtt_puback_seconds.clone(),
    );
    let sessions = Gauge::default();
    registry.register(
        "websocket_sessions",
        "Open WebSocket sessions",
        sessions.clone(),
    );
    let registry_age = Gauge::default();
    registry.register(
        "registry_snapshot_age_seconds",
        "Seconds since the snapshot of the certificates registered at AWS IoT was read",
        registry_age.clone(),
    );
    let routes = Family::<RouteLabel, Counter>::default();
    registry.register(
        "routed_messages",
        "Message parts routed, by deciding route and destination",
        routes.clone(),
    );
    let sink_window_records =
        Family::<SinkLabel, Histogram>::new_with_constructor(count_histogram as fn() -> Histogram);
    registry.register(
        "sink_window_records",
        "Records per delivery window taken from the spool",
        sink_window_records.clone(),
    );
    let sink_call_records =
        Family::<SinkLabel, Histogram>::new_with_constructor(count_histogram as fn() -> Histogram);
    registry.register(
        "sink_call_records",
        "Records per call to the sink's service (Kinesis PutRecords)",
        sink_call_records.clone(),
    );
    let sink_retries = Family::<SinkLabel, Counter>::default();
    registry.register(
        "sink_retries",
        "Records sent again because the service asked for a retry",
        sink_retries.clone(),
    );
    let sink_throttles = Family::<SinkLabel, Counter>::default();
    registry.register(
        "sink_throttles",
        "Calls or records the sink's service throttled",
        sink_throttles.clone(),
    );
    let sink_connections = Family::<SinkLabel, Counter>::default();
    registry.register(
        "sink_connections",
        "Connections a sink's own client made to its service (IoT Core MQTT CONNACKs)",
        sink_connections.clone(),
    );
    let plugin_calls = Family::<PluginLabel, Counter>::default();
    registry.register(
        "plugin_calls",
        "Plugin calls (one per batch)",
        plugin_calls.clone(),
    );
    let plugin_call_seconds =
        Family::<PluginLabel, Histogram>::new_with_constructor(call_histogram as fn() -> Histogram);
    registry.register(
        "plugin_call_seconds",
        "Seconds per plugin call",
        plugin_call_seconds.clone(),
    );
    let plugin_batch_messages = Family::<PluginLabel, Histogram>::new_with_constructor(
        count_histogram as fn() -> Histogram,
    );
    registry.register(
        "plugin_batch_messages",
        "Messages per plugin call",
        plugin_batch_messages.clone(),
    );
    let plugin_messages = Family::<PluginOutcome, Counter>::default();
    registry.register(
        "plugin_messages",
        "Messages out of plugin calls, by outcome",
        plugin_messages.clone(),
    );
    let plugin_counters = Family::<PluginCounter, Counter>::default();
    registry.register(
        "plugin_counter",
        "Counters plugins keep with counter-add",
        plugin_counters.clone(),
    );
    let by_status = ["accepted", "dropped", "dead-lettered", "rejected"].map(|status| {
        let counter = messages
            .get_or_create(&Status {
                status: status.to_string(),
            })
            .clone();
        (status, counter)
    });
    let mqtt_accepted = mqtt_publishes
        .get_or_create(&Status {
            status: "accepted".to_string(),
        })
        .clone();
    Metrics {
        registry,
        by_status,
        mqtt_accepted,
        messages,
        refused,
        sink_records,
        sink_failures,
        delivery_latency,
        spool_records,
        spool_bytes,
        spool_fsyncs,
        dead_letters,
        dead_letter_bytes,
        dead_letters_refused,
        spool_damaged_entries,
        local_sink_syncs,
        connections,
        connections_closed,
        mqtt_publishes,
        upstream,
        mqtt_puback_seconds,
        sessions,
        registry_age,
        routes,
        sink_window_records,
        sink_call_records,
        sink_retries,
        sink_throttles,
        sink_connections,
        plugin_calls,
        plugin_call_seconds,
        plugin_batch_messages,
        plugin_messages,
        plugin_counters,
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

    /// Counts one routed message part.
    pub fn route(&self, route: &str, destination: &str) {
        ROUTES.with_borrow_mut(|cached| {
            if let Some((_, _, counter)) = cached
                .iter()
                .find(|(r, d, _)| r == route && d == destination)
            {
                counter.inc();
                return;
            }
            let counter = self
                .routes
                .get_or_create(&RouteLabel {
                    route: route.to_string(),
                    destination: destination.to_string(),
                })
                .clone();
            counter.inc();
            if cached.len() == ROUTES_CACHED {
                cached.remove(0);
            }
            cached.push((route.to_string(), destination.to_string(), counter));
        });
    }

    /// Counts a message not kept as a dead letter (`store_full`, `expired_dropped`).
    pub fn dead_letter_refused(&self, why: &str) {
        self.dead_letters_refused
            .get_or_create(&Status {
                status: why.to_string(),
            })
            .inc();
    }

    /// Counts a connection `listener` refused or closed for `reason`.
    pub fn connection_closed(&self, listener: &str, reason: &str) {
        self.connections_closed
            .get_or_create(&ConnectionEnd {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts an event of a device's session at IoT Core.
    pub fn upstream(&self, event: &str) {
        self.upstream
            .get_or_create(&Status {
                status: event.to_string(),
            })
            .inc();
    }

    /// Counts `n` MQTT publishes with `outcome`.
    pub fn mqtt_publish(&self, outcome: &str, n: u64) {
        if outcome == "accepted" {
            self.mqtt_accepted.inc_by(n);
            return;
        }
        self.mqtt_publishes
            .get_or_create(&Status {
                status: outcome.to_string(),
            })
            .inc_by(n);
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
