//! Per-device policy, default deny: which topics a device may publish to and receive
//! commands on, and how fast it may send.
//!
//! Grants come from `[[policy.grants]]`. A grant applies to a device named in its
//! `devices` (or `*`) or belonging to one of its `groups`. A publish is allowed when an
//! applicable grant has a `publish` filter matching the topic (`${device.id}` stands for
//! the device's own id); the first such grant's limits apply to it. Limits are token
//! buckets per device and grant (`governor`): messages per second and payload bytes per
//! second, each allowing a burst of one second's worth. The policy runs before any
//! plugin, so plugins cannot widen it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::Identity;
use crate::config::{GrantConfig, PolicyConfig};
use crate::template::{DEVICE_ID, THING_NAME};
use crate::topic::TopicFilter;

/// Why the policy refused a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `403 topic_denied`: no grant lets this device publish there.
    Denied {
        /// The topic.
        topic: String,
    },
    /// `413 payload_too_large`: over the grant's `max_payload_bytes`.
    TooLarge {
        /// The grant.
        grant: String,
        /// Its limit.
        limit: usize,
        /// The payload's size.
        size: usize,
    },
    /// `413 payload_too_large`: more messages in one request than the grant's
    /// `max_messages_per_sec` (no wait would let them through).
    TooMany {
        /// The grant.
        grant: String,
        /// Its `max_messages_per_sec`.
        limit: u32,
        /// Messages in the request under that grant.
        count: u32,
    },
    /// `429 rate_limited` with `Retry-After`.
    RateLimited {
        /// The grant.
        grant: String,
        /// `max_messages_per_sec` or `max_bytes_per_sec`.
        limit: &'static str,
        /// When the device may send again.
        retry_after: Duration,
    },
}

struct Grant {
    config: GrantConfig,
    /// The grant's `publish` and `subscribe` filters that name no `${…}`, parsed once:
    /// they stand for the same filter for every device (most grants' do), and parsing
    /// one per message was 1.2% of the HTTP path's profile.
    fixed: HashMap<String, TopicFilter>,
    messages: Option<DefaultKeyedRateLimiter<String>>,
    bytes: Option<(DefaultKeyedRateLimiter<String>, u32)>,
}

impl Grant {
    fn applies_to(&self, identity: &Identity) -> bool {
        self.config
            .devices
            .iter()
            .any(|d| d == "*" || *d == identity.device_id)
            || self
                .config
                .groups
                .iter()
                .any(|g| identity.groups.contains(g))
    }

    fn allows(&self, filters: &[String], identity: &Identity, topic: &str) -> bool {
        filters.iter().any(|filter| {
            self.filter(filter, identity)
                .is_some_and(|f| f.matches(topic))
        })
    }

    /// `pattern` for `identity`: `${thing.name}` is the grant's `thing_name` (the device
    /// id unless it says otherwise), `${device.id}` the device id, `${claims.NAME}` the
    /// token's claim; `None` when a claim it names is missing or unusable (the pattern
    /// then allows nothing).
    fn expand(&self, pattern: &str, identity: &Identity) -> Option<String> {
        let thing = self.config.thing_name.as_deref().unwrap_or(DEVICE_ID);
        let pattern = pattern.replace(THING_NAME, thing);
        let pattern = crate::template::with_claims(&pattern, |name| identity.claim(name))?;
        Some(crate::template::for_device(&pattern, &identity.device_id))
    }

    /// The topic filter `pattern` stands for, for `identity`.
    fn filter(&self, pattern: &str, identity: &Identity) -> Option<Cow<'_, TopicFilter>> {
        if let Some(fixed) = self.fixed.get(pattern) {
            return Some(Cow::Borrowed(fixed));
        }
        TopicFilter::parse(&self.expand(pattern, identity)?)
            .ok()
            .map(Cow::Owned)
    }
}

/// The device policy.
pub struct DevicePolicy {
    /// `false`: no `[policy]` and no `[auth]`: everything is allowed.
    enforced: bool,
    grants: Vec<Grant>,
    clock: DefaultClock,
}

impl DevicePolicy {
    /// From `[policy]`; enforced when it is present or `auth_configured`.
    pub fn new(config: Option<&PolicyConfig>, auth_configured: bool) -> DevicePolicy {
        let per_second = |n: u32| Quota::per_second(NonZeroU32::new(n.max(1)).expect("at least 1"));
        let grants = config
            .map(|c| c.grants.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|config| Grant {
                fixed: config
                    .publish
                    .iter()
                    .chain(&config.subscribe)
                    .filter(|pattern| !pattern.contains("${"))
                    .filter_map(|pattern| {
                        Some((pattern.clone(), TopicFilter::parse(pattern).ok()?))
                    })
                    .collect(),
                messages: config
                    .max_messages_per_sec
                    .map(|n| RateLimiter::keyed(per_second(n))),
                bytes: config
                    .max_bytes_per_sec
                    .map(|n| (RateLimiter::keyed(per_second(n)), n)),
                config,
            })
            .collect();
        DevicePolicy {
            enforced: config.is_some() || auth_configured,
            grants,
            clock: DefaultClock::default(),
        }
    }

    /// Checks the messages `identity` publishes, each a topic and its size (payload and
    /// attributes). Each message is held to the grant that allows its topic: its size to
    /// that grant's `max_payload_bytes`, and it counts against that grant's rates. The
    /// rates are taken only once every message passed the topic and size checks; a
    /// batch refused by one grant's rate may already have used another grant's.
    pub fn check_publish<'a>(
        &self,
        identity: &Identity,
        messages: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<(), Refusal> {
        if !self.enforced {
            return Ok(());
        }
        // Per grant (by index): messages and bytes to take from its rates.
        let mut usage: Vec<(usize, u32, usize)> = Vec::new();
        for (topic, size) in messages {
            let (index, grant) = self
                .grants
                .iter()
                .enumerate()
                .find(|(_, g)| {
                    g.applies_to(identity) && g.allows(&g.config.publish, identity, topic)
                })
                .ok_or_else(|| Refusal::Denied {
                    topic: topic.to_string(),
                })?;
            if let Some(limit) = grant.config.max_payload_bytes
                && size > limit
            {
                return Err(Refusal::TooLarge {
                    grant: grant.config.name.clone(),
                    limit,
                    size,
                });
            }
            match usage.iter_mut().find(|(i, _, _)| *i == index) {
                Some((_, count, bytes)) => {
                    *count = count.saturating_add(1);
                    *bytes += size;
                }
                None => usage.push((index, 1, size)),
            }
        }
        for (index, count, bytes) in usage {
            self.take_rates(&self.grants[index], identity, count, bytes)?;
        }
        Ok(())
    }

    /// Takes `count` messages of `bytes` from `grant`'s rates for `identity`.
    fn take_rates(
        &self,
        grant: &Grant,
        identity: &Identity,
        count: u32,
        bytes: usize,
    ) -> Result<(), Refusal> {
        let name = &grant.config.name;
        let key = &identity.device_id;
        let now = self.clock.now();
        if let Some(limiter) = &grant.messages {
            let n = NonZeroU32::new(count.max(1)).expect("at least 1");
            match limiter.check_key_n(key, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(Refusal::RateLimited {
                        grant: name.clone(),
                        limit: "max_messages_per_sec",
                        retry_after: not_until.wait_time_from(now),
                    });
                }
                // More messages at once than the grant allows in a second: waiting would
                // never help.
                Err(_) => {
                    return Err(Refusal::TooMany {
                        grant: name.clone(),
                        limit: grant.config.max_messages_per_sec.unwrap_or(0),
                        count,
                    });
                }
            }
        }
        if let Some((limiter, per_sec)) = &grant.bytes
            && bytes > 0
        {
            if bytes > *per_sec as usize {
                return Err(Refusal::TooLarge {
                    grant: name.clone(),
                    limit: *per_sec as usize,
                    size: bytes,
                });
            }
            let n = NonZeroU32::new(bytes as u32).expect("more than 0");
            if let Ok(Err(not_until)) = limiter.check_key_n(key, n) {
                return Err(Refusal::RateLimited {
                    grant: name.clone(),
                    limit: "max_bytes_per_sec",
                    retry_after: not_until.wait_time_from(now),
                });
            }
        }
        Ok(())
    }

    /// Forgets the rate-limit state of devices whose buckets are full again (idle for
    /// a second or more), so that the state follows the active devices, not every device
    /// ever seen.
    pub fn prune(&self) {
        for grant in &self.grants {
            if let Some(limiter) = &grant.messages {
                limiter.retain_recent();
            }
            if let Some((limiter, _)) = &grant.bytes {
                limiter.retain_recent();
            }
        }
    }

    /// Whether a grant lets `identity` publish to `topic` (no size or rate checked: a
    /// last will's topic, at CONNECT).
    pub fn may_publish(&self, identity: &Identity, topic: &str) -> bool {
        !self.enforced
            || self
                .grants
                .iter()
                .any(|g| g.applies_to(identity) && g.allows(&g.config.publish, identity, topic))
    }

    /// Whether a grant lets `identity` publish on every topic `filter` matches (one of
    /// its `publish` filters covers it): all the named shadows of a thing, to list them.
    pub fn may_publish_all(&self, identity: &Identity, filter: &str) -> bool {
        let Ok(wanted) = TopicFilter::parse(filter) else {
            return false;
        };
        !self.enforced
            || self.grants.iter().any(|g| {
                g.applies_to(identity)
                    && g.config.publish.iter().any(|granted| {
                        g.filter(granted, identity)
                            .is_some_and(|granted| granted.covers(&wanted))
                    })
            })
    }

    /// Whether `identity` may subscribe to `filter`: a grant's `subscribe` filter covers
    /// it (`cmd/${device.id}/#` covers `cmd/dev-1/+`, not `cmd/#`). A shared
    /// subscription (`$share/{group}/{filter}`) is covered by a grant's shared filter
    /// (`$share/+/jobs/#` covers `$share/workers/jobs/#`) or by one that covers its
    /// filter.
    pub fn may_subscribe_filter(&self, identity: &Identity, filter: &str) -> bool {
        let (Ok(wanted), Ok(messages)) = (
            TopicFilter::parse(filter),
            TopicFilter::parse(crate::topic::unshared(filter)),
        ) else {
            return false;
        };
        !self.enforced
            || self.grants.iter().any(|g| {
                g.applies_to(identity)
                    && g.config.subscribe.iter().any(|granted| {
                        g.filter(granted, identity).is_some_and(|granted| {
                            granted.covers(&wanted) || granted.covers(&messages)
                        })
                    })
            })
    }

    /// Whether a grant of `identity` names `client_id` itself (not by a trailing `*`): the
    /// device may take it over from another device (a console's shared client id).
    pub fn names_client_id(&self, identity: &Identity, client_id: &str) -> bool {
        self.grants.iter().any(|g| {
            g.applies_to(identity)
                && g.config.client_ids.iter().any(|pattern| {
                    !pattern.ends_with('*')
                        && g.expand(pattern, identity)
                            .is_some_and(|id| id == client_id)
                })
        })
    }

    /// Whether `identity` may connect over MQTT as `client_id`: its own device id always;
    /// another when a grant's `client_ids` names it (`${device.id}` is the device's id; a
    /// trailing `*` matches any rest).
    pub fn may_use_client_id(&self, identity: &Identity, client_id: &str) -> bool {
        client_id == identity.device_id
            || self.grants.iter().any(|g| {
                g.applies_to(identity)
                    && g.config.client_ids.iter().any(|pattern| {
                        let Some(pattern) = g.expand(pattern, identity) else {
                            return false;
                        };
                        match pattern.strip_suffix('*') {
                            Some(prefix) => client_id.starts_with(prefix),
                            None => client_id == pattern,
                        }
                    })
            })
    }

    /// Whether `identity` may receive a message on `topic` (a shared filter in a grant
    /// stands for its filter).
    pub fn may_subscribe(&self, identity: &Identity, topic: &str) -> bool {
        !self.enforced
            || self.grants.iter().any(|g| {
                g.applies_to(identity)
                    && g.config.subscribe.iter().any(|filter| {
                        g.expand(filter, identity).is_some_and(|filter| {
                            TopicFilter::parse(crate::topic::unshared(&filter))
                                .is_ok_and(|f| f.matches(topic))
                        })
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Method;

    fn policy() -> DevicePolicy {
        let config: PolicyConfig = toml::from_str(
            r#"
            [[grants]]
            name = "own"
            devices = ["*"]
            publish = ["devices/${device.id}/#"]
            subscribe = ["cmd/${device.id}/#"]
            max_messages_per_sec = 3
            [[grants]]
            name = "consoles"
            groups = ["consoles"]
            client_ids = ["${device.id}-*", "shared-console"]
            [[grants]]
            name = "ops"
            groups = ["ops"]
            publish = ["fleet/#"]
            max_payload_bytes = 10
            [[grants]]
            name = "workers"
            groups = ["workers"]
            subscribe = ["$share/+/jobs/#"]
            [[grants]]
            name = "plant-a"
            groups = ["plant-a"]
            thing_name = "plant-a-${device.id}"
            publish = ["$aws/things/${thing.name}/shadow/#"]
            subscribe = ["$aws/things/${thing.name}/shadow/#"]
            "#,
        )
        .unwrap();
        DevicePolicy::new(Some(&config), true)
    }

    fn device(id: &str, groups: &[&str]) -> Identity {
        Identity {
            device_id: id.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            method: Method::Token,
            expires_at_secs: None,
            certificate: None,
            claims: Vec::new(),
        }
    }

    /// A shared subscription is allowed by a grant's shared filter or by one covering
    /// its filter; the messages it brings are allowed by the filter inside the grant's.
    #[test]
    fn shared_subscriptions_are_held_to_their_filter() {
        let policy = policy();
        let plain = device("dev-1", &[]);
        let worker = device("w-1", &["workers"]);
        assert!(policy.may_subscribe_filter(&plain, "$share/g/cmd/dev-1/#"));
        assert!(!policy.may_subscribe_filter(&plain, "$share/g/cmd/#"));
        assert!(!policy.may_subscribe_filter(&plain, "$share/g/jobs/#"));
        assert!(policy.may_subscribe_filter(&worker, "$share/pool/jobs/#"));
        assert!(
            !policy.may_subscribe_filter(&worker, "jobs/#"),
            "shared only"
        );
        assert!(policy.may_subscribe(&worker, "jobs/17"));
        assert!(!policy.may_subscribe(&worker, "other/17"));
    }

    /// A grant's `thing_name` maps the device id to its thing name in the grant's
    /// filters.
    #[test]
    fn a_grant_maps_the_device_id_to_its_thing_name() {
        let policy = policy();
        let pump = device("p1", &["plant-a"]);
        assert!(policy.may_publish(&pump, "$aws/things/plant-a-p1/shadow/update"));
        assert!(!policy.may_publish(&pump, "$aws/things/p1/shadow/update"));
        assert!(policy.may_subscribe_filter(&pump, "$aws/things/plant-a-p1/shadow/update/+"));
        assert!(policy.may_subscribe(&pump, "$aws/things/plant-a-p1/shadow/update/delta"));
        assert!(!policy.may_subscribe(&pump, "$aws/things/plant-a-p2/shadow/update/delta"));
    }

    #[test]
    fn client_ids_subscriptions_and_will_topics() {
        let policy = policy();
        let plain = device("dev-1", &[]);
        let console = device("dev-1", &["consoles"]);
        assert!(policy.may_use_client_id(&plain, "dev-1"));
        assert!(!policy.may_use_client_id(&plain, "dev-1-ui"));
        assert!(policy.may_use_client_id(&console, "dev-1-ui"));
        assert!(policy.names_client_id(&console, "shared-console"));
        assert!(
            !policy.names_client_id(&console, "dev-1-ui"),
            "by a pattern"
        );
        assert!(policy.may_use_client_id(&console, "shared-console"));
        assert!(!policy.may_use_client_id(&console, "dev-2-ui"));
        assert!(policy.may_subscribe_filter(&plain, "cmd/dev-1/+"));
        assert!(!policy.may_subscribe_filter(&plain, "cmd/#"));
        assert!(!policy.may_subscribe_filter(&plain, "cmd/dev-1/#/x"));
        assert!(policy.may_publish(&plain, "devices/dev-1/status"));
        assert!(!policy.may_publish(&plain, "devices/dev-2/status"));
    }

    #[test]
    fn devices_publish_only_where_a_grant_allows() {
        let policy = policy();
        let a = device("a", &[]);
        assert!(policy.check_publish(&a, [("devices/a/temp", 1)]).is_ok());
        assert_eq!(
            policy.check_publish(&a, [("devices/b/temp", 1)]),
            Err(Refusal::Denied {
                topic: "devices/b/temp".to_string()
            })
        );
        assert!(policy.check_publish(&a, [("fleet/x", 1)]).is_err());
        let ops = device("o", &["ops"]);
        assert!(policy.check_publish(&ops, [("fleet/x", 5)]).is_ok());
        assert!(matches!(
            policy.check_publish(&ops, [("fleet/x", 11)]),
            Err(Refusal::TooLarge { limit: 10, .. })
        ));
        assert!(policy.may_subscribe(&a, "cmd/a/reboot"));
        assert!(!policy.may_subscribe(&a, "cmd/b/reboot"));
    }

    #[test]
    fn a_device_over_its_rate_is_told_when_to_retry() {
        let policy = policy();
        let a = device("a", &[]);
        for _ in 0..3 {
            policy.check_publish(&a, [("devices/a/t", 1)]).unwrap();
        }
        match policy.check_publish(&a, [("devices/a/t", 1)]) {
            Err(Refusal::RateLimited {
                retry_after, limit, ..
            }) => {
                assert_eq!(limit, "max_messages_per_sec");
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        // Another device has its own bucket.
        assert!(
            policy
                .check_publish(&device("b", &[]), [("devices/b/t", 1)])
                .is_ok()
        );
    }

    /// A batch mixing topics holds each message to its own grant: a message under a
    /// strict grant cannot ride along behind one under a lenient grant.
    #[test]
    fn each_message_of_a_batch_is_held_to_its_own_grant() {
        let config: PolicyConfig = toml::from_str(
            r#"
            [[grants]]
            name = "status"
            devices = ["*"]
            publish = ["status/#"]
            [[grants]]
            name = "telemetry"
            devices = ["*"]
            publish = ["telemetry/#"]
            max_payload_bytes = 10
            max_messages_per_sec = 1
            "#,
        )
        .unwrap();
        let policy = DevicePolicy::new(Some(&config), true);
        let a = device("a", &[]);
        let refused = policy.check_publish(&a, [("status/x", 1), ("telemetry/t", 42)]);
        assert!(
            matches!(refused, Err(Refusal::TooLarge { ref grant, limit: 10, size: 42 }) if grant == "telemetry"),
            "{refused:?}"
        );
        let batch = [("status/x", 1), ("telemetry/t", 5), ("telemetry/t", 5)];
        assert!(
            matches!(
                policy.check_publish(&a, batch),
                Err(Refusal::TooMany { ref grant, limit: 1, count: 2 }) if grant == "telemetry"
            ),
            "two telemetry messages in one request exceed its 1 msg/s for good"
        );
        // Status has no limits: many of them pass.
        let statuses = [("status/x", 1000); 50];
        assert!(policy.check_publish(&a, statuses).is_ok());
    }

    #[test]
    fn without_policy_or_auth_everything_is_allowed() {
        let open = DevicePolicy::new(None, false);
        assert!(
            open.check_publish(&device("x", &[]), [("any/topic", 1)])
                .is_ok()
        );
    }
}
