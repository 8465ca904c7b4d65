//! `[plugins]`: the plugin host's limits and the chain of plugins.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::Config;

/// Per-call plugin time limit: generous for real transforms (µs per message), short
/// enough that a looping plugin holds a worker only briefly.
pub const DEFAULT_PLUGIN_TIMEOUT_MS: u64 = 200;

/// Per-instance plugin memory limit: ample for batch processing of IoT payloads.
pub const DEFAULT_PLUGIN_MEMORY_MIB: u64 = 64;

/// What happens to messages a plugin refuses or a plugin failure takes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePath {
    /// Tell the device: `422` for a refused message, `500` for a failed plugin.
    Reject,
    /// Keep the message in the dead-letter store with the reason; the device gets `200`.
    DeadLetter,
}

/// `[plugins]`: the host's limits and the chain of plugins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Threads that serve requests and run plugins (the async runtime's workers).
    /// Default: the number of CPU cores.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Time limit of one plugin call (one batch), in milliseconds. Default 200.
    #[serde(default = "default_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Memory limit of one plugin instance, in MiB. Default 64.
    #[serde(default = "default_memory_mib")]
    pub memory_limit_mib: u64,
    /// What happens to messages a plugin refuses or fails on. Default `reject`.
    #[serde(default = "default_failure_path")]
    pub on_failure: FailurePath,
    /// Reload a plugin when its file changes. Default `true`.
    #[serde(default = "default_true")]
    pub hot_reload: bool,
    /// Where compiled plugins are cached. Default `<data_dir>/plugin-cache`.
    pub cache_dir: Option<PathBuf>,
    /// Transform plugins, run in this order.
    #[serde(default)]
    pub transform: Vec<PluginEntry>,
    /// The router plugin, run after the transforms.
    pub router: Option<PluginEntry>,
}

/// One plugin in the chain.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Name used in logs, decisions and errors. Unique among plugins.
    pub name: String,
    /// The component file (`.wasm`). Relative paths are relative to the config file.
    pub path: PathBuf,
    /// Key/value pairs handed to the plugin's `init`. Strings, numbers and booleans.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// The topics the plugin is for (MQTT filters, e.g. `["raw/#", "sites/+/bin"]`):
    /// other messages pass it untouched and are never sent to it. Empty (the default):
    /// every message.
    #[serde(default)]
    pub topics: Vec<String>,
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
}

fn default_timeout_ms() -> u64 {
    DEFAULT_PLUGIN_TIMEOUT_MS
}

fn default_memory_mib() -> u64 {
    DEFAULT_PLUGIN_MEMORY_MIB
}

fn default_failure_path() -> FailurePath {
    FailurePath::Reject
}

fn default_true() -> bool {
    true
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            workers: default_workers(),
            call_timeout_ms: DEFAULT_PLUGIN_TIMEOUT_MS,
            memory_limit_mib: DEFAULT_PLUGIN_MEMORY_MIB,
            on_failure: FailurePath::Reject,
            hot_reload: true,
            cache_dir: None,
            transform: Vec::new(),
            router: None,
        }
    }
}

/// A plugin config value as the string handed to the plugin; `None` for arrays/tables.
pub fn plugin_config_value(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

impl Config {
    pub(super) fn validate_plugins(&self, problems: &mut Vec<String>) {
        let plugins = &self.plugins;
        if plugins.workers == 0 || plugins.workers > 256 {
            problems.push(format!(
                "plugins.workers must be 1 to 256, not {}",
                plugins.workers
            ));
        }
        if plugins.call_timeout_ms == 0 || plugins.call_timeout_ms > 60_000 {
            problems.push(format!(
                "plugins.call_timeout_ms must be 1 to 60000, not {}",
                plugins.call_timeout_ms
            ));
        }
        if !(1..=4096).contains(&plugins.memory_limit_mib) {
            problems.push(format!(
                "plugins.memory_limit_mib must be 1 to 4096, not {}",
                plugins.memory_limit_mib
            ));
        }
        let mut names = std::collections::HashSet::new();
        let entries = plugins.transform.iter().map(|e| ("plugins.transform", e));
        for (section, entry) in entries.chain(plugins.router.iter().map(|e| ("plugins.router", e)))
        {
            if entry.name.is_empty() {
                problems.push(format!("{section}: a plugin has an empty name"));
            } else if !names.insert(entry.name.as_str()) {
                problems.push(format!(
                    "{section}: plugin name `{}` is used twice",
                    entry.name
                ));
            }
            if !entry.path.is_file() {
                problems.push(format!(
                    "{section} `{}`: file {} does not exist",
                    entry.name,
                    entry.path.display()
                ));
            }
            for filter in &entry.topics {
                if let Err(why) = crate::topic::TopicFilter::parse(filter) {
                    problems.push(format!("{section} `{}`: topics: {why}", entry.name));
                }
            }
            for (key, value) in &entry.config {
                if plugin_config_value(value).is_none() {
                    problems.push(format!(
                        "{section} `{}`: config `{key}` must be a string, number or boolean",
                        entry.name
                    ));
                }
            }
        }
    }
}
