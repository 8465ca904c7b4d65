//! An MQTT session's subscriptions, and the messages from the device's own session at
//! IoT Core on their way to the device.
//!
//! A SUBSCRIBE is checked filter by filter against the policy's `subscribe` grants (a
//! grant's filter must cover the subscription's) and IoT Core's limits: at most
//! [`MAX_FILTERS_PER_SUBSCRIBE`] filters in one SUBSCRIBE and
//! [`crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS`] per session, and a filter of at most
//! [`topic::IOT_CORE_MAX_TOPIC_BYTES`] bytes (a shared subscription's `$share/{group}/`
//! not counted); the rest are refused in the SUBACK. Each message from IoT Core is
//! relayed as IoT Core sent it ([`Outbound::relay`]) and acknowledged there once the
//! device acknowledged it; at most the client's receive maximum of QoS 1 messages are in
//! flight.

use std::collections::HashMap;

use bytes::BytesMut;

use crate::auth::Identity;
use crate::ingress::admit::DeviceRules;
use crate::ingress::mqtt::codec::{self, Granted, SubscribeReasonCode, Version};
use crate::topic::{self, TopicFilter};
use rumqttc::v5::mqttbytes::v5::Publish as UpstreamPublish;

/// IoT Core's limit of topic filters in one SUBSCRIBE.
pub const MAX_FILTERS_PER_SUBSCRIBE: usize = crate::quota::IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE;

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
    /// The filters subscribed.
    subscriptions: Vec<String>,
    /// Per packet id, the message the device has not acknowledged yet (its payload left
    /// out), to acknowledge at IoT Core once it has.
    in_flight: HashMap<u16, Box<UpstreamPublish>>,
    last_pkid: u16,
    max_in_flight: usize,
}

impl Outbound {
    /// No subscriptions; at most `max_in_flight` unacknowledged messages.
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
                if topic::unshared(filter).len() > topic::IOT_CORE_MAX_TOPIC_BYTES {
                    return Err(SubscribeReasonCode::TopicFilterInvalid);
                }
                TopicFilter::parse(filter).map_err(|_| SubscribeReasonCode::TopicFilterInvalid)?;
                if !rules.policy.may_subscribe_filter(identity, filter) {
                    return Err(SubscribeReasonCode::NotAuthorized);
                }
                if !self.subscriptions.contains(filter) {
                    if count >= crate::quota::IOT_CORE_MAX_SUBSCRIPTIONS {
                        return Err(SubscribeReasonCode::QuotaExceeded);
                    }
                    count += 1;
                }
                Ok((*qos).min(1))
            })
            .collect()
    }

    /// Keeps the subscriptions `granted` grants.
    pub fn keep(&mut self, filters: &[(String, u8)], granted: &[Granted]) {
        for ((filter, _), granted) in filters.iter().zip(granted) {
            if granted.is_ok() && !self.subscriptions.contains(filter) {
                self.subscriptions.push(filter.clone());
            }
        }
    }

    /// Ends subscriptions.
    pub fn unsubscribe(&mut self, filters: &[String]) {
        self.subscriptions.retain(|s| !filters.contains(s));
    }

    /// A PUBACK from the device: the message it confirms, if that was in flight.
    pub fn acked(&mut self, pkid: u16) -> Option<Box<UpstreamPublish>> {
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
            self.in_flight.insert(pkid, Box::new(kept));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut outbound = Outbound::new(4);
        outbound.last_pkid = u16::MAX - 1;
        let publish = |topic: &str| {
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            Box::new(UpstreamPublish::new(topic, qos, "", None))
        };
        outbound.in_flight.insert(u16::MAX, publish("a"));
        outbound.in_flight.insert(1, publish("b"));
        assert_eq!(outbound.next_pkid(), 2);
        assert_eq!(outbound.acked(u16::MAX).map(|p| p.topic), Some("a".into()));
        assert!(outbound.acked(u16::MAX).is_none(), "acknowledged once");
    }
}
