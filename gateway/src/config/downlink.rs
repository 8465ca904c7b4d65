//! `[downlink]`: commands from the cloud to devices, through an MQTT broker.

use std::path::PathBuf;

use serde::Deserialize;

use super::Config;
use super::sinks::default_mqtt_port;

/// `[downlink]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    /// The broker (IoT Core's ATS endpoint, or any MQTT broker with TLS).
    pub host: String,
    /// Default 8883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// PEM CA bundle for the broker. Relative paths: to the config file.
    pub ca: PathBuf,
    /// The gateway's PEM certificate.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// The MQTT client id is this, a dash, and the instance id. Default `sluice-downlink`.
    #[serde(default = "default_downlink_client")]
    pub client_id_prefix: String,
    /// This instance's id (in presence messages and the client id); default: random.
    pub instance_id: Option<String>,
    /// Where commands for a device arrive; `${device.id}` is one whole level. Default
    /// `cmd/${device.id}/#`.
    #[serde(default = "default_command_topic")]
    pub command_topic: String,
    /// Where a device's replies and expiry reports go. Default `cmd-reply/${device.id}`.
    #[serde(default = "default_reply_topic")]
    pub reply_topic: String,
    /// Retained presence per device, shared by instances. Default
    /// `sluice/presence/${device.id}`.
    #[serde(default = "default_presence_topic")]
    pub presence_topic: String,
    /// How long a command waits for an offline device. Default 300.
    #[serde(default = "default_queue_ttl")]
    pub queue_ttl_secs: u64,
    /// Most commands waiting per device; the oldest go first. Default 100.
    #[serde(default = "default_queue_depth")]
    pub queue_max_depth: usize,
}

fn default_downlink_client() -> String {
    "sluice-downlink".to_string()
}

fn default_command_topic() -> String {
    "cmd/${device.id}/#".to_string()
}

fn default_reply_topic() -> String {
    "cmd-reply/${device.id}".to_string()
}

fn default_presence_topic() -> String {
    "sluice/presence/${device.id}".to_string()
}

fn default_queue_ttl() -> u64 {
    300
}

fn default_queue_depth() -> usize {
    100
}

impl Config {
    pub(super) fn validate_downlink(&self, problems: &mut Vec<String>) {
        let Some(downlink) = &self.downlink else {
            return;
        };
        super::check_tls_files(
            "downlink",
            &downlink.ca,
            &downlink.cert,
            &downlink.key,
            problems,
        );
        for (what, pattern) in [
            ("command_topic", &downlink.command_topic),
            ("reply_topic", &downlink.reply_topic),
            ("presence_topic", &downlink.presence_topic),
        ] {
            let levels: Vec<&str> = pattern.split('/').collect();
            if levels
                .iter()
                .filter(|l| **l == crate::template::DEVICE_ID)
                .count()
                != 1
            {
                problems.push(format!(
                    "downlink.{what}: `{pattern}` must have `${{device.id}}` as exactly one whole level"
                ));
            }
            let before = levels
                .iter()
                .take_while(|l| **l != crate::template::DEVICE_ID);
            if before.clone().any(|l| l.contains(['+', '#'])) || pattern.contains("+") {
                problems.push(format!(
                    "downlink.{what}: `{pattern}` may end in `/#` but has no other wildcards"
                ));
            }
            if what != "command_topic" && pattern.contains('#') {
                problems.push(format!("downlink.{what}: `{pattern}` must not contain `#`"));
            }
        }
        if downlink.queue_max_depth == 0 || downlink.queue_ttl_secs == 0 {
            problems
                .push("downlink.queue_max_depth and queue_ttl_secs must be at least 1".to_string());
        }
    }
}
