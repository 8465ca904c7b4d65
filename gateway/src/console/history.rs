//! The console's time series: one point per second for the last 15 minutes, kept in
//! memory, so the page charts the gateway's recent past without a Prometheus.
//!
//! A [`Reading`] holds the cumulative figures of one instant; [`History::record`] turns
//! consecutive readings into a [`Point`] of rates, latency percentiles and spool depths.

use std::collections::VecDeque;

use serde_json::{Map, Value, json};

use super::exposition::{self, Sample};

/// Points kept: 15 minutes at one a second.
pub const CAPACITY: usize = 900;

/// Seconds between points.
pub const INTERVAL_MS: u64 = 1_000;

/// Latency percentiles are taken over the deliveries of the last this many readings, so
/// one quiet second does not blank the line.
const LATENCY_WINDOW: usize = 10;

/// The sinks, by the names the metrics use.
pub const SINKS: [&str; 3] = ["iot-core", "kinesis", "local"];

/// Destinations a route can choose, by the names the metrics use.
pub const DESTINATIONS: [&str; 5] = ["iot-core", "kinesis", "local", "dead-letter", "drop"];

/// Input message statuses, by the names the metrics use.
pub const STATUSES: [&str; 4] = ["accepted", "dropped", "dead-lettered", "rejected"];

/// Cumulative figures read at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// Input messages by status, in the order of [`STATUSES`].
    pub statuses: [f64; 4],
    /// Requests and frames refused (every code).
    pub refused: f64,
    /// Message parts routed, by destination, in the order of [`DESTINATIONS`].
    pub routed: [f64; 5],
    /// Delivery latency buckets per sink (cumulative), in the order of [`SINKS`].
    pub latency: [Vec<(f64, f64)>; 3],
    /// Records waiting per sink.
    pub spool_records: [f64; 3],
    /// Bytes waiting per sink.
    pub spool_bytes: [f64; 3],
}

impl Reading {
    /// The figures in `samples` (the metrics exposition) and the spool's queues.
    pub fn from_samples(
        at_ms: u64,
        samples: &[Sample],
        spool: &crate::spool::SpoolStats,
    ) -> Reading {
        let statuses = STATUSES.map(|status| {
            exposition::sum(samples, "sluice_messages_total", |s| {
                s.label("status") == Some(status)
            })
        });
        let routed = DESTINATIONS.map(|destination| {
            exposition::sum(samples, "sluice_routed_messages_total", |s| {
                s.label("destination") == Some(destination)
            })
        });
        let latency = SINKS.map(|sink| {
            exposition::buckets(samples, "sluice_delivery_latency_seconds", |s| {
                s.label("sink") == Some(sink)
            })
        });
        let queue = |sink: &str| spool.queues.iter().find(|q| q.sink.name() == sink);
        Reading {
            at_ms,
            statuses,
            refused: exposition::sum(samples, "sluice_refused_total", |_| true),
            routed,
            latency,
            spool_records: SINKS.map(|sink| queue(sink).map_or(0.0, |q| q.records as f64)),
            spool_bytes: SINKS.map(|sink| queue(sink).map_or(0.0, |q| q.bytes as f64)),
        }
    }
}

/// The names of a point's values, in order: rates per second (`accepted`, …,
/// `refused`, `to_<destination>`), latency in milliseconds (`p50_<sink>`,
/// `p99_<sink>`), and spool depth (`records_<sink>`, `bytes_<sink>`).
pub fn series_names() -> Vec<String> {
    let mut names: Vec<String> = STATUSES.iter().map(|s| s.replace('-', "_")).collect();
    names.push("refused".into());
    names.extend(
        DESTINATIONS
            .iter()
            .map(|d| format!("to_{}", d.replace('-', "_"))),
    );
    for sink in SINKS {
        let sink = sink.replace('-', "_");
        names.push(format!("p50_{sink}"));
        names.push(format!("p99_{sink}"));
    }
    for sink in SINKS {
        let sink = sink.replace('-', "_");
        names.push(format!("records_{sink}"));
        names.push(format!("bytes_{sink}"));
    }
    names
}

/// One second of the gateway: its values in the order of [`series_names`]; `None` where
/// there is nothing to say (no deliveries to a sink, so no latency).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The end of the second (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// The values.
    pub values: Vec<Option<f64>>,
}

/// The last [`CAPACITY`] points and the readings needed to make the next one.
#[derive(Debug, Default)]
pub struct History {
    points: VecDeque<Point>,
    /// The last [`LATENCY_WINDOW`] + 1 readings, oldest first.
    readings: VecDeque<Reading>,
}

impl History {
    /// Adds `reading`; from the second reading on, it makes a point. Returns whether it
    /// did.
    pub fn record(&mut self, reading: Reading) -> bool {
        let made = if let Some(previous) = self.readings.back() {
            let oldest = self.readings.front().unwrap_or(previous);
            let point = point(previous, oldest, &reading);
            if self.points.len() == CAPACITY {
                self.points.pop_front();
            }
            self.points.push_back(point);
            true
        } else {
            false
        };
        if self.readings.len() > LATENCY_WINDOW {
            self.readings.pop_front();
        }
        self.readings.push_back(reading);
        made
    }

    /// The points after `since_ms`, oldest first.
    pub fn since(&self, since_ms: u64) -> impl Iterator<Item = &Point> {
        self.points.iter().filter(move |p| p.at_ms > since_ms)
    }

    /// The newest point.
    pub fn last(&self) -> Option<&Point> {
        self.points.back()
    }

    /// The points after `since_ms` as JSON, column by column (what the chart library
    /// takes): `{"interval_ms", "capacity", "t": [ms…], "series": {name: [value…]}}`.
    pub fn to_json(&self, since_ms: u64) -> Value {
        let names = series_names();
        let mut columns: Vec<Vec<Value>> = vec![Vec::new(); names.len()];
        let mut times = Vec::new();
        for point in self.since(since_ms) {
            times.push(Value::from(point.at_ms));
            for (column, value) in columns.iter_mut().zip(&point.values) {
                column.push(value.map_or(Value::Null, round));
            }
        }
        let series: Map<String, Value> = names
            .into_iter()
            .zip(columns)
            .map(|(name, column)| (name, Value::Array(column)))
            .collect();
        json!({
            "interval_ms": INTERVAL_MS,
            "capacity": CAPACITY,
            "t": times,
            "series": series,
        })
    }
}

/// Three decimals are plenty for a chart, and keep the answer small.
fn round(value: f64) -> Value {
    Value::from((value * 1000.0).round() / 1000.0)
}

/// The point between `previous` and `now`; latency over the window since `oldest`.
fn point(previous: &Reading, oldest: &Reading, now: &Reading) -> Point {
    let seconds = (now.at_ms.saturating_sub(previous.at_ms) as f64 / 1000.0).max(0.001);
    let rate = |now: f64, before: f64| Some((now - before).max(0.0) / seconds);
    let mut values = Vec::with_capacity(series_names().len());
    for (n, b) in now.statuses.iter().zip(&previous.statuses) {
        values.push(rate(*n, *b));
    }
    values.push(rate(now.refused, previous.refused));
    for (n, b) in now.routed.iter().zip(&previous.routed) {
        values.push(rate(*n, *b));
    }
    for (now, before) in now.latency.iter().zip(&oldest.latency) {
        let window = exposition::difference(now, before);
        for q in [0.5, 0.99] {
            values.push(exposition::quantile(&window, q).map(|seconds| seconds * 1000.0));
        }
    }
    for (records, bytes) in now.spool_records.iter().zip(&now.spool_bytes) {
        values.push(Some(*records));
        values.push(Some(*bytes));
    }
    Point {
        at_ms: now.at_ms,
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at_ms: u64, accepted: f64, local_latency: Vec<(f64, f64)>) -> Reading {
        Reading {
            at_ms,
            statuses: [accepted, 0.0, 0.0, 0.0],
            routed: [0.0, 0.0, accepted, 0.0, 0.0],
            latency: [Vec::new(), Vec::new(), local_latency],
            spool_records: [0.0, 0.0, 4.0],
            ..Reading::default()
        }
    }

    fn value(point: &Point, name: &str) -> Option<f64> {
        let index = series_names().iter().position(|n| n == name).unwrap();
        point.values[index]
    }

    #[test]
    fn consecutive_readings_become_rates_per_second() {
        let mut history = History::default();
        assert!(
            !history.record(reading(1_000, 0.0, vec![])),
            "one reading: no rate yet"
        );
        assert!(history.record(reading(2_000, 10.0, vec![])));
        assert!(history.record(reading(4_000, 30.0, vec![])));
        let points: Vec<_> = history.since(0).collect();
        assert_eq!(points.len(), 2);
        assert_eq!(value(points[0], "accepted"), Some(10.0));
        assert_eq!(
            value(points[1], "accepted"),
            Some(10.0),
            "20 over 2 seconds"
        );
        assert_eq!(value(points[1], "to_local"), Some(10.0));
        assert_eq!(value(points[1], "rejected"), Some(0.0));
        assert_eq!(value(points[1], "records_local"), Some(4.0));
        assert_eq!(
            value(points[1], "p50_local"),
            None,
            "no deliveries: no latency"
        );
        assert_eq!(points[0].values.len(), series_names().len());
    }

    #[test]
    fn latency_is_taken_over_the_recent_window_only() {
        let mut history = History::default();
        // 100 slow deliveries long ago...
        history.record(reading(
            0,
            0.0,
            vec![(0.001, 0.0), (1.0, 100.0), (f64::INFINITY, 100.0)],
        ));
        for second in 1..=LATENCY_WINDOW as u64 + 1 {
            history.record(reading(
                second * 1000,
                0.0,
                vec![(0.001, 0.0), (1.0, 100.0), (f64::INFINITY, 100.0)],
            ));
        }
        assert_eq!(
            value(history.last().unwrap(), "p50_local"),
            None,
            "they left the window"
        );
        // ...then fast ones: only those count.
        history.record(reading(
            20_000,
            0.0,
            vec![(0.001, 10.0), (1.0, 110.0), (f64::INFINITY, 110.0)],
        ));
        let p50 = value(history.last().unwrap(), "p50_local").unwrap();
        assert!((p50 - 0.5).abs() < 1e-9, "{p50} ms");
    }

    #[test]
    fn keeps_fifteen_minutes_and_pages_by_time() {
        let mut history = History::default();
        for second in 0..=(CAPACITY as u64 + 100) {
            history.record(reading(second * 1000, second as f64, vec![]));
        }
        assert_eq!(history.since(0).count(), CAPACITY);
        let first = history.since(0).next().unwrap().at_ms;
        assert_eq!(first, 101_000);
        let json = history.to_json(history.last().unwrap().at_ms - 3_000);
        assert_eq!(json["t"].as_array().unwrap().len(), 3);
        assert_eq!(json["series"]["accepted"], json!([1.0, 1.0, 1.0]));
        assert_eq!(json["series"]["p99_iot_core"], json!([null, null, null]));
        assert_eq!(json["capacity"], CAPACITY);
    }

    #[test]
    fn a_counter_that_went_back_is_a_rate_of_zero() {
        let mut history = History::default();
        history.record(reading(1_000, 50.0, vec![]));
        history.record(reading(2_000, 10.0, vec![]));
        assert_eq!(value(history.last().unwrap(), "accepted"), Some(0.0));
    }
}
