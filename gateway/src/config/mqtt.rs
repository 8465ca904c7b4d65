//! `[mqtt]`: devices speaking MQTT 3.1.1 or 5.0, over TLS (its own port, or the device
//! listener's by ALPN) and over WebSocket (`GET /mqtt`).

use std::net::SocketAddr;

use serde::Deserialize;

use super::{Config, FailurePath};

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Its own port (8883 by convention): TLS with `[server.tls]` (client certificates
    /// as for HTTPS), else plain TCP, on loopback only. Absent: none.
    pub listen: Option<SocketAddr>,
    /// MQTT over WebSocket at `GET /mqtt` on the device listener (subprotocol `mqtt`).
    /// Default `true`.
    #[serde(default = "default_true")]
    pub websocket: bool,
    /// Most QoS 1 publishes a connection may have unacknowledged (the receive maximum
    /// announced to MQTT 5 clients; IoT Core's is 100). Default 100.
    #[serde(default = "default_window")]
    pub window: u16,
    /// Largest packet taken; a larger one closes the connection (MQTT 5: 0x95). Default
    /// the Kinesis record limit plus 64 KiB.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Seconds a client has for its CONNECT. Default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// How long a persistent session at IoT Core (3.1.1: clean session off; 5.0: clean
    /// start off) outlives its connection, in seconds: what a 3.1.1 session gets, and
    /// the most a 5.0 client's session expiry may ask for. 0: sessions end with their
    /// connection. Default 3600 (IoT Core's).
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// What an MQTT 3.1.1 publish that a plugin refuses or fails on gets (3.1.1 has no
    /// negative PUBACK): `"dead-letter"` keeps it in the dead-letter store with the
    /// reason and acknowledges it, so that the device does not send it again for ever;
    /// `"reject"` closes the connection unacknowledged, as `plugins.on_failure =
    /// "reject"` would. Default `"dead-letter"`. MQTT 5 clients get PUBACK 0x83 with the
    /// reason under `plugins.on_failure`.
    #[serde(default = "default_v311_plugin_failure")]
    pub v311_plugin_failure: FailurePath,
    /// Where MQTT 5 clients are sent when this instance leaves (SIGTERM, `sluice admin
    /// drain`): DISCONNECT 0x9C (use another server) with this as its Server Reference
    /// (`host[:port]`, as MQTT 5 §4.11 has it: another site, the new name of a moved
    /// fleet). Absent: DISCONNECT 0x8B (server shutting down), and clients reconnect where
    /// they were configured to (behind a load balancer, to another instance).
    pub server_reference: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_window() -> u16 {
    100
}
fn default_max_packet() -> usize {
    crate::quota::KINESIS_DEFAULT_MAX_RECORD_BYTES + 64 * 1024
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_v311_plugin_failure() -> FailurePath {
    FailurePath::DeadLetter
}
fn default_session_expiry() -> u32 {
    3600
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: None,
            websocket: true,
            window: default_window(),
            max_packet_bytes: default_max_packet(),
            connect_timeout_secs: default_connect_timeout(),
            session_expiry_secs: default_session_expiry(),
            v311_plugin_failure: default_v311_plugin_failure(),
            server_reference: None,
        }
    }
}

impl Config {
    pub(super) fn validate_mqtt(&self, problems: &mut Vec<String>) {
        let mqtt = &self.mqtt;
        if mqtt.window == 0 {
            problems.push("mqtt.window must be at least 1".to_string());
        }
        if mqtt.max_packet_bytes < 1024 {
            problems.push("mqtt.max_packet_bytes must be at least 1024".to_string());
        }
        if mqtt
            .server_reference
            .as_ref()
            .is_some_and(|r| r.is_empty() || r.len() > 1024 || r.contains(char::is_whitespace))
        {
            problems.push(
                "mqtt.server_reference must be host[:port], 1 to 1024 characters without spaces"
                    .to_string(),
            );
        }
        if mqtt.connect_timeout_secs == 0 {
            problems.push("mqtt.connect_timeout_secs must be at least 1".to_string());
        }
        if let Some(listen) = mqtt.listen {
            if self.server.tls.is_none() && !listen.ip().is_loopback() {
                problems.push(format!(
                    "mqtt.listen: {listen} is not loopback, and without [server.tls] MQTT would be plain TCP; configure [server.tls] or listen on 127.0.0.1"
                ));
            }
            if listen.port() != 0 && listen == self.server.listen {
                problems.push("mqtt.listen must differ from server.listen".to_string());
            }
        }
    }
}
