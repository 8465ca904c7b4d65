//! Commands, for devices that cannot speak MQTT to IoT Core themselves (the `sluice.v1`
//! WebSocket dialect, HTTP long-polls): a message from the device's session at IoT Core
//! becomes a command with an id the gateway gives it, and the device's reply to that id
//! goes where the command asked (its MQTT 5 response topic, with its correlation data),
//! or else to the configured reply topic.

use std::collections::VecDeque;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use serde_json::{Value, json};

/// Commands whose reply can still be sent where the command asked, per session.
const REMEMBERED: usize = 64;

/// A message from IoT Core, as a command for the device.
pub struct Command {
    /// The gateway's id for it; the device names it in its reply.
    pub id: String,
    /// The message as IoT Core sent it (acknowledged there once delivered).
    pub publish: Publish,
}

impl Command {
    /// `publish` with an id of its own.
    pub fn new(publish: Publish) -> Command {
        Command {
            id: crate::message::new_id(),
            publish,
        }
    }

    /// Its topic.
    pub fn topic(&self) -> String {
        String::from_utf8_lossy(&self.publish.topic).into_owned()
    }

    /// The command as a JSON object: `type: command`, `id`, `topic`, `qos`, the payload
    /// (`payload` when it is JSON, else `payload_text` or `payload_base64`), and the
    /// MQTT 5 `response_topic`, `content_type` and `user_properties` it came with.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "type": "command",
            "id": self.id,
            "topic": self.topic(),
            "qos": u8::from(self.publish.qos != QoS::AtMostOnce),
        });
        let (field, payload) = crate::sink::local::payload_json(&self.publish.payload);
        value[field] = payload;
        if let Some(properties) = &self.publish.properties {
            if let Some(topic) = &properties.response_topic {
                value["response_topic"] = topic.as_str().into();
            }
            if let Some(content_type) = &properties.content_type {
                value["content_type"] = content_type.as_str().into();
            }
            if !properties.user_properties.is_empty() {
                let pairs: Vec<Value> = properties
                    .user_properties
                    .iter()
                    .map(|(key, value)| json!({ key: value }))
                    .collect();
                value["user_properties"] = pairs.into();
            }
        }
        value
    }
}

/// A device's reply, ready to publish on its session.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub topic: String,
    /// `{"command_id", "status", "payload"?}`.
    pub payload: Bytes,
    /// The command's correlation data, when it had a response topic.
    pub properties: Option<PublishProperties>,
}

/// Where the replies to the last commands sent go.
#[derive(Default)]
pub struct Recent {
    /// Command id, response topic and correlation data, oldest first.
    sent: VecDeque<(String, String, Option<Bytes>)>,
}

impl Recent {
    /// `command` went to the device: a reply to it goes to its response topic, if it
    /// named one (for the last [`REMEMBERED`] commands).
    pub fn sent(&mut self, command: &Command) {
        let Some(properties) = &command.publish.properties else {
            return;
        };
        let Some(topic) = &properties.response_topic else {
            return;
        };
        if self.sent.len() == REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((
            command.id.clone(),
            topic.clone(),
            properties.correlation_data.clone(),
        ));
    }

    /// The reply `status` (and `payload`) to command `id`: to the command's response
    /// topic with its correlation data, or to `reply_topic`.
    pub fn reply(
        &self,
        id: &str,
        status: &str,
        payload: Option<Value>,
        reply_topic: &str,
    ) -> Reply {
        let mut body = json!({"command_id": id, "status": status});
        if let Some(payload) = payload {
            body["payload"] = payload;
        }
        let body = Bytes::from(body.to_string());
        match self.sent.iter().find(|(sent, ..)| sent == id) {
            Some((_, topic, correlation)) => Reply {
                topic: topic.clone(),
                payload: body,
                properties: Some(PublishProperties {
                    correlation_data: correlation.clone(),
                    ..Default::default()
                }),
            },
            None => Reply {
                topic: reply_topic.to_string(),
                payload: body,
                properties: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(response_topic: Option<&str>) -> Command {
        let mut publish = Publish::new("cmd/d1/reboot", QoS::AtLeastOnce, "{\"at\":1}", None);
        publish.properties = response_topic.map(|topic| PublishProperties {
            response_topic: Some(topic.to_string()),
            correlation_data: Some(Bytes::from_static(b"c-7")),
            user_properties: vec![("k".to_string(), "v".to_string())],
            ..Default::default()
        });
        Command::new(publish)
    }

    /// A command is shown with its payload and properties; the reply to one that named
    /// a response topic goes there with its correlation data, any other to the reply
    /// topic.
    #[test]
    fn replies_go_where_the_command_asked() {
        let asked = command(Some("app/answers"));
        let json = asked.to_json();
        assert_eq!(json["topic"], "cmd/d1/reboot");
        assert_eq!(json["payload"], json!({"at": 1}));
        assert_eq!(json["response_topic"], "app/answers");
        assert_eq!(json["user_properties"], json!([{"k": "v"}]));
        let plain = command(None);
        let mut recent = Recent::default();
        recent.sent(&asked);
        recent.sent(&plain);
        let reply = recent.reply(&asked.id, "done", Some(json!(3)), "cmd-reply/d1");
        assert_eq!(reply.topic, "app/answers");
        let correlation = reply.properties.and_then(|p| p.correlation_data);
        assert_eq!(correlation.as_deref(), Some(&b"c-7"[..]));
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(
            body,
            json!({"command_id": asked.id, "status": "done", "payload": 3})
        );
        let reply = recent.reply(&plain.id, "failed", None, "cmd-reply/d1");
        assert_eq!(reply.topic, "cmd-reply/d1");
        assert_eq!(reply.properties, None);
    }
}
