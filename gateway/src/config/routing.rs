//! `[routing]`: the built-in routing policy and the operator's rules.

use serde::Deserialize;

use super::Config;
use super::sinks::validate_stream_name;
use super::spool::Durability;
use crate::quota::IOT_CORE_CONNECTION_BYTES_PER_SEC;
use crate::quota::{
    KINESIS_DEFAULT_MAX_RECORD_BYTES, KINESIS_LARGEST_MAX_RECORD_BYTES,
    KINESIS_MAX_PARTITION_KEY_CHARS,
};
use crate::topic::{TopicFilter, validate_publish_topic};

/// Where the built-in policy sends a message no rule claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultDestination {
    /// AWS IoT Core, on the message's own topic.
    IotCore,
    /// The default Kinesis stream, partitioned by device id.
    Kinesis,
    /// The local sink.
    Local,
}

/// `[routing]`: the built-in policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Destination when nothing else decides. Default `iot-core`.
    #[serde(default = "default_destination")]
    pub default_destination: DefaultDestination,
    /// Kinesis stream used when a rule or plugin names none. Default `sluice-ingest`.
    #[serde(default = "default_stream")]
    pub kinesis_stream: String,
    /// The streams' maximum record size; larger payloads are refused with `413`.
    /// Default 1 MiB; at most 10 MiB (for streams raised with `UpdateMaxRecordSize`).
    #[serde(default = "default_max_record")]
    pub kinesis_max_record_bytes: usize,
    /// A device sending faster than this (bytes/s) is a high-throughput producer and
    /// goes to Kinesis. Default 512 KiB/s, IoT Core's per-connection guidance.
    #[serde(default = "default_high_throughput")]
    pub high_throughput_bytes_per_sec: u64,
    /// Topic rules, tried in order; the first whose filter matches applies.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// A destination a topic rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleDestination {
    /// AWS IoT Core.
    IotCore,
    /// A Kinesis data stream.
    Kinesis,
    /// The local sink.
    Local,
    /// Discard (the device is still acknowledged).
    Drop,
    /// The dead-letter store.
    DeadLetter,
}

/// `[[routing.rules]]`: one topic rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name recorded with every decision the rule makes.
    pub name: String,
    /// MQTT topic filter (`+` one level, `#` the rest), e.g. `sites/+/alarms/#`.
    pub topic: String,
    /// Where matching messages go; absent leaves the choice to the built-in policy.
    pub destination: Option<RuleDestination>,
    /// Marks matching messages as command & control (bidirectional), which the built-in
    /// policy sends to IoT Core.
    #[serde(default)]
    pub command_and_control: bool,
    /// IoT Core topic to publish to instead of the message's own. A template:
    /// `${device.id}`, `${topic}` and `${topic.N}` (level N) are filled in.
    pub iot_topic: Option<String>,
    /// IoT Core QoS, 0 or 1. Default 1.
    pub qos: Option<u8>,
    /// Kinesis stream instead of the default one (a template).
    pub stream: Option<String>,
    /// Kinesis partition key instead of the device id (a template).
    pub partition_key: Option<String>,
    /// When matching messages are acknowledged; default: `spool.durability`.
    pub durability: Option<Durability>,
}

fn default_destination() -> DefaultDestination {
    DefaultDestination::IotCore
}

fn default_stream() -> String {
    "sluice-ingest".to_string()
}

fn default_max_record() -> usize {
    KINESIS_DEFAULT_MAX_RECORD_BYTES
}

fn default_high_throughput() -> u64 {
    IOT_CORE_CONNECTION_BYTES_PER_SEC
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            default_destination: DefaultDestination::IotCore,
            kinesis_stream: default_stream(),
            kinesis_max_record_bytes: KINESIS_DEFAULT_MAX_RECORD_BYTES,
            high_throughput_bytes_per_sec: IOT_CORE_CONNECTION_BYTES_PER_SEC,
            rules: Vec::new(),
        }
    }
}

/// Checks a template: it must parse, and a template without variables must be valid as
/// it stands (one with variables is checked per message, when it is filled in).
fn check_template(
    text: &str,
    at: &str,
    validate: impl Fn(&str) -> Result<(), String>,
    problems: &mut Vec<String>,
) {
    match crate::template::Template::parse(text) {
        Err(why) => problems.push(format!("{at}: {why}")),
        Ok(template) if !text.contains("${") => {
            if let Err(why) = validate(&template.sample()) {
                problems.push(format!("{at}: {why}"));
            }
        }
        Ok(_) => {}
    }
}

impl Config {
    pub(super) fn validate_routing(&self, problems: &mut Vec<String>) {
        let routing = &self.routing;
        if !(1024..=KINESIS_LARGEST_MAX_RECORD_BYTES).contains(&routing.kinesis_max_record_bytes) {
            problems.push(format!(
                "routing.kinesis_max_record_bytes must be 1024 to {KINESIS_LARGEST_MAX_RECORD_BYTES} (10 MiB), not {}",
                routing.kinesis_max_record_bytes
            ));
        }
        if let Err(why) = validate_stream_name(&routing.kinesis_stream) {
            problems.push(format!("routing.kinesis_stream: {why}"));
        }
        let mut names = std::collections::HashSet::new();
        for (index, rule) in routing.rules.iter().enumerate() {
            let at = format!("routing.rules[{index}] `{}`", rule.name);
            if rule.name.is_empty() {
                problems.push(format!("routing.rules[{index}]: name is empty"));
            } else if !names.insert(rule.name.as_str()) {
                problems.push(format!("{at}: the name is used twice"));
            }
            if let Err(why) = TopicFilter::parse(&rule.topic) {
                problems.push(format!("{at}: topic filter: {why}"));
            }
            if rule.destination.is_none() && !rule.command_and_control {
                problems.push(format!(
                    "{at}: has neither a destination nor command_and_control, so it does nothing"
                ));
            }
            if let Some(topic) = &rule.iot_topic {
                check_template(
                    topic,
                    &format!("{at}: iot_topic"),
                    validate_publish_topic,
                    problems,
                );
            }
            if let Some(key) = &rule.partition_key {
                let valid_key = |key: &str| match key.chars().count() {
                    1..=KINESIS_MAX_PARTITION_KEY_CHARS => Ok(()),
                    n => Err(format!(
                        "a partition key must be 1 to {KINESIS_MAX_PARTITION_KEY_CHARS} characters, not {n}"
                    )),
                };
                check_template(key, &format!("{at}: partition_key"), valid_key, problems);
            }
            if let Some(qos) = rule.qos
                && qos > 1
            {
                problems.push(format!(
                    "{at}: qos must be 0 or 1 (IoT Core has no QoS {qos})"
                ));
            }
            if let Some(stream) = &rule.stream {
                check_template(
                    stream,
                    &format!("{at}: stream"),
                    validate_stream_name,
                    problems,
                );
            }
            let iot_only = rule.iot_topic.is_some() || rule.qos.is_some();
            if iot_only && !matches!(rule.destination, Some(RuleDestination::IotCore)) {
                problems.push(format!(
                    "{at}: iot_topic and qos need destination = \"iot-core\""
                ));
            }
            let kinesis_only = rule.stream.is_some() || rule.partition_key.is_some();
            if kinesis_only && !matches!(rule.destination, Some(RuleDestination::Kinesis)) {
                problems.push(format!(
                    "{at}: stream and partition_key need destination = \"kinesis\""
                ));
            }
        }
    }
}
