//! An MQTT device's own session at IoT Core (`[upstream]`), seen from its connection:
//! subscriptions made there after the policy allowed them, requests on IoT Core's
//! reserved topics passed straight through, and what IoT Core sends the device relayed
//! within its receive maximum and Maximum Packet Size.
//!
//! The session at IoT Core is opened at CONNECT for a device that keeps a session, and
//! otherwise when the device first needs it (its first SUBSCRIBE, its first request on a
//! reserved topic): a device that only publishes telemetry costs IoT Core nothing.
//!
//! Without `[upstream]` a SUBSCRIBE is refused (0x83, with a reason string that says
//! why; 3.1.1: 0x80): nothing would ever arrive on it.

use bytes::BytesMut;

use crate::ingress::commands::unavailable;
use crate::ingress::mqtt::codec::{self, Granted, PubAckReason, Publish, SubscribeReasonCode};
use crate::ingress::mqtt::outbound::{Outbound, Relay};
use crate::ingress::mqtt::session::Session;
use crate::ingress::session::DeviceSession;
use crate::ingress::verdict::Refusal;
use crate::upstream::{Failure, UpstreamSession};
use rumqttc::v5::mqttbytes::v5::Publish as UpstreamPublish;

/// What a SUBSCRIBE gets back.
pub struct SubAck {
    /// Per filter.
    pub granted: Vec<Granted>,
    /// 5.0: the reason string, when a filter was refused for a reason worth saying.
    pub why: Option<String>,
}

impl Session<'_> {
    /// The device's session at IoT Core, opened now if it is not yet; `None` without
    /// `[upstream]`.
    pub(super) async fn upstream<'d>(
        &self,
        device: &'d mut DeviceSession,
    ) -> Option<&'d mut UpstreamSession> {
        let upstream = self.state.upstream.as_ref()?;
        if device.upstream.is_none() {
            let spec = self.upstream_spec.as_deref()?.clone();
            let session = upstream.open(spec);
            // The first attempt's outcome (quick when the endpoint refuses), so that the
            // first SUBSCRIBE is not refused only because it came first.
            session.connected_within(upstream.answer_timeout()).await;
            device.attach_upstream(session);
        }
        device.upstream.as_mut()
    }

    /// Answers a SUBSCRIBE: the policy and IoT Core's limits first, then (with
    /// `[upstream]`) IoT Core's own answer for the filters they allow.
    pub(super) async fn subscribe(
        &self,
        device: &mut DeviceSession,
        outbound: &mut Outbound,
        filters: &[(String, u8)],
    ) -> SubAck {
        let rules = self.state.rules();
        if self.state.upstream.is_none() {
            return SubAck {
                granted: vec![Err(SubscribeReasonCode::ImplementationSpecific); filters.len()],
                why: Some(
                    "this gateway delivers nothing to devices: no IoT Core endpoint is configured ([upstream])"
                        .to_string(),
                ),
            };
        }
        let mut granted = outbound.check(&rules, self.identity, filters);
        let allowed: Vec<(String, u8)> = filters
            .iter()
            .zip(&granted)
            .filter_map(|((filter, _), granted)| {
                granted.as_ref().ok().map(|qos| (filter.clone(), *qos))
            })
            .collect();
        let mut why = None;
        if !allowed.is_empty() {
            let answer = match self.upstream(device).await {
                Some(upstream) => upstream.subscribe(allowed).await,
                None => Err(Failure::Unavailable),
            };
            let mut answers = match answer {
                Ok(codes) => codes.into_iter(),
                Err(failure) => {
                    why = Some(format!("{failure}; subscribe again later"));
                    vec![SubscribeReasonCode::Unspecified; granted.len()].into_iter()
                }
            };
            for granted in granted.iter_mut().filter(|g| g.is_ok()) {
                *granted = match answers.next() {
                    Some(SubscribeReasonCode::Success(qos)) => Ok((qos as u8).min(1)),
                    Some(refused) => Err(refused),
                    None => Err(SubscribeReasonCode::Unspecified),
                };
            }
        }
        outbound.keep(filters, &granted);
        SubAck { granted, why }
    }

    /// Ends subscriptions here and at IoT Core.
    pub(super) fn unsubscribe(
        &self,
        device: &DeviceSession,
        outbound: &mut Outbound,
        filters: &[String],
    ) {
        outbound.unsubscribe(filters);
        if let Some(upstream) = &device.upstream {
            upstream.unsubscribe(filters);
        }
    }

    /// Passes a request on one of IoT Core's reserved topics (shadow, jobs, fleet
    /// provisioning, …) straight to IoT Core on the device's own session, after the
    /// policy and its rates, and waits for IoT Core's PUBACK: the device's PUBACK then says IoT Core
    /// has it.
    pub(super) async fn pass_through(
        &self,
        device: &mut DeviceSession,
        publish: Publish,
    ) -> Result<(), Refusal> {
        // The policy and the grant's rates, as for any publish.
        crate::ingress::admit::admit_reply(
            &self.state.rules(),
            self.identity,
            &publish.topic,
            publish.payload.len(),
        )?;
        if publish.retain {
            return Err(Refusal::BadRequest(format!(
                "`{}` is one of IoT Core's reserved topics: a retained message is refused there",
                publish.topic
            )));
        }
        let Some(publish) = self.through_scoped_plugins(publish).await? else {
            // A plugin scoped to the request dropped it: nothing goes to IoT Core.
            return Ok(());
        };
        if publish.payload.len() > crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES {
            return Err(Refusal::TooLarge(format!(
                "the payload is {} bytes, over IoT Core's {} for a request on `{}`",
                publish.payload.len(),
                crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES,
                publish.topic
            )));
        }
        let Some(upstream) = self.upstream(device).await else {
            return Err(unavailable(Failure::Unavailable));
        };
        let properties = codec::mqtt5_properties(&publish.properties);
        let answer = upstream
            .publish(
                &publish.topic,
                publish.qos,
                false,
                publish.payload,
                properties,
            )
            .await
            .map_err(unavailable)?;
        match answer {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
            PubAckReason::NotAuthorized => Err(Refusal::Forbidden {
                topic: publish.topic,
                device: self.identity.device_id.clone(),
            }),
            PubAckReason::TopicNameInvalid => Err(Refusal::BadTopic(format!(
                "IoT Core refused the topic `{}`",
                publish.topic
            ))),
            PubAckReason::PayloadFormatInvalid => Err(Refusal::BadRequest(
                "IoT Core refused the payload's format".to_string(),
            )),
            other => Err(Refusal::Unavailable {
                code: "iot_core_unavailable",
                message: format!("IoT Core answered {other:?}"),
                retry_after: 1,
            }),
        }
    }

    /// A request through the transforms scoped to its topic by a filter (no other plugin
    /// sees a request: [`crate::plugin::LoadedPlugin::in_scope`]): the request as they
    /// leave it, `None` when one dropped it. A plugin's failure refuses the request; it
    /// stays one message on its topic (the policy allowed that topic).
    async fn through_scoped_plugins(&self, publish: Publish) -> Result<Option<Publish>, Refusal> {
        let plugins = self.state.pipeline.plugins();
        if !plugins.scoped_to(&publish.topic) {
            return Ok(Some(publish));
        }
        let message = crate::message::Message {
            id: crate::message::new_id(),
            device_id: self.identity.device_id.clone(),
            topic: publish.topic.clone(),
            content_type: publish.properties.content_type.clone().unwrap_or_default(),
            qos: publish.qos.min(1),
            attributes: publish.properties.attributes.clone(),
            received_at_ms: crate::message::now_ms(),
            payload: publish.payload.to_vec(),
        };
        let id = message.id.clone();
        let mut result = plugins
            .run_from(vec![message], None)
            .await
            .pop()
            .unwrap_or_default();
        if let Some(failure) = result.failures.pop() {
            return Err(Refusal::Plugin {
                id,
                kind: failure.kind,
                plugin: failure.plugin,
                message: failure.reason,
            });
        }
        let output = match result.outputs.len() {
            0 => return Ok(None),
            1 => result.outputs.remove(0).message,
            parts => {
                return Err(Refusal::BadRequest(format!(
                    "a plugin made {parts} messages of the request on `{}`; a request passes as one",
                    publish.topic
                )));
            }
        };
        if output.topic != publish.topic {
            return Err(Refusal::BadRequest(format!(
                "a plugin moved the request on `{}` to `{}`; a request keeps its topic",
                publish.topic, output.topic
            )));
        }
        Ok(Some(Publish {
            payload: output.payload.into(),
            properties: codec::Properties {
                content_type: Some(output.content_type).filter(|c| !c.is_empty()),
                attributes: output.attributes,
            },
            ..publish
        }))
    }

    /// A message from IoT Core for the device: the bytes to write, or nothing (it is
    /// acknowledged at IoT Core and counted: the policy no longer lets the device receive
    /// it, or it is over the device's Maximum Packet Size).
    pub(super) fn relay(
        &self,
        device: &DeviceSession,
        outbound: &mut Outbound,
        publish: UpstreamPublish,
    ) -> Option<BytesMut> {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let skip = |event: &str, why: String| {
            crate::metrics::METRICS.upstream(event);
            tracing::warn!(device = %self.identity.device_id, %topic, %why, "message from IoT Core not sent to the device");
            if let Some(upstream) = &device.upstream {
                upstream.ack(&publish);
            }
        };
        if !self
            .state
            .rules()
            .policy
            .may_subscribe(self.identity, &topic)
        {
            skip(
                "denied",
                "no policy grant lets the device receive it".to_string(),
            );
            return None;
        }
        match outbound.relay(&publish, self.version, self.client_max_packet) {
            Relay::Send(bytes) => {
                crate::metrics::METRICS.upstream("relayed");
                Some(bytes)
            }
            Relay::TooLarge(size) => {
                skip(
                    "too_large",
                    format!("{size} bytes, over the device's Maximum Packet Size"),
                );
                None
            }
        }
    }
}
