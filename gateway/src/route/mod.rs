//! The routing decision: where each message goes, and which rule said so.
//!
//! The built-in [`Policy`] applies the routing table of the architecture (payload size
//! against IoT Core's and Kinesis' limits, direction, throughput) refined by the
//! configuration's topic rules; a router plugin may then override it per message
//! ([`Policy::overrule`]), within the hard limits.

pub mod meter;

use std::fmt;

use serde::Serialize;

use crate::config::{DefaultDestination, RoutingConfig, RuleDestination};
use crate::message::Message;
use crate::message::attribute;
use crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES;
use crate::quota::KINESIS_MAX_PARTITION_KEY_CHARS;
use crate::template::Template;
use crate::topic::{TopicFilter, validate_publish_topic};

/// Where one message goes; in reports and lines `{"type": kind, …its fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Destination {
    /// Publish to AWS IoT Core.
    IotCore {
        /// The MQTT topic.
        topic: String,
        /// 0 or 1.
        qos: u8,
    },
    /// Put on a Kinesis data stream.
    Kinesis {
        /// The stream name.
        stream: String,
        /// Chooses the shard; ordering holds per key.
        partition_key: String,
        /// Pins the shard, overriding the key's hash.
        #[serde(skip_serializing_if = "Option::is_none")]
        explicit_hash_key: Option<String>,
    },
    /// The local sink.
    Local,
    /// Discarded on purpose.
    Drop,
    /// The dead-letter store.
    DeadLetter,
}

impl Destination {
    /// A short name: `iot-core`, `kinesis`, `local`, `drop` or `dead-letter`.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::IotCore { .. } => "iot-core",
            Destination::Kinesis { .. } => "kinesis",
            Destination::Local => "local",
            Destination::Drop => "drop",
            Destination::DeadLetter => "dead-letter",
        }
    }
}

/// A destination together with the rule that chose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Where the message goes.
    pub destination: Destination,
    /// The rule that decided, e.g. `builtin:payload-over-iot-core-limit`, `rule:alarms`,
    /// `plugin:router`.
    pub rule: String,
    /// Why, in words.
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} by {} ({})",
            self.destination.kind(),
            self.rule,
            self.reason
        )
    }
}

/// What the policy knows about a message besides the message itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// The device expects replies or receives commands (command & control).
    pub bidirectional: bool,
    /// The device's recent throughput in bytes per second.
    pub device_bytes_per_sec: u64,
}

/// A compiled topic rule.
#[derive(Debug, Clone)]
struct Rule {
    name: String,
    filter: TopicFilter,
    destination: Option<RuleDestination>,
    command_and_control: bool,
    iot_topic: Option<Template>,
    qos: u8,
    stream: Option<Template>,
    partition_key: Option<Template>,
}

/// The built-in routing policy, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    default_destination: DefaultDestination,
    default_stream: String,
    max_record_bytes: usize,
    high_throughput_bytes_per_sec: u64,
    rules: Vec<Rule>,
}

impl Policy {
    /// Builds the policy. The configuration must have been validated.
    pub fn new(config: &RoutingConfig) -> Policy {
        let rules = config
            .rules
            .iter()
            .filter_map(|rule| {
                Some(Rule {
                    name: rule.name.clone(),
                    filter: TopicFilter::parse(&rule.topic).ok()?,
                    destination: rule.destination,
                    command_and_control: rule.command_and_control,
                    iot_topic: rule
                        .iot_topic
                        .as_deref()
                        .and_then(|t| Template::parse(t).ok()),
                    qos: rule.qos.unwrap_or(1),
                    stream: rule.stream.as_deref().and_then(|t| Template::parse(t).ok()),
                    partition_key: rule
                        .partition_key
                        .as_deref()
                        .and_then(|t| Template::parse(t).ok()),
                })
            })
            .collect();
        Policy {
            default_destination: config.default_destination,
            default_stream: config.kinesis_stream.clone(),
            max_record_bytes: config.kinesis_max_record_bytes,
            high_throughput_bytes_per_sec: config.high_throughput_bytes_per_sec,
            rules,
        }
    }

    /// The largest payload any destination takes (the Kinesis record limit).
    pub fn max_payload_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// The built-in decision for one message.
    pub fn decide(&self, message: &Message, facts: Facts) -> Decision {
        retained_to_iot_core(self.decide_any(message, facts), message)
    }

    fn decide_any(&self, message: &Message, facts: Facts) -> Decision {
        let size = message.payload.len();
        if size > self.max_record_bytes {
            return decision(
                Destination::DeadLetter,
                "builtin:over-every-limit",
                format!(
                    "payload {size} B is over the Kinesis record limit of {} B",
                    self.max_record_bytes
                ),
            );
        }
        let mut bidirectional = facts.bidirectional;
        for rule in self
            .rules
            .iter()
            .filter(|rule| rule.filter.matches(&message.topic))
        {
            bidirectional |= rule.command_and_control;
            if let Some(target) = rule.destination {
                return self.apply_rule(rule, target, message);
            }
        }
        if size > IOT_CORE_MAX_PAYLOAD_BYTES {
            return decision(
                self.kinesis(message, None),
                "builtin:payload-over-iot-core-limit",
                format!("payload {size} B is over IoT Core's {IOT_CORE_MAX_PAYLOAD_BYTES} B limit"),
            );
        }
        if bidirectional {
            return decision(
                iot_core(&message.topic, message.qos),
                "builtin:command-and-control",
                "bidirectional traffic goes to IoT Core".to_string(),
            );
        }
        if facts.device_bytes_per_sec > self.high_throughput_bytes_per_sec {
            return decision(
                self.kinesis(message, None),
                "builtin:high-throughput-producer",
                format!(
                    "device sends {} B/s, over {} B/s",
                    facts.device_bytes_per_sec, self.high_throughput_bytes_per_sec
                ),
            );
        }
        let destination = match self.default_destination {
            DefaultDestination::IotCore => iot_core(&message.topic, message.qos),
            DefaultDestination::Kinesis => self.kinesis(message, None),
            DefaultDestination::Local => Destination::Local,
        };
        decision(
            destination,
            "builtin:default",
            "no rule matched; the default destination".to_string(),
        )
    }

    fn apply_rule(&self, rule: &Rule, target: RuleDestination, message: &Message) -> Decision {
        let size = message.payload.len();
        let name = format!("rule:{}", rule.name);
        let destination = match target {
            RuleDestination::IotCore if size > IOT_CORE_MAX_PAYLOAD_BYTES => {
                return decision(
                    self.kinesis(message, None),
                    "builtin:payload-over-iot-core-limit",
                    format!(
                        "{name} chose iot-core, but the payload of {size} B is over IoT Core's {IOT_CORE_MAX_PAYLOAD_BYTES} B limit"
                    ),
                );
            }
            RuleDestination::IotCore => {
                let topic = rule.iot_topic.as_ref().map(|t| t.render(message));
                iot_core(topic.as_deref().unwrap_or(&message.topic), rule.qos)
            }
            RuleDestination::Kinesis => {
                let stream = rule.stream.as_ref().map(|t| t.render(message));
                let mut destination = self.kinesis(message, stream.as_deref());
                if let (Destination::Kinesis { partition_key, .. }, Some(template)) =
                    (&mut destination, &rule.partition_key)
                {
                    *partition_key = template.render(message);
                }
                destination
            }
            RuleDestination::Local => Destination::Local,
            RuleDestination::Drop => Destination::Drop,
            RuleDestination::DeadLetter => Destination::DeadLetter,
        };
        if let Err(why) = self.check_limits(&destination, message) {
            return decision(
                Destination::DeadLetter,
                &name,
                format!(
                    "the rule's {} destination is invalid for this message: {why}",
                    destination.kind()
                ),
            );
        }
        let reason = format!("topic `{}` matches the rule's filter", message.topic);
        decision(destination, &name, reason)
    }

    fn kinesis(&self, message: &Message, stream: Option<&str>) -> Destination {
        Destination::Kinesis {
            stream: stream.unwrap_or(&self.default_stream).to_string(),
            partition_key: message.device_id.clone(),
            explicit_hash_key: None,
        }
    }

    /// Applies a router plugin's choice over the built-in decision, unless it breaks a
    /// hard limit; an overruled choice is recorded in the decision.
    pub fn overrule(
        &self,
        builtin: Decision,
        plugin: &str,
        chosen: Option<Destination>,
        reason: &str,
        message: &Message,
    ) -> Decision {
        let Some(chosen) = chosen else {
            return builtin;
        };
        let chosen = self.fill_defaults(chosen, message);
        let retained_to_kinesis =
            matches!(chosen, Destination::Kinesis { .. }) && is_retained(&message.attributes);
        let checked = if retained_to_kinesis {
            Err("a retained message never goes to Kinesis".to_string())
        } else {
            self.check_limits(&chosen, message)
        };
        match checked {
            Ok(()) => decision(chosen, &format!("plugin:{plugin}"), reason.to_string()),
            Err(why) => Decision {
                reason: format!(
                    "{} (router plugin `{plugin}` chose {}, overruled: {why})",
                    builtin.reason,
                    chosen.kind()
                ),
                ..builtin
            },
        }
    }

    /// Empty fields in a plugin's destination mean "the gateway's default".
    fn fill_defaults(&self, destination: Destination, message: &Message) -> Destination {
        match destination {
            Destination::IotCore { topic, qos } if topic.is_empty() => Destination::IotCore {
                topic: message.topic.clone(),
                qos,
            },
            Destination::Kinesis {
                stream,
                partition_key,
                explicit_hash_key,
            } => Destination::Kinesis {
                stream: if stream.is_empty() {
                    self.default_stream.clone()
                } else {
                    stream
                },
                partition_key: if partition_key.is_empty() {
                    message.device_id.clone()
                } else {
                    partition_key
                },
                explicit_hash_key,
            },
            other => other,
        }
    }

    /// The limits no plugin may break.
    fn check_limits(&self, destination: &Destination, message: &Message) -> Result<(), String> {
        let size = message.payload.len();
        match destination {
            Destination::IotCore { topic, qos } => check_iot_core(topic, *qos, size),
            Destination::Kinesis {
                stream,
                partition_key,
                explicit_hash_key,
            } => {
                crate::config::validate_stream_name(stream)?;
                if partition_key.is_empty() {
                    return Err("the partition key is empty".to_string());
                }
                if partition_key.chars().count() > KINESIS_MAX_PARTITION_KEY_CHARS {
                    return Err(format!(
                        "partition key over {KINESIS_MAX_PARTITION_KEY_CHARS} characters"
                    ));
                }
                if let Some(key) = explicit_hash_key
                    && key.parse::<u128>().is_err()
                {
                    return Err(format!(
                        "explicit hash key `{key}` is not a 128-bit decimal"
                    ));
                }
                Ok(())
            }
            Destination::Local | Destination::Drop | Destination::DeadLetter => Ok(()),
        }
    }
}

/// Whether a message carries MQTT's retain flag (`mqtt.retain = true`, from an MQTT
/// publish or the HTTPS API's `retain` parameter).
pub fn is_retained(attributes: &[(String, String)]) -> bool {
    attributes
        .iter()
        .any(|(key, value)| key == attribute::RETAIN && value == "true")
}

/// A retained message is state for IoT Core to keep for later subscribers: where the
/// built-in decision would put it on Kinesis, it goes to IoT Core instead (its size was
/// held to IoT Core's limit when it was admitted).
fn retained_to_iot_core(decision: Decision, message: &Message) -> Decision {
    if !matches!(decision.destination, Destination::Kinesis { .. })
        || !is_retained(&message.attributes)
    {
        return decision;
    }
    Decision {
        destination: iot_core(&message.topic, message.qos),
        rule: "builtin:retained".to_string(),
        reason: format!(
            "a retained message goes to IoT Core, never to Kinesis ({} chose kinesis: {})",
            decision.rule, decision.reason
        ),
    }
}

/// IoT Core's rules for one publish: payload at most 128 KB, QoS 0 or 1, and the topic
/// rules of [`validate_publish_topic`].
pub fn check_iot_core(topic: &str, qos: u8, payload_len: usize) -> Result<(), String> {
    if payload_len > IOT_CORE_MAX_PAYLOAD_BYTES {
        return Err(format!(
            "payload {payload_len} B is over IoT Core's {IOT_CORE_MAX_PAYLOAD_BYTES} B limit"
        ));
    }
    if qos > 1 {
        return Err(format!("IoT Core has no QoS {qos}"));
    }
    validate_publish_topic(topic)
}

fn iot_core(topic: &str, qos: u8) -> Destination {
    Destination::IotCore {
        topic: topic.to_string(),
        qos,
    }
}

fn decision(destination: Destination, rule: &str, reason: String) -> Decision {
    Decision {
        destination,
        rule: rule.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn message(topic: &str, size: usize) -> Message {
        Message {
            id: "m1".into(),
            device_id: "dev-1".into(),
            topic: topic.into(),
            content_type: String::new(),
            qos: 1,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: vec![b'x'; size],
        }
    }

    #[test]
    fn a_destination_is_written_as_its_type_then_its_fields() {
        let kinesis = |key: Option<&str>| Destination::Kinesis {
            stream: "s".into(),
            partition_key: "p".into(),
            explicit_hash_key: key.map(str::to_string),
        };
        for (destination, json) in [
            (
                iot_core("a/b", 1),
                r#"{"type":"iot-core","topic":"a/b","qos":1}"#,
            ),
            (
                kinesis(None),
                r#"{"type":"kinesis","stream":"s","partition_key":"p"}"#,
            ),
            (
                kinesis(Some("7")),
                r#"{"type":"kinesis","stream":"s","partition_key":"p","explicit_hash_key":"7"}"#,
            ),
            (Destination::Local, r#"{"type":"local"}"#),
            (Destination::Drop, r#"{"type":"drop"}"#),
            (Destination::DeadLetter, r#"{"type":"dead-letter"}"#),
        ] {
            assert_eq!(serde_json::to_string(&destination).unwrap(), json);
        }
    }

    fn policy(toml: &str) -> Policy {
        let config = Config::parse(toml).unwrap();
        config.validate().unwrap();
        Policy::new(&config.routing)
    }

    const RULES: &str = r#"
        [routing]
        kinesis_stream = "main"
        [[routing.rules]]
        name = "alarms"
        topic = "sites/+/alarms/#"
        destination = "iot-core"
        iot_topic = "fleet/alarms"
        qos = 0
        [[routing.rules]]
        name = "bulk"
        topic = "bulk/#"
        destination = "kinesis"
        stream = "bulk-stream"
        [[routing.rules]]
        name = "cmd"
        topic = "cmd/#"
        command_and_control = true
        [[routing.rules]]
        name = "noise"
        topic = "debug/#"
        destination = "drop"
    "#;

    #[test]
    fn a_retained_message_never_goes_to_kinesis() {
        let policy = policy(RULES);
        let mut retained = message("bulk/1", 100);
        retained.attributes = vec![("mqtt.retain".into(), "true".into())];
        let decision = policy.decide(&retained, Facts::default());
        assert_eq!(decision.destination.kind(), "iot-core");
        assert_eq!(decision.rule, "builtin:retained");
        assert!(decision.reason.contains("rule:bulk"), "{}", decision.reason);
        let fast = Facts {
            bidirectional: false,
            device_bytes_per_sec: u64::MAX,
        };
        assert_eq!(policy.decide(&retained, fast).rule, "builtin:retained");
        let chosen = Destination::Kinesis {
            stream: String::new(),
            partition_key: String::new(),
            explicit_hash_key: None,
        };
        let builtin = policy.decide(&retained, Facts::default());
        let overruled = policy.overrule(builtin, "router", Some(chosen.clone()), "why", &retained);
        assert_eq!(overruled.destination.kind(), "iot-core");
        assert!(overruled.reason.contains("never goes to Kinesis"));
        // Without the flag, the same message goes where the rule says.
        let plain = message("bulk/1", 100);
        assert_eq!(policy.decide(&plain, Facts::default()).rule, "rule:bulk");
        let builtin = policy.decide(&plain, Facts::default());
        let chosen = policy.overrule(builtin, "router", Some(chosen), "why", &plain);
        assert_eq!(chosen.destination.kind(), "kinesis");
    }

    #[test]
    fn the_routing_table() {
        let policy = policy(RULES);
        let kib = 1024;
        let fast = Facts {
            bidirectional: false,
            device_bytes_per_sec: 600 * kib as u64,
        };
        let cases: Vec<(&str, usize, Facts, &str, &str)> = vec![
            ("a/b", 100, Facts::default(), "iot-core", "builtin:default"),
            (
                "a/b",
                128 * kib,
                Facts::default(),
                "iot-core",
                "builtin:default",
            ),
            (
                "a/b",
                128 * kib + 1,
                Facts::default(),
                "kinesis",
                "builtin:payload-over-iot-core-limit",
            ),
            (
                "a/b",
                1024 * kib,
                Facts::default(),
                "kinesis",
                "builtin:payload-over-iot-core-limit",
            ),
            (
                "a/b",
                1024 * kib + 1,
                Facts::default(),
                "dead-letter",
                "builtin:over-every-limit",
            ),
            (
                "a/b",
                100,
                fast,
                "kinesis",
                "builtin:high-throughput-producer",
            ),
            (
                "sites/1/alarms/fire",
                100,
                Facts::default(),
                "iot-core",
                "rule:alarms",
            ),
            (
                "sites/1/alarms/fire",
                200 * kib,
                Facts::default(),
                "kinesis",
                "builtin:payload-over-iot-core-limit",
            ),
            ("bulk/x", 10, Facts::default(), "kinesis", "rule:bulk"),
            (
                "cmd/reboot",
                100,
                fast,
                "iot-core",
                "builtin:command-and-control",
            ),
            (
                "cmd/reboot",
                200 * kib,
                Facts::default(),
                "kinesis",
                "builtin:payload-over-iot-core-limit",
            ),
            (
                "x",
                100,
                Facts {
                    bidirectional: true,
                    device_bytes_per_sec: 0,
                },
                "iot-core",
                "builtin:command-and-control",
            ),
            ("debug/trace", 100, Facts::default(), "drop", "rule:noise"),
        ];
        for (topic, size, facts, kind, rule) in cases {
            let got = policy.decide(&message(topic, size), facts);
            assert_eq!(
                (got.destination.kind(), got.rule.as_str()),
                (kind, rule),
                "{topic} {size} B"
            );
        }
        let alarm = policy.decide(&message("sites/1/alarms/fire", 10), Facts::default());
        assert_eq!(alarm.destination, iot_core("fleet/alarms", 0));
        let bulk = policy.decide(&message("bulk/x", 10), Facts::default());
        assert_eq!(
            bulk.destination,
            Destination::Kinesis {
                stream: "bulk-stream".into(),
                partition_key: "dev-1".into(),
                explicit_hash_key: None
            }
        );
    }

    #[test]
    fn rule_templates_fill_in_per_message() {
        let policy = policy(
            r#"
            [[routing.rules]]
            name = "per-device"
            topic = "sites/+/alarms"
            destination = "iot-core"
            iot_topic = "fleet/${device.id}/alarms/${topic.1}"
            [[routing.rules]]
            name = "per-site"
            topic = "sites/+/telemetry"
            destination = "kinesis"
            stream = "site-${topic.1}"
            partition_key = "${topic.1}/${device.id}"
            [[routing.rules]]
            name = "bad"
            topic = "bad/#"
            destination = "iot-core"
            iot_topic = "x/${topic}"
            "#,
        );
        let got = policy.decide(&message("sites/12/alarms", 10), Facts::default());
        assert_eq!(got.destination, iot_core("fleet/dev-1/alarms/12", 1));
        let got = policy.decide(&message("sites/12/telemetry", 10), Facts::default());
        assert_eq!(
            got.destination,
            Destination::Kinesis {
                stream: "site-12".into(),
                partition_key: "12/dev-1".into(),
                explicit_hash_key: None
            }
        );
        let got = policy.decide(&message("bad/a/b/c/d/e/f/g", 10), Facts::default());
        assert_eq!(got.destination, Destination::DeadLetter, "{got}");
        assert!(got.reason.contains("slashes"), "{}", got.reason);
    }

    #[test]
    fn default_destination_is_configurable() {
        let policy = policy("[routing]\ndefault_destination = \"kinesis\"\nkinesis_stream = \"s\"");
        let got = policy.decide(&message("a", 10), Facts::default());
        assert_eq!(got.destination.kind(), "kinesis");
    }

    #[test]
    fn plugins_override_within_the_hard_limits() {
        let policy = policy(RULES);
        let small = message("a/b", 100);
        let builtin = policy.decide(&small, Facts::default());
        let kinesis = Destination::Kinesis {
            stream: String::new(),
            partition_key: String::new(),
            explicit_hash_key: None,
        };
        let got = policy.overrule(
            builtin.clone(),
            "r",
            Some(kinesis.clone()),
            "my reason",
            &small,
        );
        assert_eq!(got.rule, "plugin:r");
        assert_eq!(got.reason, "my reason");
        assert_eq!(
            got.destination,
            Destination::Kinesis {
                stream: "main".into(),
                partition_key: "dev-1".into(),
                explicit_hash_key: None
            }
        );
        assert_eq!(
            policy.overrule(builtin.clone(), "r", None, "no opinion", &small),
            builtin
        );

        let big = message("a/b", 300 * 1024);
        let builtin = policy.decide(&big, Facts::default());
        let got = policy.overrule(
            builtin.clone(),
            "r",
            Some(iot_core("", 1)),
            "want iot",
            &big,
        );
        assert_eq!(got.destination, builtin.destination);
        assert_eq!(got.rule, "builtin:payload-over-iot-core-limit");
        assert!(got.reason.contains("overruled"), "{}", got.reason);

        for bad in [
            iot_core("a/#", 1),
            iot_core("a", 2),
            Destination::Kinesis {
                stream: "bad stream".into(),
                partition_key: String::new(),
                explicit_hash_key: None,
            },
            Destination::Kinesis {
                stream: String::new(),
                partition_key: "k".repeat(257),
                explicit_hash_key: None,
            },
            Destination::Kinesis {
                stream: String::new(),
                partition_key: String::new(),
                explicit_hash_key: Some("x".into()),
            },
        ] {
            let builtin = policy.decide(&small, Facts::default());
            let got = policy.overrule(builtin.clone(), "r", Some(bad.clone()), "bad", &small);
            assert_eq!(
                got.destination, builtin.destination,
                "{bad:?} should be overruled"
            );
        }
    }
}
