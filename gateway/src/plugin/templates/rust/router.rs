//! {{name}}: a Sluice router plugin. Messages on `bulk/…` go to Kinesis; the others keep
//! the gateway's built-in decision. Change `route` to decide your way.

use sluice_sdk::{Config, Decision, Destination, KinesisTarget, Message, Route};

pub struct Plugin;

impl Route for Plugin {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(Plugin)
    }

    fn route(&mut self, message: &Message) -> Decision {
        if message.topic.starts_with("bulk/") {
            let kinesis = KinesisTarget {
                stream: String::new(),
                partition_key: String::new(),
                explicit_hash_key: None,
            };
            return Decision::to(Destination::Kinesis(kinesis), "bulk data goes to Kinesis");
        }
        Decision::builtin("")
    }
}

sluice_sdk::export_router!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_goes_to_kinesis() {
        let message = Message {
            id: "m1".to_string(),
            device_id: "dev-1".to_string(),
            topic: "bulk/1/upload".to_string(),
            content_type: String::new(),
            qos: 0,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: b"x".to_vec(),
        };
        let decision = Plugin.route(&message);
        assert!(matches!(decision.destination, Some(Destination::Kinesis(_))));
    }
}
