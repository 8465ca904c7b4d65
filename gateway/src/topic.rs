//! MQTT topic filters and IoT Core's rules for publish topics.

/// IoT Core's maximum topic length in bytes (UTF-8).
pub const IOT_CORE_MAX_TOPIC_BYTES: usize = 256;
/// IoT Core's maximum number of forward slashes in a topic (8 levels).
pub const IOT_CORE_MAX_TOPIC_SLASHES: usize = 7;

/// A parsed MQTT topic filter: `+` matches one level, a trailing `#` the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`: any one level.
    One,
    /// `#`: this level and every one below (also the parent itself, as in MQTT).
    Rest,
}

impl TopicFilter {
    /// Parses a filter, refusing misplaced wildcards.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".to_string());
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::One,
                "#" if index + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("`{filter}`: `#` must be the last level")),
                text if text.contains(['+', '#']) => {
                    return Err(format!("`{filter}`: `+` and `#` must fill a whole level"));
                }
                text => Level::Exact(text.to_string()),
            };
            levels.push(level);
        }
        Ok(TopicFilter { levels })
    }

    /// Whether `topic` matches this filter. As MQTT requires, a wildcard in the first
    /// level does not match a topic starting with `$` (`#` does not match `$aws/…`;
    /// `$aws/#` does).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && matches!(self.levels.first(), Some(Level::One | Level::Rest)) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match (level, parts.next()) {
                (Level::Rest, _) => return true,
                (Level::One, Some(_)) => {}
                (Level::Exact(want), Some(got)) if want == got => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

impl TopicFilter {
    /// Whether every topic `other` matches, this filter matches too (a grant's filter
    /// covering a subscription's).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        for index in 0.. {
            match (self.levels.get(index), other.levels.get(index)) {
                (Some(Level::Rest), _) | (None, None) => return true,
                (Some(Level::One), Some(Level::One | Level::Exact(_))) => {}
                (Some(Level::Exact(want)), Some(Level::Exact(got))) if want == got => {}
                _ => return false,
            }
        }
        unreachable!("the loop returns")
    }
}

/// Checks a topic a device publishes to, by IoT Core's rules: not empty, at most 256
/// bytes and 7 slashes, no wildcards, no NUL. A Basic Ingest topic's prefix
/// (`$aws/rules/{rule}/`) does not count towards the length and the slashes, as at IoT
/// Core.
pub fn validate_publish_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".to_string());
    }
    let topic = topic
        .strip_prefix(BASIC_INGEST_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .map_or(topic, |(_, rest)| rest);
    if topic.is_empty() {
        return Err("the topic is empty after the Basic Ingest prefix".to_string());
    }
    if topic.len() > IOT_CORE_MAX_TOPIC_BYTES {
        return Err(format!(
            "the topic is {} bytes, over IoT Core's limit of {IOT_CORE_MAX_TOPIC_BYTES}",
            topic.len()
        ));
    }
    let slashes = topic.matches('/').count();
    if slashes > IOT_CORE_MAX_TOPIC_SLASHES {
        return Err(format!(
            "the topic has {slashes} slashes, over IoT Core's limit of {IOT_CORE_MAX_TOPIC_SLASHES}"
        ));
    }
    if topic.contains(['+', '#']) {
        return Err("a publish topic cannot contain the wildcards `+` or `#`".to_string());
    }
    if topic.contains('\0') {
        return Err("the topic contains a NUL character".to_string());
    }
    Ok(())
}

/// The filter of a shared subscription (`$share/{group}/{filter}`: the messages that
/// match `filter` are shared among the group's subscribers); any other filter as it is.
pub fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, filter)| filter)
}

/// Basic Ingest topics begin with this, then the rule's name.
pub const BASIC_INGEST_PREFIX: &str = "$aws/rules/";

/// IoT Core's reserved topics begin with this.
pub const RESERVED_PREFIX: &str = "$aws/";

/// What a topic under IoT Core's reserved `$aws/` prefix is to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// `$aws/rules/{rule}/…`: Basic Ingest, straight to a rule (it goes through the
    /// gateway's way like any telemetry).
    BasicIngest,
    /// A request to one of IoT Core's services (shadow, jobs, fleet provisioning,
    /// Device Defender, secure tunnelling): answered by IoT Core on the session that sent
    /// it, so it goes through the device's own session, untouched.
    Request,
    /// A reply or notification only IoT Core publishes (`…/accepted`, `…/rejected`,
    /// `…/delta`, `…/documents`, `…/notify`, `…/notify-next`, `$aws/events/…`): a device
    /// may subscribe to it, never publish on it.
    Reply,
}

/// Whether `topic` is one of IoT Core's reserved topics, and which kind.
pub fn reserved(topic: &str) -> Option<Reserved> {
    let rest = topic.strip_prefix(RESERVED_PREFIX)?;
    if rest.starts_with("rules/") {
        return Some(Reserved::BasicIngest);
    }
    if rest.starts_with("events/") {
        return Some(Reserved::Reply);
    }
    let last = rest.rsplit('/').next().unwrap_or_default();
    if matches!(
        last,
        "accepted" | "rejected" | "delta" | "documents" | "notify" | "notify-next"
    ) {
        Some(Reserved::Reply)
    } else {
        Some(Reserved::Request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_topics_are_told_apart() {
        let cases = [
            ("telemetry/d1", None),
            ("$aws/rules/ingest/d1", Some(Reserved::BasicIngest)),
            ("$aws/things/d1/shadow/update", Some(Reserved::Request)),
            (
                "$aws/things/d1/shadow/name/cfg/get",
                Some(Reserved::Request),
            ),
            (
                "$aws/things/d1/shadow/update/accepted",
                Some(Reserved::Reply),
            ),
            ("$aws/things/d1/shadow/update/delta", Some(Reserved::Reply)),
            (
                "$aws/things/d1/shadow/update/documents",
                Some(Reserved::Reply),
            ),
            ("$aws/things/d1/jobs/start-next", Some(Reserved::Request)),
            ("$aws/things/d1/jobs/job-7/update", Some(Reserved::Request)),
            ("$aws/things/d1/jobs/notify-next", Some(Reserved::Reply)),
            ("$aws/things/d1/jobs/notify", Some(Reserved::Reply)),
            ("$aws/certificates/create/json", Some(Reserved::Request)),
            (
                "$aws/certificates/create/json/rejected",
                Some(Reserved::Reply),
            ),
            (
                "$aws/provisioning-templates/t/provision/json",
                Some(Reserved::Request),
            ),
            ("$aws/events/presence/connected/d1", Some(Reserved::Reply)),
        ];
        for (topic, kind) in cases {
            assert_eq!(reserved(topic), kind, "{topic}");
        }
    }

    #[test]
    fn filters_match_like_mqtt() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/x/c", true),
            ("a/+/c", "a/x/d", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c/d", true),
            ("a/#", "b/a", false),
            ("#", "anything/at/all", true),
            ("+/+", "a/b", true),
            ("+", "a/b", false),
            ("sites/+/alarms/#", "sites/12/alarms/fire/floor2", true),
            ("sites/+/alarms/#", "sites/12/temps", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            // Topics starting with `$` are not matched by a leading wildcard.
            ("#", "$aws/things/t/shadow/update", false),
            ("+/things/#", "$aws/things/t", false),
            ("$aws/#", "$aws/things/t", true),
            ("$aws/things/+/shadow/#", "$aws/things/t/shadow/get", true),
            ("a/#", "a/$b", true),
        ];
        for (filter, topic, expected) in cases {
            let parsed = TopicFilter::parse(filter).unwrap();
            assert_eq!(
                parsed.matches(topic),
                expected,
                "filter {filter:?} topic {topic:?}"
            );
        }
    }

    #[test]
    fn a_filter_covers_the_filters_it_matches_every_topic_of() {
        let cases = [
            ("cmd/dev-1/#", "cmd/dev-1/#", true),
            ("cmd/dev-1/#", "cmd/dev-1", true),
            ("cmd/dev-1/#", "cmd/dev-1/+/x", true),
            ("cmd/+/reboot", "cmd/dev-1/reboot", true),
            ("cmd/+/reboot", "cmd/+/reboot", true),
            ("cmd/dev-1/#", "cmd/#", false),
            ("cmd/dev-1/#", "cmd/+/reboot", false),
            ("cmd/dev-1/reboot", "cmd/dev-1/+", false),
            ("cmd/dev-1/+", "cmd/dev-1/#", false),
            ("cmd/dev-1", "cmd/dev-1/x", false),
        ];
        for (granted, wanted, covers) in cases {
            let granted_filter = TopicFilter::parse(granted).unwrap();
            let wanted_filter = TopicFilter::parse(wanted).unwrap();
            assert_eq!(
                granted_filter.covers(&wanted_filter),
                covers,
                "{granted} covers {wanted}"
            );
        }
    }

    #[test]
    fn misplaced_wildcards_are_refused() {
        for bad in ["", "a/#/b", "a/b#", "a+/b", "#/a"] {
            assert!(
                TopicFilter::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn publish_topics_follow_iot_core_rules() {
        assert!(validate_publish_topic("sites/12/temp").is_ok());
        assert!(validate_publish_topic("a/b/c/d/e/f/g/h").is_ok());
        // Basic Ingest's prefix is not counted.
        assert!(validate_publish_topic("$aws/rules/ingest/a/b/c/d/e/f/g/h").is_ok());
        let long = format!("$aws/rules/ingest/{}", "x".repeat(256));
        assert!(validate_publish_topic(&long).is_ok());
        let cases = [
            ("", "empty"),
            ("a/b/c/d/e/f/g/h/i", "8 slashes"),
            ("$aws/rules/ingest/a/b/c/d/e/f/g/h/i", "8 slashes"),
            ("$aws/rules/ingest/", "empty after"),
            ("a/+/b", "wildcards"),
            ("a/#", "wildcards"),
        ];
        for (topic, why) in cases {
            let error = validate_publish_topic(topic).unwrap_err();
            assert!(error.contains(why), "{topic:?}: {error}");
        }
        let long = "x".repeat(257);
        assert!(
            validate_publish_topic(&long)
                .unwrap_err()
                .contains("257 bytes")
        );
    }
}
