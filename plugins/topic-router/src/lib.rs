//! Routes by topic prefix and payload size, and takes the Kinesis partition key from a
//! field of the JSON payload (a site id, say) so that one site's readings stay in order
//! on one shard.
//!
//! Configuration (all optional; lists are comma-separated):
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `kinesis_prefixes` | `telemetry/` | topics starting with one of these go to Kinesis |
//! | `iot_core_prefixes` | `alerts/,cmd/` | topics starting with one of these go to IoT Core |
//! | `large_payload_bytes` | `65536` | larger payloads go to Kinesis whatever their topic |
//! | `stream` | empty: the gateway's default stream | Kinesis stream name |
//! | `partition_key_field` | `site_id` | top-level JSON field used as partition key (device id when absent) |
//! | `qos` | `1` | QoS for IoT Core publishes |
//!
//! Messages matching no rule keep the gateway's built-in decision.

use serde_json::Value;
use sluice_sdk::{Config, Decision, Destination, IotCoreTarget, KinesisTarget, Message, Route};

struct TopicRouter {
    kinesis_prefixes: Vec<String>,
    iot_core_prefixes: Vec<String>,
    large_payload_bytes: usize,
    stream: String,
    partition_key_field: String,
    qos: u8,
}

fn list(config: &Config, key: &str, default: &str) -> Vec<String> {
    if config.get(key).is_none() {
        return default.split(',').map(str::to_string).collect();
    }
    config
        .get_list(key)
        .into_iter()
        .map(str::to_string)
        .collect()
}

impl Route for TopicRouter {
    fn init(config: &Config) -> Result<Self, String> {
        let qos = config.get_u64("qos", 1)?;
        if qos > 1 {
            return Err(format!(
                "config `qos` must be 0 or 1 (IoT Core has no QoS {qos})"
            ));
        }
        let large = config.get_u64("large_payload_bytes", 65_536)?;
        Ok(TopicRouter {
            kinesis_prefixes: list(config, "kinesis_prefixes", "telemetry/"),
            iot_core_prefixes: list(config, "iot_core_prefixes", "alerts/,cmd/"),
            large_payload_bytes: usize::try_from(large)
                .map_err(|_| "`large_payload_bytes` too large")?,
            stream: config.get_or("stream", "").to_string(),
            partition_key_field: config.get_or("partition_key_field", "site_id").to_string(),
            qos: qos as u8,
        })
    }

    fn route(&mut self, message: &Message) -> Decision {
        let size = message.payload.len();
        if size > self.large_payload_bytes {
            return Decision::to(
                self.kinesis(message),
                format!("payload {size} B over {} B", self.large_payload_bytes),
            );
        }
        if let Some(prefix) = self
            .kinesis_prefixes
            .iter()
            .find(|p| message.topic.starts_with(p.as_str()))
        {
            return Decision::to(self.kinesis(message), format!("topic prefix `{prefix}`"));
        }
        if let Some(prefix) = self
            .iot_core_prefixes
            .iter()
            .find(|p| message.topic.starts_with(p.as_str()))
        {
            let target = IotCoreTarget {
                topic: String::new(),
                qos: self.qos,
            };
            return Decision::to(
                Destination::IotCore(target),
                format!("topic prefix `{prefix}`"),
            );
        }
        Decision::builtin("no topic rule matched")
    }
}

impl TopicRouter {
    fn kinesis(&self, message: &Message) -> Destination {
        Destination::Kinesis(KinesisTarget {
            stream: self.stream.clone(),
            partition_key: self.partition_key(message).unwrap_or_default(),
            explicit_hash_key: None,
        })
    }

    /// The configured field of a JSON object payload, as text.
    fn partition_key(&self, message: &Message) -> Option<String> {
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(&message.payload)
        else {
            return None;
        };
        match object.remove(&self.partition_key_field)? {
            Value::String(text) if !text.is_empty() => Some(text),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    }
}

sluice_sdk::export_router!(TopicRouter);
