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
    /// 1200); a Server Keep Alive in the endpoint's CONNACK overrides it. Default 300.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// How long a device's SUBSCRIBE or a request passed straight through (shadow,
    /// jobs, …) waits for the endpoint's answer before the device is told it failed.
    /// Default 10000.
    #[serde(default = "default_answer_timeout")]
    pub answer_timeout_ms: u64,
    /// What devices that cannot subscribe themselves (the `sluice.v1` WebSocket dialect,
    /// HTTP long-polls) receive: these filters are subscribed on their sessions, as far
    /// as the policy's `subscribe` grants allow (`${device.id}` is the device's id).
    /// MQTT devices subscribe to what they want instead. Default
    /// `["cmd/${device.id}/#"]`.
    #[serde(default = "default_command_topics")]
    pub command_topics: Vec<String>,
    /// Where the replies of those devices go (`command_reply` frames,
    /// `POST /commands/{id}/reply`) when the command named no MQTT 5 response topic.
    /// Default `cmd-reply/${device.id}`.
    #[serde(default = "default_reply_topic")]
    pub reply_topic: String,
    /// How long IoT Core keeps the session of such a device after its connection ends
    /// (it queues QoS 1 commands meanwhile), and how long an HTTP device's session stays
    /// connected after its last long-poll. IoT Core: at most 604800 (7 days). Default
    /// 3600.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
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

fn default_command_topics() -> Vec<String> {
    vec!["cmd/${device.id}/#".to_string()]
}

fn default_reply_topic() -> String {
    "cmd-reply/${device.id}".to_string()
}

fn default_session_expiry() -> u32 {
    3600
}

/// IoT Core's longest session expiry (7 days).
const MAX_SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

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
        if !(1..=MAX_SESSION_EXPIRY_SECS).contains(&upstream.session_expiry_secs) {
            problems.push(format!(
                "upstream.session_expiry_secs: {} is outside 1 to IoT Core's {MAX_SESSION_EXPIRY_SECS}",
                upstream.session_expiry_secs
            ));
        }
        if upstream.command_topics.len() > crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS {
            problems.push(format!(
                "upstream.command_topics: {} filters, over IoT Core's {} per session",
                upstream.command_topics.len(),
                crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS
            ));
        }
        // Checked with a sample id in place of `${device.id}`.
        let sample = |pattern: &str| crate::template::for_device(pattern, "device-1");
        for filter in &upstream.command_topics {
            if let Err(error) = crate::topic::TopicFilter::parse(&sample(filter)) {
                problems.push(format!(
                    "upstream.command_topics: `{filter}` is not a topic filter: {error}"
                ));
            }
        }
        if let Err(error) = crate::topic::validate_publish_topic(&sample(&upstream.reply_topic)) {
            problems.push(format!(
                "upstream.reply_topic: `{}` is not a topic name: {error}",
                upstream.reply_topic
            ));
        }
    }
}
