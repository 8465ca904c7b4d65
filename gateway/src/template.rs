//! Templates for destinations in topic rules: `fleet/${device.id}/alarms`,
//! `telemetry-${topic.1}`. Variables: `${device.id}`, `${topic}` (the whole topic) and
//! `${topic.N}` (level N of the topic, from 0; empty when the topic is shorter).
//!
//! Policy grants, client-id patterns and `[upstream]`'s command and reply topics take `${device.id}`:
//! [`for_device`] fills it in; grants take a token's claims too (`${claims.site}`,
//! [`with_claims`]).

use crate::message::Message;

/// The variable that stands for a device's own id.
pub const DEVICE_ID: &str = "${device.id}";

/// The variable that stands for a device's thing name in policy grants (its
/// `thing_name`, by default the device id).
pub const THING_NAME: &str = "${thing.name}";

/// How a variable naming one of a token's claims starts (`${claims.site}`), in policy
/// grants.
pub const CLAIMS_PREFIX: &str = "${claims.";

/// `pattern` with every `${claims.NAME}` replaced by the claim `NAME` that `claim` finds;
/// `None` when a claim it names is missing, or holds a value that would reach across
/// topic levels (`/`, `+`, `#`) or is empty: a grant's filter then allows nothing.
pub fn with_claims<'a>(pattern: &str, claim: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find(CLAIMS_PREFIX) {
        out.push_str(&rest[..at]);
        let after = &rest[at + CLAIMS_PREFIX.len()..];
        let end = after.find('}')?;
        let value = claim(&after[..end])?;
        if value.is_empty() || value.contains(['/', '+', '#']) {
            return None;
        }
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `pattern` with every `${device.id}` replaced by `device`: a device's id, `+` for any
/// device (a topic filter), or a sample id (to validate the pattern).
pub fn for_device(pattern: &str, device: &str) -> String {
    pattern.replace(DEVICE_ID, device)
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    DeviceId,
    Topic,
    TopicLevel(usize),
}

impl Template {
    /// Parses a template, refusing unknown variables and unclosed `${`.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("`{text}`: `${{` without a closing `}}`"))?;
            let name = &after[..end];
            parts.push(match name {
                "device.id" => Part::DeviceId,
                "topic" => Part::Topic,
                _ => match name.strip_prefix("topic.").and_then(|n| n.parse::<usize>().ok()) {
                    Some(level) if level < 8 => Part::TopicLevel(level),
                    _ => {
                        return Err(format!(
                            "`{text}`: unknown variable `${{{name}}}` (known: ${{device.id}}, ${{topic}}, ${{topic.0}} to ${{topic.7}})"
                        ));
                    }
                },
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The template filled in for `message`.
    pub fn render(&self, message: &Message) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::DeviceId => out.push_str(&message.device_id),
                Part::Topic => out.push_str(&message.topic),
                Part::TopicLevel(level) => {
                    out.push_str(message.topic.split('/').nth(*level).unwrap_or(""))
                }
            }
        }
        out
    }

    /// Renders with sample values, for checking a template's output at config time.
    pub fn sample(&self) -> String {
        let message = Message {
            id: String::new(),
            device_id: "device".to_string(),
            topic: "a/b/c/d/e/f/g/h".to_string(),
            content_type: String::new(),
            qos: 0,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: Vec::new(),
        };
        self.render(&message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim fills its variable; a missing claim, an empty one, or one that would
    /// reach across topic levels leaves the pattern allowing nothing.
    #[test]
    fn claims_fill_grants_only_with_single_level_values() {
        let claims = [
            ("site", "paris"),
            ("bad", "a/b"),
            ("wild", "#"),
            ("empty", ""),
        ];
        let claim = |name: &str| {
            claims
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| *value)
        };
        assert_eq!(
            with_claims("sites/${claims.site}/${device.id}/#", claim).as_deref(),
            Some("sites/paris/${device.id}/#")
        );
        assert_eq!(
            with_claims("no/claims", claim).as_deref(),
            Some("no/claims")
        );
        for pattern in [
            "s/${claims.missing}",
            "s/${claims.bad}",
            "s/${claims.wild}",
            "s/${claims.empty}",
            "s/${claims.site",
        ] {
            assert_eq!(with_claims(pattern, claim), None, "{pattern}");
        }
    }

    fn message(device: &str, topic: &str) -> Message {
        Message {
            id: String::new(),
            device_id: device.to_string(),
            topic: topic.to_string(),
            content_type: String::new(),
            qos: 0,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: Vec::new(),
        }
    }

    #[test]
    fn templates_fill_in_device_and_topic() {
        let m = message("pump-7", "sites/12/alarms");
        let cases = [
            ("fleet/${device.id}/alarms", "fleet/pump-7/alarms"),
            ("telemetry-${topic.1}", "telemetry-12"),
            ("${topic}", "sites/12/alarms"),
            ("x${topic.5}y", "xy"),
            ("plain", "plain"),
            ("${device.id}${device.id}", "pump-7pump-7"),
        ];
        for (template, expected) in cases {
            assert_eq!(
                Template::parse(template).unwrap().render(&m),
                expected,
                "{template}"
            );
        }
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in ["${device}", "${topic.9}", "a${", "${nope}x"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
