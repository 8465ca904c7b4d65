//! A connected MQTT session: publishes through the one admission step and the pipeline,
//! acknowledged once durable, in the order they came; subscriptions and the messages
//! relayed from the device's session at IoT Core; the session shell's reasons to end.
//!
//! **Batches.** Every PUBLISH that is in when the gateway reads (up to the window) is
//! admitted one by one and then runs through the pipeline as one batch: one spool commit
//! for them all, the PUBACKs in arrival order (MQTT requires it), and the next read only
//! after. A client with many QoS 1 publishes in flight thus gets them committed together.
//!
//! **Refusals** are answered as [`super::answer`] maps them (MQTT 5: a PUBACK reason code
//! and the reason string, or DISCONNECT 0x95 for a payload too large, after the
//! acknowledgements of the publishes before it). MQTT 3.1.1 has no negative PUBACK, so
//! the connection is closed. QoS 2 is refused (5.0: DISCONNECT 0x9B; 3.1.1: closed). When the spool is full, a 3.1.1 client's batch waits
//! and is tried again without reading further, so the client's own window holds it back.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use crate::auth::Identity;
use crate::config::FailurePath;
use crate::ingress::admit::{Submission, admit};
use crate::ingress::mqtt::answer::{Answer, answer};
use crate::ingress::mqtt::codec::{
    self, DisconnectReasonCode, Incoming, PubAckReason, Publish, Version,
};
use crate::ingress::mqtt::outbound::Outbound;
use crate::ingress::mqtt::transport::Transport;
use crate::ingress::session::{DeviceSession, Ended};
use crate::ingress::state::AppState;
use crate::ingress::verdict::{Refusal, Verdict, verdicts};
use crate::message::attribute;
use crate::pipeline::StoreError;
use crate::spool::SpoolError;
use crate::topic::Reserved;

/// The limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most unacknowledged QoS 1 publishes (5.0: the receive maximum announced).
    pub window: u16,
    /// Largest packet taken.
    pub max_packet_bytes: usize,
    /// How long a client has for its CONNECT.
    pub connect_timeout: Duration,
    /// The longest a session outlives its connection (`mqtt.session_expiry_secs`).
    pub session_expiry_secs: u32,
    /// What a 3.1.1 publish that a plugin refuses gets (`mqtt.v311_plugin_failure`).
    pub v311_plugin_failure: FailurePath,
}

/// A publish as the admission step takes it (the retain flag as `mqtt.retain`).
pub(super) fn submission(publish: Publish) -> Submission {
    let mut attributes = publish.properties.attributes;
    if publish.retain {
        attributes.push((attribute::RETAIN.to_string(), "true".to_string()));
    }
    Submission {
        topic: publish.topic,
        payload: publish.payload.to_vec(),
        content_type: publish.properties.content_type.unwrap_or_default(),
        qos: publish.qos.min(1),
        attributes,
    }
}

/// Why a session ends.
pub(super) enum End {
    /// The client sent DISCONNECT (5.0 with reason 0x04: publish its will anyway).
    Disconnected {
        /// Its last will goes out.
        with_will: bool,
    },
    /// The connection closed without a DISCONNECT.
    Closed,
    /// The gateway closed it for what the client sent (5.0: with this DISCONNECT reason
    /// first).
    Refused(DisconnectReasonCode, String),
    /// The session shell ended it (credential, takeover, shutdown).
    Ended(Ended),
}

/// A connected session.
pub(super) struct Session<'a> {
    pub(super) state: &'a AppState,
    pub(super) identity: &'a Identity,
    pub(super) version: Version,
    /// Most publishes taken into one batch (unacknowledged at once).
    pub(super) window: u16,
    pub(super) limits: Limits,
    /// 1.5 × the keep-alive: silent this long, the connection is closed.
    pub(super) idle: Duration,
    /// The device's session at IoT Core as it is opened (with `[upstream]`).
    pub(super) upstream_spec: Option<Box<crate::upstream::Spec>>,
    /// 5.0: the largest packet the client takes.
    pub(super) client_max_packet: Option<u32>,
    /// 3.1.1: its last batch had to wait for room in the spool (until one is stored at
    /// the first try): its next one queues behind the batches waiting. A session whose
    /// messages go to a sink with room never waits, whichever sink is full.
    pub(super) waits_for_room: std::sync::atomic::AtomicBool,
}

impl Session<'_> {
    /// Serves the session until it ends, saying why.
    pub(super) async fn serve<T: Transport>(
        &self,
        io: &mut T,
        mut buffer: BytesMut,
        device: &mut DeviceSession,
        outbound: &mut Outbound,
    ) -> End {
        loop {
            // Everything already read, then the publishes among it as one batch; a
            // packet that ends the session ends it after the publishes before it.
            let mut batch = Vec::new();
            let mut ending = None;
            loop {
                if batch.len() >= usize::from(self.window) {
                    break;
                }
                let packet =
                    match codec::read(self.version, &mut buffer, self.limits.max_packet_bytes) {
                        Ok(Some(packet)) => packet,
                        Ok(None) => break,
                        Err(error) => {
                            ending = Some(End::Refused(error.reason_code(), error.to_string()));
                            break;
                        }
                    };
                match packet {
                    Incoming::Publish(publish) if publish.qos > 1 => {
                        ending = Some(End::Refused(
                            DisconnectReasonCode::QoSNotSupported,
                            "QoS 2 is not supported".to_string(),
                        ));
                        break;
                    }
                    Incoming::Publish(publish) => batch.push(publish),
                    Incoming::PingReq => {
                        if io.send(codec::pingresp()).await.is_err() {
                            return End::Closed;
                        }
                    }
                    Incoming::Disconnect { with_will } => {
                        ending = Some(End::Disconnected { with_will });
                        break;
                    }
                    Incoming::PubAck { pkid } => {
                        if let (Some(publish), Some(upstream)) =
                            (outbound.acked(pkid), &device.upstream)
                        {
                            upstream.ack(&publish);
                        }
                    }
                    Incoming::Subscribe { pkid, filters } => {
                        // Boxed, as the batch below: an idle session does not keep room
                        // for what only runs while it is busy.
                        let answer = Box::pin(self.subscribe(device, outbound, &filters)).await;
                        let ack = codec::suback(
                            self.version,
                            pkid,
                            &answer.granted,
                            answer.why.as_deref(),
                            self.client_max_packet,
                        );
                        if io.send(&ack).await.is_err() {
                            return End::Closed;
                        }
                    }
                    Incoming::Unsubscribe { pkid, filters } => {
                        self.unsubscribe(device, outbound, &filters);
                        let ack = codec::unsuback(self.version, pkid, filters.len());
                        if io.send(&ack).await.is_err() {
                            return End::Closed;
                        }
                    }
                    Incoming::Connect(_) => {
                        ending = Some(End::Refused(
                            DisconnectReasonCode::ProtocolError,
                            "a second CONNECT".to_string(),
                        ));
                        break;
                    }
                    Incoming::Unexpected(what) => {
                        ending = Some(End::Refused(
                            DisconnectReasonCode::ProtocolError,
                            format!("{what} from a client"),
                        ));
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let count = batch.len();
                device.received(count);
                // Boxed: the publish path's state is held only while a batch runs, not
                // by every idle connection's task.
                let published = Box::pin(self.publish(io, batch, device)).await;
                device.answered(count);
                if let Err(end) = published {
                    return end;
                }
            }
            if let Some(end) = ending {
                return end;
            }
            if !buffer.is_empty() && codec::complete(&buffer) {
                continue;
            }
            if buffer.is_empty() {
                // Nothing half read: the session waits without a buffer (the next read
                // brings its own, `Transport::read_more`).
                buffer = BytesMut::new();
            }
            tokio::select! {
                read = io.read_more(&mut buffer) => match read {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => {}
                },
                publish = crate::upstream::session::next_for(&mut device.upstream), if outbound.has_room() => {
                    if let Some(bytes) = self.relay(device, outbound, publish)
                        && io.send(&bytes).await.is_err()
                    {
                        return End::Closed;
                    }
                }
                () = tokio::time::sleep(self.idle) => {
                    return End::Refused(
                        DisconnectReasonCode::KeepAliveTimeout,
                        "no packet for 1.5 times the keep-alive".to_string(),
                    );
                }
                ended = device.end.ended() => return End::Ended(ended),
            }
        }
    }

    /// Admits each publish, runs the admitted ones as one batch, and answers each in
    /// arrival order.
    async fn publish<T: Transport>(
        &self,
        io: &mut T,
        batch: Vec<Publish>,
        device: &mut DeviceSession,
    ) -> Result<(), End> {
        let started = std::time::Instant::now();
        let rules = self.state.rules();
        let limit = self.state.pipeline.max_payload_bytes();
        // Per publish: its packet id and QoS, and its refusal or its place in `messages`
        // (none for a command reply, which goes to the broker instead).
        let mut answers: Vec<(u16, u8, Result<Option<usize>, Refusal>)> =
            Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let session = device;
        for publish in batch {
            let (pkid, qos) = (publish.pkid, publish.qos);
            // A request to IoT Core's services goes straight there, on the device's own
            // session.
            let passes_through = self.state.upstream.is_some()
                && crate::topic::reserved(&publish.topic) == Some(Reserved::Request);
            let admitted = if passes_through {
                self.pass_through(session, publish).await.map(|()| None)
            } else {
                admit(
                    &rules,
                    self.identity,
                    limit,
                    vec![submission(publish)],
                    false,
                )
                .map(|mut admitted| {
                    messages.append(&mut admitted);
                    Some(messages.len() - 1)
                })
            };
            // A refusal that ends the connection (any, in 3.1.1; a DISCONNECT answer in
            // 5.0) ends the batch: what came after it is neither stored nor
            // acknowledged, and the client sends it again.
            let closes = admitted.as_ref().err().is_some_and(|refusal| {
                self.version == Version::V4 || matches!(answer(refusal), Answer::Disconnect(_))
            });
            answers.push((pkid, qos, admitted));
            if closes {
                break;
            }
        }
        // 3.1.1 cannot say "later": while the spool is full, the batch waits (nothing more
        // is read) for room, for at most the keep-alive's span or until the session ends;
        // then the connection is closed. It tries again as soon as delivery made room
        // (its turn among the waiters, `Spool::room`), at the latest after a second.
        let hold_until = std::time::Instant::now() + self.idle;
        let count = messages.len();
        // About what the batch takes in the spool: its payloads, topics and a record's
        // own fields.
        let bytes = messages
            .iter()
            .map(|m| (m.payload.len() + m.topic.len() + 256) as u64)
            .sum::<u64>();
        let spool = self.state.pipeline.spool().clone();
        let mut waited = false;
        let outcome = loop {
            if messages.is_empty() {
                break Ok(Vec::new());
            }
            if self.version == Version::V4
                && !waited
                && self.waits_for_room.load(Ordering::Relaxed)
                && spool.waiting_for_room()
            {
                // Behind the batches already waiting, in turn.
                waited = true;
                wait_for_room(&spool, session).await?;
            }
            // A copy for a second try only when the spool could refuse the batch for
            // room: copying every batch cost a few percent of each message. (Should the
            // spool fill from under half its limit while this batch is on its way, the
            // batch is refused as at the end of a wait: the connection closes and the
            // client sends it again.)
            let retries = self.version == Version::V4 && spool.may_refuse_for_room(2 * bytes);
            let batch = match retries {
                true => messages.clone(),
                false => std::mem::take(&mut messages),
            };
            let processed = if self.version == Version::V4
                && self.limits.v311_plugin_failure == FailurePath::DeadLetter
            {
                self.state
                    .pipeline
                    .process_dead_lettering_failures(batch)
                    .await
            } else {
                self.state.pipeline.process(batch, false).await
            };
            match processed {
                Err(StoreError::Spool(SpoolError::Full { .. }))
                    if retries && std::time::Instant::now() < hold_until =>
                {
                    waited = true;
                    wait_for_room(&spool, session).await?;
                }
                outcome => {
                    if waited && outcome.is_ok() {
                        // Stored after a wait: the next waiter's turn (there may be
                        // room left).
                        spool.room_made();
                    }
                    self.waits_for_room.store(waited, Ordering::Relaxed);
                    break outcome;
                }
            }
        };
        let mut verdicts = verdicts(outcome, count)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>();
        let mut out = BytesMut::new();
        // The first answer that ends the connection: it ends once the batch is answered.
        // The publishes after it that were stored are acknowledged first, so that the
        // client does not send them again.
        let mut closing: Option<(DisconnectReasonCode, String)> = None;
        let mut accepted = 0;
        for (pkid, qos, admitted) in answers {
            let refusal = match admitted {
                Err(refusal) => Some(refusal),
                Ok(None) => None,
                Ok(Some(index)) => match verdicts[index].take() {
                    Some(Verdict::Refused(refusal)) => Some(refusal),
                    Some(Verdict::Accepted(_)) | None => None,
                },
            };
            let Some(refusal) = refusal else {
                accepted += 1;
                if qos == 1 {
                    out.extend_from_slice(&codec::puback(
                        self.version,
                        pkid,
                        PubAckReason::Success,
                        None,
                        None,
                    ));
                }
                continue;
            };
            let wire = answer(&refusal);
            crate::metrics::METRICS.mqtt_publish(&label(wire), 1);
            match (wire, self.version) {
                // 3.1.1 has no negative PUBACK: the connection ends (5.0's reason for the
                // log).
                (Answer::PubAck(reason), Version::V4) => {
                    let reason = DisconnectReasonCode::try_from(codec::puback_code(reason))
                        .unwrap_or(DisconnectReasonCode::UnspecifiedError);
                    closing.get_or_insert((reason, refusal.message()));
                }
                // Not a PUBACK code: the connection ends.
                (Answer::Disconnect(reason), _) => {
                    closing.get_or_insert((reason, refusal.message()));
                }
                (Answer::PubAck(reason), Version::V5) => {
                    if qos == 1 {
                        out.extend_from_slice(&codec::puback(
                            self.version,
                            pkid,
                            reason,
                            Some(&refusal.message()),
                            self.client_max_packet,
                        ));
                    }
                }
            }
        }
        crate::metrics::METRICS.mqtt_publish("accepted", accepted);
        if !out.is_empty() && io.send(&out).await.is_err() {
            return Err(End::Closed);
        }
        if let Some((reason, why)) = closing {
            return Err(End::Refused(reason, why));
        }
        crate::metrics::METRICS
            .mqtt_puback_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The `mqtt_publishes_total` label of a refusal's answer: its reason code (`0x87`).
/// Waits for room in the spool: the waiter's turn (`Spool::room`), at the latest a
/// second; the wait ends with the session (a takeover, expired credentials or the
/// gateway's shutdown do not wait for room).
async fn wait_for_room(
    spool: &crate::spool::Spool,
    session: &mut DeviceSession,
) -> Result<(), End> {
    tokio::select! {
        () = spool.room() => Ok(()),
        () = tokio::time::sleep(Duration::from_secs(1)) => Ok(()),
        ended = session.end.ended() => Err(End::Ended(ended)),
    }
}

fn label(answer: Answer) -> String {
    let code = match answer {
        Answer::PubAck(reason) => codec::puback_code(reason),
        Answer::Disconnect(reason) => reason as u8,
    };
    format!("{code:#04x}")
}
