//! `[aws]` and `[sinks]`: the cloud sinks (Kinesis, IoT Core over MQTT or HTTPS).

use std::path::PathBuf;

use serde::Deserialize;

use super::Config;

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
    /// IoT Core's HTTPS data plane (the `https` transport's publishes, the Device Shadow
    /// routes), overriding `aws.endpoint_url` (the account's
    /// `https://<prefix>-ats.iot.<region>.amazonaws.com`).
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
    /// MQTT client id; `${instance.id}` in it stands for the instance id
    /// (`server.instance_id`). IoT Core keeps one connection per client id, so instances
    /// that share a configuration need it. Default `sluice-gateway-${instance.id}`.
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

/// IoT Core's MQTT port (TLS), also the default of `[upstream]`.
pub(super) fn default_mqtt_port() -> u16 {
    8883
}

fn default_client_id() -> String {
    format!("sluice-gateway-{}", crate::instance::PLACEHOLDER)
}

fn default_keep_alive() -> u64 {
    30
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

impl Config {
    /// The IoT Core sink's MQTT connection: `[sinks.iot_core.mqtt]`, or (transport
    /// `mqtt` without it) `[upstream]`'s endpoint and certificate, with the defaults of
    /// `[sinks.iot_core.mqtt]` for the rest: one endpoint section for the sink and the
    /// devices' sessions alike.
    pub fn iot_core_mqtt(&self) -> Option<MqttSinkConfig> {
        let iot = self.sinks.iot_core.as_ref()?;
        if iot.transport != IotTransport::Mqtt {
            return None;
        }
        iot.mqtt.clone().or_else(|| {
            self.upstream.as_ref().map(|upstream| MqttSinkConfig {
                host: upstream.host.clone(),
                port: upstream.port,
                client_id: default_client_id(),
                ca: upstream.ca.clone(),
                cert: upstream.cert.clone(),
                key: upstream.key.clone(),
                keep_alive_secs: default_keep_alive(),
            })
        })
    }

    pub(super) fn validate_sinks(&self, problems: &mut Vec<String>) {
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
            (IotTransport::Mqtt, None) if self.upstream.is_none() => {
                problems.push(
                    "sinks.iot_core: transport \"mqtt\" needs [sinks.iot_core.mqtt] or [upstream]"
                        .to_string(),
                );
            }
            // `[upstream]`'s endpoint and certificate, checked there.
            (IotTransport::Mqtt, None) => {}
            (IotTransport::Mqtt, Some(mqtt)) => {
                super::check_tls_files(
                    "sinks.iot_core.mqtt",
                    &mqtt.ca,
                    &mqtt.cert,
                    &mqtt.key,
                    problems,
                );
                // The longest instance id it may stand for.
                let longest = crate::instance::fill(&mqtt.client_id, &"x".repeat(64));
                if mqtt.client_id.is_empty() || longest.len() > 128 {
                    problems.push(
                        "sinks.iot_core.mqtt.client_id must be 1 to 128 characters, with a 64-character instance id in place of ${instance.id}".to_string(),
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
}
