//! `[server]`, `[limits]`, `[admin]` and `[websocket]`: where devices connect, what a
//! request may carry, the operators' listener, and WebSocket sessions.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Config;
use crate::quota::KINESIS_DEFAULT_MAX_RECORD_BYTES;

/// Where the embedded default listens: loopback only, since it has no device auth yet.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Where the local sink and the plugin cache live unless configured.
pub const DEFAULT_DATA_DIR: &str = "sluice-data";

/// Most messages accepted in one batch request, like one Kinesis `PutRecords` call.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 500;

/// Largest batch request body, like one Kinesis `PutRecords` call (5 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;

/// `[websocket]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Messages a device may have sent and not yet had acknowledged; the gateway stops
    /// reading from a device at its window (the device is slowed, not dropped). Default 64.
    #[serde(default = "default_ws_window")]
    pub window: usize,
    /// Largest frame (and message) accepted; a larger one closes the session with 1009.
    /// Default 1 MiB + 64 KiB (a record-sized payload with its framing).
    #[serde(default = "default_ws_max_frame")]
    pub max_frame_bytes: usize,
    /// How often the gateway pings. Default 20.
    #[serde(default = "default_ws_ping")]
    pub ping_interval_secs: u64,
    /// A session that sends nothing (not even a pong) for this long is closed with 4000.
    /// Default 60.
    #[serde(default = "default_ws_idle")]
    pub idle_timeout_secs: u64,
}

fn default_ws_window() -> usize {
    64
}

fn default_ws_max_frame() -> usize {
    KINESIS_DEFAULT_MAX_RECORD_BYTES + 64 * 1024
}

fn default_ws_ping() -> u64 {
    20
}

fn default_ws_idle() -> u64 {
    60
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            window: default_ws_window(),
            max_frame_bytes: default_ws_max_frame(),
            ping_interval_secs: default_ws_ping(),
            idle_timeout_secs: default_ws_idle(),
        }
    }
}

/// `[admin]`: the operators' API, on its own address.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; absent: no admin listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token every admin request must carry. Required with `listen`.
    pub token: Option<String>,
}

/// The token stays out of logs and the console's view of the configuration.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[server]`: where devices connect and where data is kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for device traffic. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Local sink files and the compiled-plugin cache. Default `./sluice-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This instance's name among the instances that serve one fleet (1 to 64 characters
    /// of `A-Z a-z 0-9 _ -`); the gateway's own connections at IoT Core are named after
    /// it (`sinks.iot_core.mqtt.client_id`). Default: an id made at the first start and
    /// kept in `<data_dir>/instance-id`.
    pub instance_id: Option<String>,
    /// Serve HTTPS with this certificate; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// On SIGTERM or Ctrl-C: how long requests in flight and device sessions may take to
    /// finish, and then how long to keep delivering spooled records, before exiting with
    /// the rest left in the spool. Default 10000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, Ctrl-C or `sluice drain`: how long the gateway *leaves* before it
    /// stops accepting and ends sessions: `/readyz` answers 503 and HTTP requests `503
    /// leaving` with `Retry-After` and `Connection: close`, so that a load balancer's
    /// health check takes the instance out first. Set it above the balancer's check
    /// interval times its fall count. Default 0.
    #[serde(default)]
    pub leave_delay_ms: u64,
    /// Without `[auth]` the device id is whatever a client says (`x-device-id`), so the
    /// gateway refuses to start on an address other than loopback unless this is `true`.
    /// Default `false`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Most device connections open at once; further ones are closed as soon as they are
    /// accepted (`sluice_connections_closed_total{reason="refused_full"}`). Default
    /// 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has for its TLS handshake. Default 10.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send its first request's headers once it connected
    /// (HTTP/1.1); a kept-alive connection waits up to `idle_timeout_secs` for a later
    /// request's. Default 10.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// A connection on which nothing was read or written for this many seconds is
    /// closed (long polls wait at most 60 s, WebSocket sessions ping more often than
    /// this). Default 90.
    #[serde(default = "default_connection_idle")]
    pub idle_timeout_secs: u64,
    /// A write to a client that makes no progress for this many seconds (the client
    /// stopped reading and its TCP window is full) ends the connection, whatever it
    /// carries: HTTP, the WebSocket dialect, MQTT. Default 30.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_secs: u64,
}

/// `[server.tls]`: the gateway's own certificate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Relative paths: to the config file.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[limits]`: what one request may carry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most messages in one `POST /batch`. Default 500.
    #[serde(default = "default_max_batch_messages")]
    pub max_batch_messages: usize,
    /// Largest `POST /batch` body in bytes. Default 5 MiB.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Most attributes one message may carry (batch `attributes`, the MQTT 5 parameters
    /// of the publish API). Default 32.
    #[serde(default = "default_max_attributes")]
    pub max_attributes: usize,
    /// Most bytes of attribute names and values one message may carry; they count
    /// with the payload against the record limit and a grant's `max_payload_bytes` and
    /// `max_bytes_per_sec`. Default 8192, IoT Core's limit for MQTT 5 user properties.
    #[serde(default = "default_max_attribute_bytes")]
    pub max_attribute_bytes: usize,
}

fn default_shutdown_grace_ms() -> u64 {
    10_000
}

fn default_max_connections() -> usize {
    10_000
}

fn default_write_timeout() -> u64 {
    30
}

fn default_handshake_timeout() -> u64 {
    10
}

fn default_header_timeout() -> u64 {
    10
}

fn default_connection_idle() -> u64 {
    90
}

fn default_max_attributes() -> usize {
    32
}

fn default_max_attribute_bytes() -> usize {
    8 * 1024
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("the default listen address parses")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

fn default_max_batch_messages() -> usize {
    DEFAULT_MAX_BATCH_MESSAGES
}

fn default_max_batch_bytes() -> usize {
    DEFAULT_MAX_BATCH_BYTES
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            instance_id: None,
            tls: None,
            shutdown_grace_ms: default_shutdown_grace_ms(),
            leave_delay_ms: 0,
            allow_unauthenticated: false,
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake_timeout(),
            header_timeout_secs: default_header_timeout(),
            idle_timeout_secs: default_connection_idle(),
            write_timeout_secs: default_write_timeout(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_attributes: default_max_attributes(),
            max_attribute_bytes: default_max_attribute_bytes(),
        }
    }
}

impl Config {
    pub(super) fn validate_server(&self, problems: &mut Vec<String>) {
        if let Some(tls) = &self.server.tls {
            for (what, path) in [("certificate", &tls.cert), ("key", &tls.key)] {
                if !path.is_file() {
                    problems.push(format!(
                        "server.tls: {what} file {} does not exist",
                        path.display()
                    ));
                }
            }
        }
        let limits = &self.limits;
        if limits.max_batch_messages == 0 {
            problems.push("limits.max_batch_messages must be at least 1".to_string());
        }
        if limits.max_batch_bytes < 1024 {
            problems.push("limits.max_batch_bytes must be at least 1024".to_string());
        }
        let server = &self.server;
        if self.auth.is_none() && !server.listen.ip().is_loopback() && !server.allow_unauthenticated
        {
            problems.push(format!(
                "server.listen: {} is not a loopback address, and without [auth] any client \
                 could name itself any device (x-device-id); configure [auth], listen on \
                 127.0.0.1, or set server.allow_unauthenticated = true",
                server.listen
            ));
        }
        if let Some(id) = &server.instance_id
            && !crate::instance::valid(id)
        {
            problems.push(format!(
                "server.instance_id {id:?} must be 1 to 64 characters of A-Z a-z 0-9 _ -"
            ));
        }
        if server.max_connections == 0 {
            problems.push("server.max_connections must be at least 1".to_string());
        }
        for (name, secs) in [
            ("handshake_timeout_secs", server.handshake_timeout_secs),
            ("header_timeout_secs", server.header_timeout_secs),
            ("idle_timeout_secs", server.idle_timeout_secs),
            ("write_timeout_secs", server.write_timeout_secs),
        ] {
            if secs == 0 {
                problems.push(format!("server.{name} must be at least 1"));
            }
        }
        if server.idle_timeout_secs <= 60 {
            problems.push(format!(
                "server.idle_timeout_secs must be over 60 (the longest long poll), not {}",
                server.idle_timeout_secs
            ));
        }
    }

    pub(super) fn validate_admin(&self, problems: &mut Vec<String>) {
        let admin = &self.admin;
        match (&admin.listen, &admin.token) {
            (Some(_), None) => problems.push(
                "admin.token is required when admin.listen is set (every admin request must carry it)"
                    .to_string(),
            ),
            (_, Some(token)) if token.len() < 16 => {
                problems.push("admin.token must be at least 16 characters".to_string())
            }
            _ => {}
        }
        if admin
            .listen
            .is_some_and(|a| a.port() != 0 && a == self.server.listen)
        {
            problems.push("admin.listen must differ from server.listen".to_string());
        }
    }

    pub(super) fn validate_websocket(&self, problems: &mut Vec<String>) {
        let ws = &self.websocket;
        if ws.window == 0 || ws.window > 10_000 {
            problems.push(format!(
                "websocket.window must be 1 to 10000, not {}",
                ws.window
            ));
        }
        if ws.max_frame_bytes < 1024 {
            problems.push("websocket.max_frame_bytes must be at least 1024".to_string());
        }
        if ws.ping_interval_secs == 0 || ws.idle_timeout_secs <= ws.ping_interval_secs {
            problems.push(
                "websocket.ping_interval_secs must be at least 1 and below idle_timeout_secs"
                    .to_string(),
            );
        }
        if ws.ping_interval_secs >= self.server.idle_timeout_secs {
            problems.push(format!(
                "websocket.ping_interval_secs ({}) must be below server.idle_timeout_secs ({}): \
                 the pings keep a quiet session's connection from counting as idle",
                ws.ping_interval_secs, self.server.idle_timeout_secs
            ));
        }
    }
}
