//! `[upstream]`: IoT Core's MQTT endpoint, where each device that receives gets its own
//! session under its client id.

use std::path::PathBuf;

use serde::Deserialize;

use super::Config;
use super::sinks::default_mqtt_port;

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// IoT Core's ATS endpoint (`xxxx-ats.iot.REGION.amazonaws.com`), or any MQTT 5
    /// broker with TLS.
    pub host: String,
    /// Default 8883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// PEM CA bundle for the endpoint. Relative paths: to the config file.
    pub ca: PathBuf,
    /// The gateway's PEM certificate: IoT Core's policy for it must let it connect as
    /// any client id of the fleet (Sluice's own policy decides what each device may do).
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// Most CONNECTs per second the gateway as a whole sends (IoT Core limits connect
    /// requests per account); each client id connects at most once a second whatever
    /// this says. Default 100.
    #[serde(default = "default_connects_per_sec")]
    pub connects_per_sec: u32,
    /// Keep-alive of the device sessions at the endpoint, in seconds (IoT Core: 30 to
    /// 1200). Default 300.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// How long a device's SUBSCRIBE or a request passed straight through (shadow,
    /// jobs, …) waits for the endpoint's answer before the device is told it failed.
    /// Default 10000.
    #[serde(default = "default_answer_timeout")]
    pub answer_timeout_ms: u64,
}

fn default_connects_per_sec() -> u32 {
    100
}

fn default_keep_alive() -> u16 {
    300
}

fn default_answer_timeout() -> u64 {
    10_000
}

impl Config {
    pub(super) fn validate_upstream(&self, problems: &mut Vec<String>) {
        let Some(upstream) = &self.upstream else {
            return;
        };
        super::check_tls_files(
            "upstream",
            &upstream.ca,
            &upstream.cert,
            &upstream.key,
            problems,
        );
        if upstream.connects_per_sec == 0 {
            problems.push("upstream.connects_per_sec must be at least 1".to_string());
        }
        if !(30..=1200).contains(&upstream.keep_alive_secs) {
            problems.push(format!(
                "upstream.keep_alive_secs: {} is outside IoT Core's 30 to 1200",
                upstream.keep_alive_secs
            ));
        }
        if upstream.answer_timeout_ms == 0 {
            problems.push("upstream.answer_timeout_ms must be at least 1".to_string());
        }
    }
}
