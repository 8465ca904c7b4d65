//! The configuration file (TOML): types, documented defaults, and validation that reports
//! every problem at once before anything binds a port.
//!
//! An empty file (or no file) is the embedded default: plain HTTP on loopback, no
//! plugins, every routed message written by the local sink under `./sluice-data`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::route::topic::{TopicFilter, validate_publish_topic};

/// Where the embedded default listens: loopback only, since it has no device auth yet.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the local sink and the plugin cache live unless configured.
pub const DEFAULT_DATA_DIR: &str = "sluice-data";
/// Kinesis' default maximum record size (1 MiB, data plus partition key).
pub const KINESIS_DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The largest record a stream can be raised to with `UpdateMaxRecordSize` (10 MiB).
pub const KINESIS_LARGEST_MAX_RECORD_BYTES: usize = 10 * 1024 * 1024;
/// AWS IoT Core's maximum message payload (128 KB).
pub const IOT_CORE_MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// The per-connection throughput IoT Core recommends staying under (512 KB/s).
pub const IOT_CORE_CONNECTION_BYTES_PER_SEC: u64 = 512 * 1024;
/// Per-call plugin time limit: generous for real transforms (µs per message), short
/// enough that a looping plugin holds a worker only briefly.
pub const DEFAULT_PLUGIN_TIMEOUT_MS: u64 = 200;
/// Per-instance plugin memory limit: ample for batch processing of IoT payloads.
pub const DEFAULT_PLUGIN_MEMORY_MIB: u64 = 64;
/// Most messages accepted in one batch request, like one Kinesis `PutRecords` call.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 500;
/// Largest batch request body, like one Kinesis `PutRecords` call (5 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, TLS and data directory.
    #[serde(default)]
    pub server: ServerConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The plugin host and the plugin chain.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The routing policy.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Region, endpoint and credentials for the AWS sinks.
    #[serde(default)]
    pub aws: AwsConfig,
    /// The cloud sinks; a destination without one goes to the local sink.
    #[serde(default)]
    pub sinks: SinksConfig,
    /// The spool between routing and the sinks.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The admin listener (dead letters, spool state).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Device authentication; present: every device must authenticate (no more
    /// `x-device-id`).
    pub auth: Option<AuthConfig>,
    /// What each device may do; enforced (default deny) when present or when `[auth]`
    /// is.
    pub policy: Option<PolicyConfig>,
    /// WebSocket sessions (`GET /ws`).
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// Commands from the cloud to devices, through an MQTT broker; absent: none.
    pub downlink: Option<DownlinkConfig>,
}

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

/// `[auth]`: how devices prove who they are. At least one method.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Client certificates (mutual TLS); needs `[server.tls]`.
    pub mtls: Option<MtlsConfig>,
    /// Short-lived signed tokens (JWT, HS256) in `Authorization: Bearer`.
    pub tokens: Option<TokensConfig>,
}

/// Where a client certificate names its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceIdSource {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS name among the subject alternative names.
    SanDns,
    /// The first URI among the subject alternative names.
    SanUri,
    /// The first e-mail address among the subject alternative names.
    SanEmail,
}

/// `[auth.mtls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM bundles of the CAs that sign device certificates ("bring your own CA").
    pub ca: Vec<PathBuf>,
    /// Where the device id is read from. Default `cn`.
    #[serde(default)]
    pub device_id: DeviceIdSource,
    /// Serial numbers of revoked certificates, in hex (colons allowed).
    #[serde(default)]
    pub revoked_serials: Vec<String>,
    /// SHA-256 fingerprints (of the DER certificate) of revoked certificates, in hex.
    #[serde(default)]
    pub revoked_fingerprints: Vec<String>,
}

/// `[auth.tokens]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// The `iss` claim tokens carry and must carry. Default `sluice`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Longest lifetime `sluice token issue` grants, in seconds. Default 86400.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
    /// The key `sluice token issue` signs with. Default: the last one listed.
    pub signing_key: Option<String>,
    /// Keys, by id (`kid`); all of them are accepted, so keys rotate by adding the new
    /// one, signing with it, and removing the old one once its tokens expired.
    pub keys: Vec<TokenKeyConfig>,
}

/// `[[auth.tokens.keys]]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyConfig {
    /// The key id, carried in each token's header.
    pub id: String,
    /// The shared secret (HMAC-SHA256), at least 32 bytes.
    pub secret: String,
}

impl fmt::Debug for TokenKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeyConfig")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `[policy]`: grants; what no grant allows is denied.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Grants, in order; the first that allows a publish also sets its limits.
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
}

/// `[[policy.grants]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Name reported when the grant's limits refuse a message.
    pub name: String,
    /// Devices it applies to, by id; `*` for every device.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Groups it applies to (token `groups`, certificate OUs).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Topic filters the devices may publish to; `${device.id}` is the device's id.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters the devices may receive commands on.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Messages per second per device (bursts up to this many).
    pub max_messages_per_sec: Option<u32>,
    /// Payload bytes per second per device (bursts up to this many).
    pub max_bytes_per_sec: Option<u32>,
    /// Largest payload per message.
    pub max_payload_bytes: Option<usize>,
}

/// When a device is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// After the message is written to the spool and the write is on disk (`fsync`,
    /// shared by every request in the same group commit). Survives a crash or power loss.
    Durable,
    /// As soon as the message is handed to its sink, before the sink confirms it.
    /// Faster, but a crash or a sink that stays unreachable loses what was in flight.
    BestEffort,
}

/// `[spool]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// When devices are acknowledged, unless a topic rule says otherwise. Default
    /// `durable`.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Most bytes of records waiting per sink; beyond it devices get `503` with
    /// `Retry-After`. Default 256 MiB.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes_per_sink: u64,
    /// Most best-effort messages handed to sinks and not yet confirmed; beyond it
    /// best-effort messages get `503`. Default 10000.
    #[serde(default = "default_best_effort_in_flight")]
    pub best_effort_max_in_flight: usize,
    /// Most bytes of dead letters kept. A request whose messages would be dead-lettered
    /// past it is refused (`503 dead_letters_full`), and expired records are dropped
    /// (counted) instead of kept. Records a sink refuses for good are kept past it: they
    /// were acknowledged. Default 1 GiB.
    #[serde(default = "default_dead_letter_bytes")]
    pub max_dead_letter_bytes: u64,
    /// What happens to a record whose `mqtt.message_expiry` passed before delivery:
    /// `dead-letter` (default) keeps it as a dead letter, `drop` drops it and counts it
    /// (`sluice_dead_letters_refused_total{status="expired_dropped"}`).
    #[serde(default = "default_expired")]
    pub expired: ExpiredPath,
}

/// `spool.expired`: what becomes of records that expired before delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpiredPath {
    /// Kept as dead letters (origin `expired`), up to `spool.max_dead_letter_bytes`.
    DeadLetter,
    /// Dropped and counted.
    Drop,
}

/// `[admin]`: the operators' API, on its own address.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; absent: no admin listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token every admin request must carry. Required with `listen`.
    pub token: Option<String>,
}

/// `[aws]`: shared by the AWS sinks. Credentials come from the standard AWS chain
/// (environment, shared profile files, web identity, container and instance roles).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region, e.g. `eu-west-1`; default: from the environment or profile.
    pub region: Option<String>,
    /// Endpoint for every AWS service, e.g. a local test server; default: AWS's own.
    pub endpoint_url: Option<String>,
}

/// `[sinks]`: the cloud sinks.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    /// Kinesis Data Streams; absent: Kinesis-bound messages go to the local sink.
    pub kinesis: Option<KinesisSinkConfig>,
    /// AWS IoT Core; absent: IoT Core-bound messages go to the local sink.
    pub iot_core: Option<IotCoreSinkConfig>,
}

/// `[sinks.kinesis]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSinkConfig {
    /// How long a `PutRecords` call waits for more records before it is sent. Default 10.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How long a window of spooled records waits for Kinesis to confirm them before the
    /// spool sends the window again. Default 10000.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Endpoint for Kinesis only, overriding `aws.endpoint_url`.
    pub endpoint_url: Option<String>,
    /// Streams whose records are KPL-aggregated (many user records per Kinesis record;
    /// consumers de-aggregate with the KCL or `aws-kinesis-agg`). Default: none.
    #[serde(default)]
    pub aggregate_streams: Vec<String>,
    /// Put each message on the stream as a JSON envelope carrying its id, device, topic,
    /// time and payload (the local sink's line format) instead of the bare payload, so
    /// consumers can drop the duplicates at-least-once delivery may bring. Default false.
    #[serde(default)]
    pub envelope: bool,
}

/// How the IoT Core sink talks to IoT Core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IotTransport {
    /// One persistent MQTT connection with the gateway's certificate.
    Mqtt,
    /// The IoT data-plane HTTPS `Publish` API, SigV4-signed.
    Https,
}

/// `[sinks.iot_core]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotCoreSinkConfig {
    /// `mqtt` or `https`.
    pub transport: IotTransport,
    /// How long a window of spooled records waits for IoT Core's confirmations before
    /// the spool sends the window again. Default 10000.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Publish through Basic Ingest to this IoT rule (`$aws/rules/<rule>/<topic>`).
    pub basic_ingest_rule: Option<String>,
    /// With `https`: endpoint for IoT data plane only, overriding `aws.endpoint_url`
    /// (the account's `https://<prefix>-ats.iot.<region>.amazonaws.com`).
    pub endpoint_url: Option<String>,
    /// With `mqtt`: the connection.
    pub mqtt: Option<MqttSinkConfig>,
}

/// `[sinks.iot_core.mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// The account's IoT Core endpoint host.
    pub host: String,
    /// Default 8883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// MQTT client id. Default `sluice-gateway`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// PEM CA bundle for the broker's certificate (Amazon Root CA 1 for IoT Core).
    pub ca: PathBuf,
    /// The gateway's PEM certificate (registered in IoT Core).
    pub cert: PathBuf,
    /// The gateway's PEM private key.
    pub key: PathBuf,
    /// MQTT keep-alive in seconds. Default 30.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
}

fn default_linger_ms() -> u64 {
    10
}
fn default_delivery_timeout_ms() -> u64 {
    10_000
}
fn default_mqtt_port() -> u16 {
    8883
}
fn default_client_id() -> String {
    "sluice-gateway".to_string()
}
fn default_keep_alive() -> u64 {
    30
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
    /// Serve HTTPS with this certificate; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// On SIGTERM or Ctrl-C: how long to keep delivering spooled records after the last
    /// request finished, before exiting with the rest left in the spool. Default 10000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
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
    /// Seconds a client has to send a request's headers once it started (HTTP/1.1).
    /// Default 10.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// A connection on which nothing was read or written for this many seconds is
    /// closed (long polls wait at most 60 s, WebSocket sessions ping more often than
    /// this). Default 90.
    #[serde(default = "default_connection_idle")]
    pub idle_timeout_secs: u64,
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
}

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

fn default_issuer() -> String {
    "sluice".to_string()
}
fn default_max_ttl() -> u64 {
    86_400
}
fn default_durability() -> Durability {
    Durability::Durable
}
fn default_spool_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_best_effort_in_flight() -> usize {
    10_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_dead_letter_bytes() -> u64 {
    1 << 30
}
fn default_expired() -> ExpiredPath {
    ExpiredPath::DeadLetter
}
fn default_max_connections() -> usize {
    10_000
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

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            tls: None,
            shutdown_grace_ms: default_shutdown_grace_ms(),
            allow_unauthenticated: false,
            max_connections: default_max_connections(),
            handshake_timeout_secs: default_handshake_timeout(),
            header_timeout_secs: default_header_timeout(),
            idle_timeout_secs: default_connection_idle(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            durability: Durability::Durable,
            max_bytes_per_sink: default_spool_bytes(),
            best_effort_max_in_flight: default_best_effort_in_flight(),
            max_dead_letter_bytes: default_dead_letter_bytes(),
            expired: default_expired(),
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

/// Everything wrong with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// The file parsed, but some values are wrong.
    #[error("{}", Problems(.0))]
    Invalid(Vec<String>),
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative plugin paths are
    /// resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let relative_to_file = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
            // Absolute, so that hot-reload events name the same file.
            if let Ok(absolute) = std::path::absolute(&*path) {
                *path = absolute;
            }
        };
        let plugins = config
            .plugins
            .transform
            .iter_mut()
            .chain(config.plugins.router.as_mut());
        for entry in plugins {
            relative_to_file(&mut entry.path);
        }
        if let Some(tls) = config.server.tls.as_mut() {
            relative_to_file(&mut tls.cert);
            relative_to_file(&mut tls.key);
        }
        if let Some(downlink) = config.downlink.as_mut() {
            for path in [&mut downlink.ca, &mut downlink.cert, &mut downlink.key] {
                relative_to_file(path);
            }
        }
        if let Some(mtls) = config.auth.as_mut().and_then(|auth| auth.mtls.as_mut()) {
            for path in &mut mtls.ca {
                relative_to_file(path);
            }
        }
        if let Some(mqtt) = config
            .sinks
            .iot_core
            .as_mut()
            .and_then(|iot| iot.mqtt.as_mut())
        {
            for path in [&mut mqtt.ca, &mut mqtt.cert, &mut mqtt.key] {
                relative_to_file(path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    /// The directory of compiled plugins.
    pub fn cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("plugin-cache"))
    }

    /// Checks every value and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
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
        if server.max_connections == 0 {
            problems.push("server.max_connections must be at least 1".to_string());
        }
        for (name, secs) in [
            ("handshake_timeout_secs", server.handshake_timeout_secs),
            ("header_timeout_secs", server.header_timeout_secs),
            ("idle_timeout_secs", server.idle_timeout_secs),
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
        self.validate_plugins(&mut problems);
        self.validate_routing(&mut problems);
        self.validate_sinks(&mut problems);
        self.validate_spool_and_admin(&mut problems);
        self.validate_auth_and_policy(&mut problems);
        self.validate_websocket(&mut problems);
        self.validate_downlink(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate_downlink(&self, problems: &mut Vec<String>) {
        let Some(downlink) = &self.downlink else {
            return;
        };
        for (what, path) in [
            ("ca", &downlink.ca),
            ("cert", &downlink.cert),
            ("key", &downlink.key),
        ] {
            if !path.is_file() {
                problems.push(format!(
                    "downlink.{what}: {} does not exist",
                    path.display()
                ));
            }
        }
        for (what, pattern) in [
            ("command_topic", &downlink.command_topic),
            ("reply_topic", &downlink.reply_topic),
            ("presence_topic", &downlink.presence_topic),
        ] {
            let levels: Vec<&str> = pattern.split('/').collect();
            if levels.iter().filter(|l| **l == "${device.id}").count() != 1 {
                problems.push(format!(
                    "downlink.{what}: `{pattern}` must have `${{device.id}}` as exactly one whole level"
                ));
            }
            let before = levels.iter().take_while(|l| **l != "${device.id}");
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

    fn validate_websocket(&self, problems: &mut Vec<String>) {
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

    fn validate_auth_and_policy(&self, problems: &mut Vec<String>) {
        if let Some(auth) = &self.auth {
            if auth.mtls.is_none() && auth.tokens.is_none() {
                problems.push("[auth] needs [auth.mtls], [auth.tokens] or both".to_string());
            }
            if let Some(mtls) = &auth.mtls {
                if self.server.tls.is_none() {
                    problems.push(
                        "auth.mtls needs [server.tls]: client certificates come with TLS"
                            .to_string(),
                    );
                }
                if mtls.ca.is_empty() {
                    problems.push("auth.mtls.ca must name at least one CA bundle".to_string());
                }
                for path in &mtls.ca {
                    if !path.is_file() {
                        problems.push(format!("auth.mtls.ca: {} does not exist", path.display()));
                    }
                }
                for (what, list) in [
                    ("revoked_serials", &mtls.revoked_serials),
                    ("revoked_fingerprints", &mtls.revoked_fingerprints),
                ] {
                    for value in list {
                        if parse_hex(value).is_none() {
                            problems.push(format!("auth.mtls.{what}: `{value}` is not hex"));
                        }
                    }
                }
            }
            if let Some(tokens) = &auth.tokens {
                if tokens.keys.is_empty() {
                    problems.push("auth.tokens.keys must list at least one key".to_string());
                }
                let mut ids = std::collections::BTreeSet::new();
                for key in &tokens.keys {
                    if !ids.insert(key.id.as_str()) {
                        problems.push(format!("auth.tokens.keys: id `{}` appears twice", key.id));
                    }
                    if key.secret.len() < 32 {
                        problems.push(format!(
                            "auth.tokens.keys: the secret of `{}` must be at least 32 bytes",
                            key.id
                        ));
                    }
                }
                if let Some(signing) = &tokens.signing_key
                    && !ids.contains(signing.as_str())
                {
                    problems.push(format!("auth.tokens.signing_key: no key `{signing}`"));
                }
                if tokens.max_ttl_secs == 0 {
                    problems.push("auth.tokens.max_ttl_secs must be at least 1".to_string());
                }
            }
            if self.policy.as_ref().is_none_or(|p| p.grants.is_empty()) {
                problems.push(
                    "[auth] is set but no [[policy.grants]]: every device would be denied everything"
                        .to_string(),
                );
            }
        }
        if let Some(policy) = &self.policy {
            let mut names = std::collections::BTreeSet::new();
            for grant in &policy.grants {
                let at = format!("policy.grants `{}`", grant.name);
                if !names.insert(grant.name.as_str()) {
                    problems.push(format!("{at}: the name appears twice"));
                }
                if grant.devices.is_empty() && grant.groups.is_empty() {
                    problems.push(format!("{at}: give `devices` or `groups`"));
                }
                for filter in grant.publish.iter().chain(&grant.subscribe) {
                    let sample = filter.replace("${device.id}", "device");
                    if let Err(why) = TopicFilter::parse(&sample) {
                        problems.push(format!("{at}: filter `{filter}`: {why}"));
                    }
                }
                for (what, value) in [
                    ("max_messages_per_sec", grant.max_messages_per_sec),
                    ("max_bytes_per_sec", grant.max_bytes_per_sec),
                ] {
                    if value == Some(0) {
                        problems.push(format!("{at}: {what} must be at least 1"));
                    }
                }
            }
        }
    }

    fn validate_spool_and_admin(&self, problems: &mut Vec<String>) {
        let spool = &self.spool;
        // A queue smaller than one request could never take that request.
        if spool.max_bytes_per_sink < 2 * self.limits.max_batch_bytes as u64 {
            problems.push(format!(
                "spool.max_bytes_per_sink must be at least twice limits.max_batch_bytes ({} bytes), not {}",
                2 * self.limits.max_batch_bytes,
                spool.max_bytes_per_sink
            ));
        }
        if spool.best_effort_max_in_flight == 0 {
            problems.push("spool.best_effort_max_in_flight must be at least 1".to_string());
        }
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

    fn validate_plugins(&self, problems: &mut Vec<String>) {
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

    fn validate_sinks(&self, problems: &mut Vec<String>) {
        if let Some(kinesis) = &self.sinks.kinesis {
            if kinesis.linger_ms > 1000 {
                problems.push(format!(
                    "sinks.kinesis.linger_ms must be 0 to 1000, not {}",
                    kinesis.linger_ms
                ));
            }
            if kinesis.delivery_timeout_ms == 0 {
                problems.push("sinks.kinesis.delivery_timeout_ms must be at least 1".to_string());
            }
            for stream in &kinesis.aggregate_streams {
                if let Err(why) = validate_stream_name(stream) {
                    problems.push(format!("sinks.kinesis.aggregate_streams: {why}"));
                }
            }
        }
        let Some(iot) = &self.sinks.iot_core else {
            return;
        };
        if iot.delivery_timeout_ms == 0 {
            problems.push("sinks.iot_core.delivery_timeout_ms must be at least 1".to_string());
        }
        if let Some(rule) = &iot.basic_ingest_rule
            && (rule.is_empty() || !rule.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            problems.push(format!(
                    "sinks.iot_core.basic_ingest_rule `{rule}` is not an IoT rule name (a-z, A-Z, 0-9, `_`)"
                ));
        }
        match (iot.transport, &iot.mqtt) {
            (IotTransport::Mqtt, None) => {
                problems.push(
                    "sinks.iot_core: transport \"mqtt\" needs [sinks.iot_core.mqtt]".to_string(),
                );
            }
            (IotTransport::Mqtt, Some(mqtt)) => {
                for (what, path) in [("ca", &mqtt.ca), ("cert", &mqtt.cert), ("key", &mqtt.key)] {
                    if !path.is_file() {
                        problems.push(format!(
                            "sinks.iot_core.mqtt.{what}: file {} does not exist",
                            path.display()
                        ));
                    }
                }
                if mqtt.client_id.is_empty() || mqtt.client_id.len() > 128 {
                    problems.push(
                        "sinks.iot_core.mqtt.client_id must be 1 to 128 characters".to_string(),
                    );
                }
            }
            (IotTransport::Https, Some(_)) => {
                problems.push(
                    "sinks.iot_core: [sinks.iot_core.mqtt] is set but transport is \"https\""
                        .to_string(),
                );
            }
            (IotTransport::Https, None) => {}
        }
    }

    fn validate_routing(&self, problems: &mut Vec<String>) {
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
                    1..=256 => Ok(()),
                    n => Err(format!(
                        "a partition key must be 1 to 256 characters, not {n}"
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

/// Checks a template: it must parse, and a template without variables must be valid as
/// it stands (one with variables is checked per message, when it is filled in).
fn check_template(
    text: &str,
    at: &str,
    validate: impl Fn(&str) -> Result<(), String>,
    problems: &mut Vec<String>,
) {
    match crate::route::template::Template::parse(text) {
        Err(why) => problems.push(format!("{at}: {why}")),
        Ok(template) if !text.contains("${") => {
            if let Err(why) = validate(&template.sample()) {
                problems.push(format!("{at}: {why}"));
            }
        }
        Ok(_) => {}
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

/// Kinesis stream names: 1 to 128 characters of `a-z A-Z 0-9 _ . -`.
pub fn validate_stream_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.is_empty() || name.len() > 128 || !valid_chars {
        return Err(format!(
            "`{name}` is not a Kinesis stream name (1 to 128 of a-z, A-Z, 0-9, `_`, `.`, `-`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(config.server.tls.is_none());
        assert!(config.plugins.transform.is_empty());
        assert_eq!(config.routing.kinesis_max_record_bytes, 1024 * 1024);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let error = Config::parse("[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(error.contains("listen_on"), "{error}");
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let config = Config::parse(
            r#"
            [plugins]
            workers = 0
            memory_limit_mib = 0
            [[plugins.transform]]
            name = "a"
            path = "/nonexistent/a.wasm"
            config = { list = [1, 2] }
            [[plugins.transform]]
            name = "a"
            path = "/nonexistent/b.wasm"
            [routing]
            kinesis_max_record_bytes = 20000000
            kinesis_stream = "bad stream"
            [[routing.rules]]
            name = "r"
            topic = "a/#/b"
            destination = "kinesis"
            qos = 2
            "#,
        )
        .unwrap();
        let ConfigError::Invalid(problems) = config.validate().unwrap_err() else {
            panic!("expected validation problems");
        };
        let all = problems.join("\n");
        for expected in [
            "plugins.workers",
            "memory_limit_mib",
            "/nonexistent/a.wasm",
            "/nonexistent/b.wasm",
            "`a` is used twice",
            "config `list`",
            "kinesis_max_record_bytes",
            "`bad stream`",
            "topic filter",
            "qos must be 0 or 1",
            "need destination = \"iot-core\"",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(problems.len(), 11, "{all}");
    }
}

/// Hex digits (colons and spaces allowed between them) as bytes, as certificate serial
/// numbers and fingerprints are written in `[auth.mtls]`.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits: String = text.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
    if digits.is_empty() {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    hex::decode(padded).ok()
}
