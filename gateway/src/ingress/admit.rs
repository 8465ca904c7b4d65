//! Admission: the one step every device protocol calls before the pipeline, so that HTTP,
//! the `sluice.v1` WebSocket dialect and MQTT cannot drift apart.
//!
//! A protocol parses its own framing into [`Submission`]s and hands them to [`admit`], which
//! checks, in this order and the same way for all of them:
//!
//! 1. the topic (IoT Core's rules; topics the gateway owns are reserved);
//! 2. the QoS (0 or 1);
//! 3. the attributes (`limits.max_attributes`, `limits.max_attribute_bytes`);
//! 4. the payload against the record limit;
//! 5. the device policy, each message against the grant that allows its topic, its size
//!    being its payload and attribute bytes;
//!
//! and builds the [`Message`]s. Every refusal is a [`Refusal`]; what the pipeline answers
//! becomes a verdict in [`crate::ingress::verdict`].

use base64::Engine as _;

use crate::auth::{Authenticator, Identity};
use crate::config::{Config, WebSocketConfig};
use crate::ingress::verdict::Refusal;
use crate::message::{Message, attribute, new_id, now_ms};
use crate::policy::{self, DevicePolicy};
use crate::topic::{Reserved, TopicFilter, validate_publish_topic};

/// What decides whether a device's request is taken: who it is, what it may do, and the
/// limits. A configuration reload builds new ones and swaps them in whole.
pub struct DeviceRules {
    /// Who sent a request.
    pub auth: std::sync::Arc<Authenticator>,
    /// What a device may do.
    pub policy: std::sync::Arc<DevicePolicy>,
    /// WebSocket session settings (a session keeps those it opened with).
    pub websocket: WebSocketConfig,
    /// MQTT session settings (likewise).
    pub mqtt: crate::config::MqttConfig,
    /// Most messages in one batch request.
    pub max_batch_messages: usize,
    /// Largest batch request body.
    pub max_batch_bytes: usize,
    /// Most attributes per message.
    pub max_attributes: usize,
    /// Most attribute bytes (names and values) per message.
    pub max_attribute_bytes: usize,
    /// Topics the gateway owns (`[upstream]`'s command topics, any device): no device
    /// publishes there.
    pub reserved: Vec<TopicFilter>,
}

impl DeviceRules {
    /// The rules of `config`; the authenticator and the policy (with its rate-limit
    /// state) are taken from `previous` when their sections did not change.
    pub fn new(config: &Config, previous: Option<(&Config, &DeviceRules)>) -> DeviceRules {
        let unchanged = |same: fn(&Config, &Config) -> bool| {
            previous
                .filter(|(old, _)| same(old, config))
                .map(|(_, rules)| rules)
        };
        let auth = match unchanged(|a, b| a.auth == b.auth) {
            Some(rules) => rules.auth.clone(),
            None => std::sync::Arc::new(Authenticator::new(config.auth.as_ref())),
        };
        let policy =
            match unchanged(|a, b| a.policy == b.policy && a.auth.is_some() == b.auth.is_some()) {
                Some(rules) => rules.policy.clone(),
                None => std::sync::Arc::new(DevicePolicy::new(
                    config.policy.as_ref(),
                    config.auth.is_some(),
                )),
            };
        DeviceRules {
            auth,
            policy,
            websocket: config.websocket.clone(),
            mqtt: config.mqtt.clone(),
            max_batch_messages: config.limits.max_batch_messages,
            max_batch_bytes: config.limits.max_batch_bytes,
            max_attributes: config.limits.max_attributes,
            max_attribute_bytes: config.limits.max_attribute_bytes,
            reserved: reserved_topics(config),
        }
    }
}

/// The command topics of `[upstream]`, for every device: a device publishing there
/// could send another device commands.
fn reserved_topics(config: &Config) -> Vec<TopicFilter> {
    let Some(upstream) = &config.upstream else {
        return Vec::new();
    };
    upstream
        .command_topics
        .iter()
        .filter_map(|template| TopicFilter::parse(&crate::template::for_device(template, "+")).ok())
        .collect()
}

/// A device's publish as its protocol read it, submitted for admission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Its content type (empty: none).
    pub content_type: String,
    /// The QoS the device asked for.
    pub qos: u8,
    /// Attributes (MQTT 5 properties as `mqtt.*`, batch attributes, the dialect's own).
    pub attributes: Vec<(String, String)>,
}

/// Admits `publishes` of `identity`: every check of this module's list, the same way for
/// every protocol, then the messages. `max_payload` is the record limit. In a batch
/// (`numbered`), a refusal names the message by its index, and refuses the batch whole.
pub fn admit(
    rules: &DeviceRules,
    identity: &Identity,
    max_payload: usize,
    publishes: Vec<Submission>,
    numbered: bool,
) -> Result<Vec<Message>, Refusal> {
    let at = |index: usize, why: String| {
        if numbered {
            format!("messages[{index}]: {why}")
        } else {
            why
        }
    };
    let mut sizes = Vec::with_capacity(publishes.len());
    for (index, publish) in publishes.iter().enumerate() {
        let topic = &publish.topic;
        validate_publish_topic(topic)
            .map_err(|why| Refusal::BadTopic(at(index, format!("topic `{topic}`: {why}"))))?;
        let reserved = crate::topic::reserved(topic);
        if reserved == Some(Reserved::Reply)
            || rules.reserved.iter().any(|filter| filter.matches(topic))
        {
            return Err(Refusal::Reserved {
                topic: topic.clone(),
            });
        }
        if reserved == Some(Reserved::Request)
            && publish
                .attributes
                .iter()
                .any(|(key, value)| key == attribute::RETAIN && value == "true")
        {
            return Err(Refusal::BadRequest(at(
                index,
                format!(
                    "`{topic}` is one of IoT Core's reserved topics: a retained message is refused there"
                ),
            )));
        }
        if publish.qos > 1 {
            return Err(Refusal::BadRequest(at(
                index,
                format!("qos must be 0 or 1, not {}", publish.qos),
            )));
        }
        let attributes = &publish.attributes;
        if attributes.len() > rules.max_attributes {
            return Err(Refusal::BadRequest(at(
                index,
                format!(
                    "{} attributes exceed limits.max_attributes of {}",
                    attributes.len(),
                    rules.max_attributes
                ),
            )));
        }
        let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        if attribute_bytes > rules.max_attribute_bytes {
            return Err(Refusal::TooLarge(at(
                index,
                format!(
                    "{attribute_bytes} bytes of attributes exceed limits.max_attribute_bytes of {}",
                    rules.max_attribute_bytes
                ),
            )));
        }
        if publish.payload.len() > max_payload {
            return Err(Refusal::TooLarge(at(
                index,
                format!(
                    "payload of {} bytes exceeds the record limit of {max_payload} bytes",
                    publish.payload.len()
                ),
            )));
        }
        if crate::route::is_retained(attributes)
            && publish.payload.len() > crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES
        {
            return Err(Refusal::TooLarge(at(
                index,
                format!(
                    "a retained message goes to IoT Core, never to Kinesis, and its payload of {} bytes is over IoT Core's {} bytes",
                    publish.payload.len(),
                    crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES
                ),
            )));
        }
        sizes.push(publish.payload.len() + attribute_bytes);
    }
    let topics = publishes.iter().map(|p| p.topic.as_str());
    rules
        .policy
        .check_publish(identity, topics.zip(sizes))
        .map_err(|refusal| policy_refusal(identity, refusal))?;
    let received_at_ms = now_ms();
    Ok(publishes
        .into_iter()
        .map(|publish| Message {
            id: new_id(),
            device_id: identity.device_id.clone(),
            topic: publish.topic,
            content_type: publish.content_type,
            qos: publish.qos,
            attributes: publish.attributes,
            received_at_ms,
            payload: publish.payload,
        })
        .collect())
}

/// Admits a publish of `size` bytes on `topic` that leaves for the broker as it is,
/// outside the pipeline (a reply to a command, a request to IoT Core's services): held to
/// the policy (and its rates) like any publish there.
pub fn admit_reply(
    rules: &DeviceRules,
    identity: &Identity,
    topic: &str,
    size: usize,
) -> Result<(), Refusal> {
    rules
        .policy
        .check_publish(identity, [(topic, size)])
        .map_err(|refusal| policy_refusal(identity, refusal))
}

/// The refusal a device gets for the policy's.
fn policy_refusal(identity: &Identity, refusal: policy::Refusal) -> Refusal {
    match refusal {
        policy::Refusal::Denied { topic } => Refusal::Forbidden {
            topic,
            device: identity.device_id.clone(),
        },
        policy::Refusal::TooLarge { grant, limit, size } => Refusal::TooLarge(format!(
            "{size} bytes of payload and attributes exceed the limit of {limit} of policy grant `{grant}`"
        )),
        policy::Refusal::TooMany {
            grant,
            limit,
            count,
        } => Refusal::TooLarge(format!(
            "{count} messages in one request exceed the max_messages_per_sec of {limit} of policy grant `{grant}`"
        )),
        policy::Refusal::RateLimited {
            grant,
            limit,
            retry_after,
        } => Refusal::RateLimited {
            grant,
            limit,
            retry_after: retry_after.as_secs_f64().ceil().max(1.0) as u64,
        },
    }
}

/// A message body given as `payload` (JSON, stored compactly) or `payload_base64`
/// (bytes), with the content type it implies (`application/json` for JSON, else none).
/// Shared by `POST /batch` and WebSocket text frames.
pub fn decode_payload(
    json: Option<serde_json::Value>,
    encoded: Option<String>,
) -> Result<(Vec<u8>, &'static str), String> {
    match (json, encoded) {
        (Some(value), None) => Ok((
            serde_json::to_vec(&value).unwrap_or_default(),
            "application/json",
        )),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(|bytes| (bytes, ""))
            .map_err(|error| format!("payload_base64: {error}")),
        (None, None) => Ok((Vec::new(), "")),
        (Some(_), Some(_)) => Err("give `payload` or `payload_base64`, not both".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Method;

    fn rules(extra: &str) -> DeviceRules {
        let config = Config::parse(&format!(
            r#"
            [limits]
            max_attributes = 2
            max_attribute_bytes = 20
            [policy]
            [[policy.grants]]
            name = "status"
            devices = ["*"]
            publish = ["status/#", "cmd/#"]
            [[policy.grants]]
            name = "telemetry"
            devices = ["*"]
            publish = ["telemetry/#"]
            max_payload_bytes = 10
            {extra}
            "#
        ))
        .unwrap();
        DeviceRules::new(&config, None)
    }

    fn device() -> Identity {
        Identity {
            device_id: "d1".to_string(),
            groups: Vec::new(),
            method: Method::Token,
            expires_at_secs: None,
            certificate: None,
            claims: Vec::new(),
        }
    }

    fn publish(topic: &str, payload: &[u8], attributes: &[(&str, &str)]) -> Submission {
        Submission {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            content_type: String::new(),
            qos: 1,
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Every check, for one message, with the code a device gets.
    #[test]
    fn each_check_refuses_with_its_code() {
        let upstream = r#"
            [upstream]
            host = "broker"
            ca = "ca.pem"
            cert = "c.pem"
            key = "k.pem"
        "#;
        let rules = rules(upstream);
        let mut qos2 = publish("status/x", b"1", &[]);
        qos2.qos = 2;
        let cases: Vec<(Submission, Option<&str>)> = vec![
            (publish("status/x", b"ok", &[]), None),
            (publish("", b"1", &[]), Some("bad_request")),
            (publish("a/+/b", b"1", &[]), Some("bad_request")),
            (qos2, Some("bad_request")),
            (publish("elsewhere/x", b"1", &[]), Some("topic_denied")),
            // Another device's command topic is the gateway's.
            (
                publish("cmd/other/reboot", b"1", &[]),
                Some("topic_reserved"),
            ),
            (
                publish("status/x", &[0; 101], &[]),
                Some("payload_too_large"),
            ),
            (
                publish("telemetry/t", &[0; 11], &[]),
                Some("payload_too_large"),
            ),
            (
                publish("status/x", b"1", &[("a", "1"), ("b", "2"), ("c", "3")]),
                Some("bad_request"),
            ),
            (
                publish("status/x", b"1", &[("key", "a-very-long-value-xx")]),
                Some("payload_too_large"),
            ),
            // Attributes count with the payload against the grant's size: 4 + 7 > 10.
            (
                publish("telemetry/t", b"1234", &[("k", "123456")]),
                Some("payload_too_large"),
            ),
            (publish("telemetry/t", b"1234", &[("k", "12345")]), None),
        ];
        for (index, (publish, expected)) in cases.into_iter().enumerate() {
            let topic = publish.topic.clone();
            let result = admit(&rules, &device(), 100, vec![publish], false);
            assert_eq!(
                result.as_ref().err().map(Refusal::code),
                expected,
                "case {index} ({topic}): {result:?}"
            );
        }
    }

    /// A command reply is a publish on the reply topic: it needs a grant there and counts
    /// against that grant's rate.
    #[test]
    fn replies_are_held_to_the_policy() {
        let rules = rules(
            r#"
            [[policy.grants]]
            name = "replies"
            devices = ["*"]
            publish = ["cmd-reply/${device.id}"]
            max_messages_per_sec = 1
        "#,
        );
        assert!(admit_reply(&rules, &device(), "cmd-reply/d1", 10).is_ok());
        let again = admit_reply(&rules, &device(), "cmd-reply/d1", 10).unwrap_err();
        assert_eq!(again.code(), "rate_limited");
        let other = admit_reply(&rules, &device(), "cmd-reply/d2", 10).unwrap_err();
        assert_eq!(other.code(), "topic_denied");
    }

    /// A batch is refused whole, naming the message that failed.
    #[test]
    fn a_batch_names_the_message_that_failed() {
        let rules = rules("");
        let batch = vec![
            publish("status/a", b"1", &[]),
            publish("status/b", b"2", &[]),
            publish("bad/+", b"3", &[]),
        ];
        match admit(&rules, &device(), 100, batch, true) {
            Err(Refusal::BadTopic(message)) => {
                assert!(message.starts_with("messages[2]: "), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let batch = vec![
            publish("status/a", b"1", &[]),
            publish("telemetry/b", &[1; 42], &[]),
        ];
        let refused = admit(&rules, &device(), 100, batch, true).unwrap_err();
        assert_eq!(refused.code(), "payload_too_large", "{refused:?}");
        let admitted = admit(
            &rules,
            &device(),
            100,
            vec![publish("status/a", b"1", &[("k", "v")])],
            true,
        )
        .unwrap();
        assert_eq!(admitted[0].device_id, "d1");
        assert_eq!(admitted[0].attributes, [("k".to_string(), "v".to_string())]);
    }
}
