//! The AWS IoT Core sink, over MQTT ([`mqtt`], rumqttc with the gateway's own X.509
//! certificate, every QoS 1 PUBACK tracked) or HTTPS ([`https`], the IoT data-plane
//! `Publish` call, SigV4-signed by the AWS SDK).
//!
//! IoT Core's own rules are checked before anything is sent, so a message IoT Core would
//! refuse is dead-lettered with a clear reason instead: payload at most 128 KB, topic at
//! most 256 bytes and 7 slashes, no wildcards, QoS 0 or 1. With `basic_ingest_rule`,
//! messages go to `$aws/rules/<rule>/<topic>` (Basic Ingest: no messaging charge; the
//! prefix does not count towards the topic limits).
//!
//! With `[upstream]`, a device's telemetry goes through its own session at IoT Core when
//! it has one ([`devices`]), and through the sink's connection otherwise.

pub mod devices;
pub mod https;
pub mod mqtt;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{IotCoreSinkConfig, MqttSinkConfig};
use crate::record::Record;
use crate::route::{Destination, check_iot_core};

/// The IoT Core sink `[sinks.iot_core]` configures: over MQTT on `mqtt` (its own section,
/// or `[upstream]`'s endpoint), else over HTTPS with the shared AWS configuration; with
/// `upstream`, through the devices' own sessions first. The MQTT client id names
/// `instance` where it says `${instance.id}`.
pub fn build(
    settings: &IotCoreSinkConfig,
    mqtt: Option<MqttSinkConfig>,
    instance: &str,
    aws: Option<&aws_config::SdkConfig>,
    upstream: Option<&Arc<crate::upstream::Upstream>>,
) -> anyhow::Result<Arc<dyn crate::sink::Sink>> {
    let delivery_timeout = Duration::from_millis(settings.delivery_timeout_ms);
    let rule = settings.basic_ingest_rule.clone();
    let shared: Arc<dyn crate::sink::Sink> = match (&mqtt, aws) {
        (Some(mqtt), _) => Arc::new(mqtt::MqttSink::start(mqtt::MqttSettings {
            host: mqtt.host.clone(),
            port: mqtt.port,
            client_id: crate::instance::fill(&mqtt.client_id, instance),
            ca: mqtt.ca.clone(),
            cert: mqtt.cert.clone(),
            key: mqtt.key.clone(),
            keep_alive: Duration::from_secs(mqtt.keep_alive_secs),
            delivery_timeout,
            basic_ingest_rule: rule.clone(),
        })?),
        (None, Some(shared)) => {
            let endpoint = settings.endpoint_url.as_deref();
            let shared = crate::sink::aws::with_endpoint(shared, endpoint);
            Arc::new(https::HttpsSink::new(
                &shared,
                rule.clone(),
                delivery_timeout,
            ))
        }
        (None, None) => anyhow::bail!("sinks.iot_core: no transport could be set up"),
    };
    Ok(match upstream {
        Some(upstream) => Arc::new(devices::ThroughDevices::new(upstream.clone(), shared, rule)),
        None => shared,
    })
}

/// One publish, checked against IoT Core's rules.
pub struct Publish {
    /// The topic to publish to (with the Basic Ingest prefix when configured).
    pub topic: String,
    /// 0 or 1.
    pub qos: u8,
    /// The payload.
    pub payload: Vec<u8>,
    /// MQTT's retain flag (the message's `mqtt.retain`): IoT Core keeps it for later
    /// subscribers.
    pub retain: bool,
    /// The message's MQTT 5 properties (content type and `mqtt.*` attributes), if any.
    pub properties: Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
}

/// Checks a record against IoT Core's rules and builds its publish.
pub fn prepare(record: &Record, basic_ingest_rule: Option<&str>) -> Result<Publish, String> {
    let Destination::IotCore { topic, qos } = &record.decision.destination else {
        return Err("not an IoT Core destination".to_string());
    };
    check_iot_core(topic, *qos, record.message.payload.len())
        .map_err(|why| format!("IoT Core would refuse this publish: {why}"))?;
    let topic = match basic_ingest_rule {
        Some(rule) => format!("$aws/rules/{rule}/{topic}"),
        None => topic.clone(),
    };
    Ok(Publish {
        topic,
        qos: *qos,
        payload: record.message.payload.clone(),
        retain: crate::route::is_retained(&record.message.attributes),
        properties: crate::upstream::properties::of(
            Some(&record.message.content_type),
            &record.message.attributes,
        ),
    })
}
