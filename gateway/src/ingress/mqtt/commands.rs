//! An MQTT session's subscriptions, and the downlink's commands sent on them.
//!
//! A SUBSCRIBE is checked filter by filter against the policy's `subscribe` grants (a
//! grant's filter must cover the subscription's) and takes at most
//! [`MAX_FILTERS_PER_SUBSCRIBE`] filters, as IoT Core does; the rest are refused in the
//! SUBACK. Each of the device's commands whose topic a subscription matches is sent as a
//! PUBLISH at the highest QoS granted among the matching ones (at most 1). A QoS 0
//! command leaves the queue when it is written; a QoS 1 command when the device's PUBACK
//! comes, so one in flight when the connection drops goes again on the next (after a
//! gateway restart too: the queue is on disk). At most the client's receive maximum of
//! them are in flight at once.

use std::collections::HashMap;

use bytes::BytesMut;

use crate::auth::Identity;
use crate::downlink::Command;
use crate::ingress::admit::DeviceRules;
use crate::ingress::mqtt::codec::{self, Version};
use crate::topic::TopicFilter;

/// IoT Core's limit of topic filters in one SUBSCRIBE.
pub const MAX_FILTERS_PER_SUBSCRIBE: usize = 8;

/// A subscription.
struct Subscription {
    filter: String,
    parsed: TopicFilter,
    qos: u8,
}

/// What one round of delivery produced.
#[derive(Default)]
pub struct Sending {
    /// The PUBLISH packets, to write in order.
    pub bytes: BytesMut,
    /// Commands done once the bytes are written (QoS 0).
    pub done: Vec<u64>,
    /// Commands in `bytes`.
    pub sent: u64,
}

/// A session's subscriptions and QoS 1 commands in flight.
pub struct Outbound {
    subscriptions: Vec<Subscription>,
    /// Per packet id, the command's place in the queue.
    in_flight: HashMap<u16, u64>,
    last_pkid: u16,
    max_in_flight: usize,
}

impl Outbound {
    /// No subscriptions; at most `max_in_flight` unacknowledged commands.
    pub fn new(max_in_flight: u16) -> Outbound {
        Outbound {
            subscriptions: Vec::new(),
            in_flight: HashMap::new(),
            last_pkid: 0,
            max_in_flight: usize::from(max_in_flight.max(1)),
        }
    }

    /// Takes a SUBSCRIBE's filters; per filter, the QoS granted or `None` (refused).
    pub fn subscribe(
        &mut self,
        rules: &DeviceRules,
        identity: &Identity,
        filters: &[(String, u8)],
    ) -> Vec<Option<u8>> {
        filters
            .iter()
            .enumerate()
            .map(|(index, (filter, qos))| {
                if index >= MAX_FILTERS_PER_SUBSCRIBE
                    || !rules.policy.may_subscribe_filter(identity, filter)
                {
                    return None;
                }
                let parsed = TopicFilter::parse(filter).ok()?;
                let qos = (*qos).min(1);
                self.subscriptions.retain(|s| s.filter != *filter);
                self.subscriptions.push(Subscription {
                    filter: filter.clone(),
                    parsed,
                    qos,
                });
                Some(qos)
            })
            .collect()
    }

    /// Takes back subscriptions kept from an earlier connection, each checked again
    /// against the policy now.
    pub fn restore(&mut self, rules: &DeviceRules, identity: &Identity, saved: &[(String, u8)]) {
        for chunk in saved.chunks(MAX_FILTERS_PER_SUBSCRIBE) {
            self.subscribe(rules, identity, chunk);
        }
    }

    /// Ends subscriptions.
    pub fn unsubscribe(&mut self, filters: &[String]) {
        self.subscriptions.retain(|s| !filters.contains(&s.filter));
    }

    /// The subscriptions, as saved between connections.
    pub fn filters(&self) -> Vec<(String, u8)> {
        self.subscriptions
            .iter()
            .map(|s| (s.filter.clone(), s.qos))
            .collect()
    }

    /// The QoS a command on `topic` goes at, if a subscription matches it.
    fn qos_for(&self, topic: &str) -> Option<u8> {
        self.subscriptions
            .iter()
            .filter(|s| s.parsed.matches(topic))
            .map(|s| s.qos)
            .max()
    }

    /// A PUBACK from the device: the command it confirms, if one was in flight.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid)
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }

    /// How many more commands may be in flight (none without a subscription).
    pub fn room(&self) -> usize {
        if self.subscriptions.is_empty() {
            return 0;
        }
        self.max_in_flight.saturating_sub(self.in_flight.len())
    }

    /// Whether a subscription matches a command on `topic`.
    pub fn wants(&self, topic: &str) -> bool {
        self.qos_for(topic).is_some()
    }

    /// Encodes `commands` (taken from the session's queue, the policy checked) as
    /// PUBLISHes, each at the QoS its subscriptions grant.
    pub fn encode(&mut self, commands: Vec<(u64, Command)>, version: Version) -> Sending {
        let mut sending = Sending::default();
        for (seq, command) in commands {
            let qos = self.qos_for(&command.topic).unwrap_or(0);
            let pkid = if qos == 1 {
                let pkid = self.next_pkid();
                self.in_flight.insert(pkid, seq);
                pkid
            } else {
                sending.done.push(seq);
                0
            };
            sending.sent += 1;
            sending.bytes.extend_from_slice(&codec::publish(
                version,
                &command.topic,
                &command.payload,
                qos,
                pkid,
            ));
        }
        sending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut outbound = Outbound::new(4);
        outbound.last_pkid = u16::MAX - 1;
        outbound.in_flight.insert(u16::MAX, 7);
        outbound.in_flight.insert(1, 8);
        assert_eq!(outbound.next_pkid(), 2);
        assert_eq!(outbound.acked(u16::MAX), Some(7));
        assert_eq!(outbound.acked(u16::MAX), None, "acknowledged once");
    }
}
