//! {{name}}: a Sluice transform plugin. It tags each message with the attribute
//! `{{name}}.seen` and passes it on; change `transform` to do your work.

use sluice_sdk::{Config, Message, Outcome, Transform};

pub struct Plugin;

impl Transform for Plugin {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(Plugin)
    }

    fn transform(&mut self, mut message: Message) -> Outcome {
        message
            .attributes
            .push(("{{name}}.seen".to_string(), "true".to_string()));
        Outcome::Keep(message)
    }
}

sluice_sdk::export_transform!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_tagged() {
        let message = Message {
            id: "m1".to_string(),
            device_id: "dev-1".to_string(),
            topic: "sites/1/temp".to_string(),
            content_type: String::new(),
            qos: 0,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: b"{}".to_vec(),
        };
        let Outcome::Keep(kept) = Plugin.transform(message) else {
            panic!("the message is kept");
        };
        assert!(
            kept.attributes
                .contains(&("{{name}}.seen".to_string(), "true".to_string()))
        );
    }
}
