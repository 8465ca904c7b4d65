//! A plugin's counters, shared by all its instances and versions: what it reported
//! through the host imports (`counter-add`, bounded in names), and what the host measured
//! of its calls (calls, time, failures, the last error).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::plugin::output::Owner;

/// A plugin's counters, shared by all its instances and versions: what it reported
/// through the host imports, and what the host measured of its calls.
#[derive(Debug)]
pub struct PluginStats {
    /// The plugin's name, for log records.
    pub name: String,
    /// Counters from `counter-add`.
    pub counters: Mutex<HashMap<String, u64>>,
    /// Its Prometheus metrics.
    pub metrics: crate::metrics::PluginMetrics,
    /// Nanoseconds spent in calls, for the admin API's average.
    pub call_nanos: std::sync::atomic::AtomicU64,
    /// The last failure (code, reason, when), for the admin API and the console.
    pub last_error: Mutex<Option<LastError>>,
}

/// A plugin's most recent failure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    /// The failure code (`plugin_refused`, `plugin_trap`, …).
    pub code: &'static str,
    /// What the plugin or the host said.
    pub reason: String,
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

impl PluginStats {
    /// Fresh counters for the plugin `name`.
    pub fn new(name: &str) -> PluginStats {
        PluginStats {
            name: name.to_string(),
            counters: Mutex::default(),
            metrics: crate::metrics::PluginMetrics::new(name),
            call_nanos: std::sync::atomic::AtomicU64::new(0),
            last_error: Mutex::default(),
        }
    }

    /// Counts `n` messages that failed with `code` and keeps `reason` as the last error.
    pub fn failed(&self, code: &'static str, reason: &str, n: u64) {
        self.metrics.failed(code, n);
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastError {
            code,
            reason: reason.to_string(),
            at_ms,
        });
    }

    /// The last failure, if any.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts one call of `messages` messages that took `elapsed`.
    pub fn call(&self, messages: usize, elapsed: Duration) {
        self.metrics.calls.inc();
        self.metrics.call_seconds.observe(elapsed.as_secs_f64());
        self.metrics.batch_messages.observe(messages as f64);
        self.call_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A snapshot of the counters, sorted by name.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = counters.iter().map(|(k, v)| (k.clone(), *v)).collect();
        list.sort();
        list
    }
}

impl Owner for PluginStats {
    fn name(&self) -> &str {
        &self.name
    }

    fn count(&self, name: &str, delta: u64) {
        self.add_counter(name, delta);
    }
}

impl PluginStats {
    /// Adds `delta` to the plugin's counter `name` (bounded: see [`MAX_COUNTERS`]).
    pub fn add_counter(&self, name: &str, delta: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let (name, first_overflow) = counter_name(&counters, name.to_string());
        if first_overflow {
            tracing::warn!(
                plugin = %self.name,
                "the plugin uses more than {MAX_COUNTERS} counter names (or names over {MAX_COUNTER_NAME} bytes); the rest are counted as `{OTHER_COUNTER}`"
            );
        }
        self.metrics.counter_add(&name, delta);
        let counter = counters.entry(name).or_insert(0);
        *counter = counter.saturating_add(delta);
    }
}

/// Most counter names a plugin has (each is a Prometheus label value: a plugin making
/// names from its data must not grow the metrics without end).
pub const MAX_COUNTERS: usize = 100;
/// Longest counter name.
pub const MAX_COUNTER_NAME: usize = 64;
/// Where counts beyond those limits go.
pub const OTHER_COUNTER: &str = "_other";

/// The name `name` is counted under, given the plugin's `counters` so far, and whether
/// this is the first one turned away.
fn counter_name(counters: &HashMap<String, u64>, name: String) -> (String, bool) {
    let known = counters.contains_key(&name);
    let fits = name.len() <= MAX_COUNTER_NAME && name != OTHER_COUNTER;
    if known || (fits && counters.len() < MAX_COUNTERS) {
        return (name, false);
    }
    (
        OTHER_COUNTER.to_string(),
        !counters.contains_key(OTHER_COUNTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_names_are_bounded() {
        let mut counters = HashMap::new();
        for n in 0..MAX_COUNTERS {
            let (name, overflow) = counter_name(&counters, format!("c{n}"));
            assert_eq!((name.as_str(), overflow), (format!("c{n}").as_str(), false));
            counters.insert(name, 1);
        }
        // Known names keep counting; a new one, or one too long, goes to `_other`, and
        // only the first of those is reported.
        assert_eq!(counter_name(&counters, "c7".into()), ("c7".into(), false));
        assert_eq!(
            counter_name(&counters, "new".into()),
            (OTHER_COUNTER.into(), true)
        );
        counters.insert(OTHER_COUNTER.to_string(), 1);
        assert_eq!(
            counter_name(&counters, "again".into()),
            (OTHER_COUNTER.into(), false)
        );
        let long = "x".repeat(MAX_COUNTER_NAME + 1);
        assert_eq!(
            counter_name(&HashMap::new(), long),
            (OTHER_COUNTER.into(), true)
        );
    }
}
