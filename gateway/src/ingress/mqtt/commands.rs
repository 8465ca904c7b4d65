//! An MQTT session's subscriptions, and what is sent to the device on them.
//!
//! A SUBSCRIBE is checked filter by filter against the policy's `subscribe` grants (a
//! grant's filter must cover the subscription's) and IoT Core's limits: at most
//! [`MAX_FILTERS_PER_SUBSCRIBE`] filters in one SUBSCRIBE and
//! [`crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS`] per session; the rest are refused in the
//! SUBACK.
//!
//! What the device receives comes from its own session at IoT Core when `[upstream]` is
//! configured ([`Outbound::relay`]: each message as IoT Core sent it, acknowledged there
//! once the device acknowledged it), otherwise from the downlink's queue: each command
//! whose topic a subscription matches is sent at the highest QoS granted among the
//! matching ones (at most 1); a QoS 0 command leaves the queue when it is written, a
//! QoS 1 command when the device's PUBACK comes, so one in flight when the connection
//! drops goes again on the next (after a gateway restart too: the queue is on disk).
//! Either way at most the client's receive maximum of QoS 1 messages are in flight.

use std::collections::HashMap;

use bytes::BytesMut;

use crate::auth::Identity;
use crate::downlink::Command;
use crate::ingress::admit::DeviceRules;
use crate::ingress::mqtt::codec::{self, Granted, SubscribeReasonCode, Version};
use crate::topic::TopicFilter;
use rumqttc::v5::mqttbytes::v5::Publish as UpstreamPublish;

/// IoT Core's limit of topic filters in one SUBSCRIBE.
pub const MAX_FILTERS_PER_SUBSCRIBE: usize = crate::quota::IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE;

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

/// A QoS 1 message sent to the device and not yet acknowledged.
pub enum InFlight {
    /// A downlink command: its place in the queue.
    Command(u64),
    /// A message from the device's session at IoT Core (its payload left out), to
    /// acknowledge there.
    Relayed(Box<UpstreamPublish>),
}

/// What [`Outbound::relay`] makes of a message from IoT Core.
pub enum Relay {
    /// The PUBLISH to write.
    Send(BytesMut),
    /// Over the device's Maximum Packet Size: not sent (MQTT 5 §3.1.2.11.4 has the
    /// server discard it as if delivered).
    TooLarge(usize),
}

/// A session's subscriptions and QoS 1 messages in flight.
pub struct Outbound {
    subscriptions: Vec<Subscription>,
    /// Per packet id, what the device has not acknowledged yet.
    in_flight: HashMap<u16, InFlight>,
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

    /// Checks a SUBSCRIBE's filters against the policy and IoT Core's limits, keeping
    /// nothing yet: per filter, the QoS it may have (at most 1) or why not.
    pub fn check(
        &self,
        rules: &DeviceRules,
        identity: &Identity,
        filters: &[(String, u8)],
    ) -> Vec<Granted> {
        let mut count = self.subscriptions.len();
        filters
            .iter()
            .enumerate()
            .map(|(index, (filter, qos))| {
                if index >= MAX_FILTERS_PER_SUBSCRIBE {
                    return Err(SubscribeReasonCode::QuotaExceeded);
                }
                TopicFilter::parse(filter).map_err(|_| SubscribeReasonCode::TopicFilterInvalid)?;
                if !rules.policy.may_subscribe_filter(identity, filter) {
                    return Err(SubscribeReasonCode::NotAuthorized);
                }
                if !self.subscriptions.iter().any(|s| s.filter == *filter) {
                    if count >= crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS {
                        return Err(SubscribeReasonCode::QuotaExceeded);
                    }
                    count += 1;
                }
                Ok((*qos).min(1))
            })
            .collect()
    }

    /// Keeps the subscriptions `granted` grants (a new one replaces an equal filter's).
    pub fn keep(&mut self, filters: &[(String, u8)], granted: &[Granted]) {
        for ((filter, _), granted) in filters.iter().zip(granted) {
            let (Ok(qos), Ok(parsed)) = (granted, TopicFilter::parse(filter)) else {
                continue;
            };
            self.subscriptions.retain(|s| s.filter != *filter);
            self.subscriptions.push(Subscription {
                filter: filter.clone(),
                parsed,
                qos: *qos,
            });
        }
    }

    /// Takes a SUBSCRIBE's filters as far as the policy and the limits allow.
    pub fn subscribe(
        &mut self,
        rules: &DeviceRules,
        identity: &Identity,
        filters: &[(String, u8)],
    ) -> Vec<Granted> {
        let granted = self.check(rules, identity, filters);
        self.keep(filters, &granted);
        granted
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

    /// A PUBACK from the device: what it confirms, if that was in flight.
    pub fn acked(&mut self, pkid: u16) -> Option<InFlight> {
        self.in_flight.remove(&pkid)
    }

    /// Whether the device's receive maximum leaves room for one more QoS 1 message.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    /// Encodes a message from the device's session at IoT Core for the device, unless
    /// it is over `max_packet` (the device's Maximum Packet Size). A QoS 1 one is in
    /// flight until the device's PUBACK.
    pub fn relay(
        &mut self,
        publish: &UpstreamPublish,
        version: Version,
        max_packet: Option<u32>,
    ) -> Relay {
        let at_least_once = publish.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce;
        // A packet id taken for a message then not sent is only skipped.
        let pkid = if at_least_once { self.next_pkid() } else { 0 };
        let bytes = codec::relayed(version, publish, pkid);
        let limit = max_packet.map_or(usize::MAX, |max| max as usize);
        if bytes.len() > limit {
            return Relay::TooLarge(bytes.len());
        }
        if at_least_once {
            let mut kept = publish.clone();
            kept.payload = bytes::Bytes::new();
            self.in_flight
                .insert(pkid, InFlight::Relayed(Box::new(kept)));
        }
        Relay::Send(bytes)
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
                self.in_flight.insert(pkid, InFlight::Command(seq));
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
        outbound.in_flight.insert(u16::MAX, InFlight::Command(7));
        outbound.in_flight.insert(1, InFlight::Command(8));
        assert_eq!(outbound.next_pkid(), 2);
        assert!(matches!(
            outbound.acked(u16::MAX),
            Some(InFlight::Command(7))
        ));
        assert!(outbound.acked(u16::MAX).is_none(), "acknowledged once");
    }
}
