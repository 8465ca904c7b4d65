//! IoT Core over MQTT 5: one persistent TLS connection (rumqttc) with the gateway's own
//! X.509 certificate; each publish carries its message's MQTT 5 properties (content
//! type, response topic, correlation data, user properties, message expiry).
//!
//! A QoS 1 message counts as delivered only when its PUBACK says so (success, or no
//! matching subscribers); a QoS 0 message when it is written to the connection. A PUBACK
//! that refuses the publish for good (not authorized, topic or payload invalid) makes
//! the record a dead letter with IoT Core's reason; one that says "later" (quota
//! exceeded, server busy, unspecified) fails the delivery, which the spool retries.
//!
//! rumqttc reconnects on its own (the event loop is polled again after a pause that
//! grows while the broker stays away) and re-sends unacknowledged publishes after
//! reconnecting; their PUBACKs settle the waiting deliveries. A delivery whose messages
//! are not confirmed within the delivery timeout fails, and the spool sends them again
//! (they may arrive twice: at least once).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::oneshot;

use crate::backoff::Backoff;
use crate::record::Record;
use crate::sink::iot_core::prepare;
use crate::sink::{Rejected, SinkError, SinkFuture};

/// Pauses between reconnects while the broker is away: 100 to 200 ms at first, doubling
/// to 2 s, jittered.
const RECONNECT: Backoff = Backoff {
    first: Duration::from_millis(200),
    max: Duration::from_secs(2),
    jitter: true,
};

/// Publishes handed to rumqttc but not yet acknowledged, at most (rumqttc's in-flight
/// window; further publishes wait, which pushes back towards ingress).
const INFLIGHT: u16 = 100;

/// How long IoT Core keeps the sink's session after its connection drops, so that
/// publishes in flight are re-sent on the same session after a reconnect: IoT Core's
/// default persistent-session expiry (one hour).
const SESSION_EXPIRY_SECS: u32 = 3600;

/// How a publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Acknowledged (QoS 1) or written (QoS 0).
    Confirmed,
    /// Lost with the connection or the session, or refused for now: sent again.
    Lost,
    /// Refused for good, in IoT Core's words: a dead letter.
    Refused(String),
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host (the account's IoT Core ATS endpoint).
    pub host: String,
    /// Broker port (8883).
    pub port: u16,
    /// MQTT client id; IoT Core allows one connection per client id.
    pub client_id: String,
    /// PEM bundle of the CAs that sign the broker's certificate.
    pub ca: std::path::PathBuf,
    /// The gateway's PEM certificate.
    pub cert: std::path::PathBuf,
    /// The gateway's PEM key.
    pub key: std::path::PathBuf,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long a request waits for its PUBACKs.
    pub delivery_timeout: Duration,
    /// Basic Ingest rule name, if configured.
    pub basic_ingest_rule: Option<String>,
}

/// Publishes waiting for their packet id, then for their PUBACK, and how each ended.
#[derive(Default)]
struct Tracker {
    /// In publish order: the waiters of publishes rumqttc has not sent yet.
    unsent: VecDeque<(u8, oneshot::Sender<Answer>)>,
    /// Sent QoS 1 publishes by packet id, waiting for PUBACK.
    unacked: HashMap<u16, oneshot::Sender<Answer>>,
    /// Whether the connection is up (a CONNACK came and no error since).
    connected: bool,
    /// When a connection drops, rumqttc keeps the unacknowledged publishes and the
    /// requests already queued, for re-sending; this many waiters at the front of
    /// `unsent` belong to those requests. If the broker then starts a fresh session,
    /// rumqttc discards them all, and so must the tracker.
    held_for_resend: Option<usize>,
}

/// The MQTT sink.
pub struct MqttSink {
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    /// Publishes are handed to rumqttc one request at a time, so the order of the
    /// waiters in `unsent` matches the order rumqttc sends them in.
    publish_order: Arc<tokio::sync::Mutex<()>>,
    settings: MqttSettings,
}

impl MqttSink {
    /// Connects (in the background) and starts the event loop.
    pub fn start(settings: MqttSettings) -> anyhow::Result<MqttSink> {
        let tls = crate::tls::client_config(&settings.ca, &settings.cert, &settings.key)?;
        let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
        options
            .set_keep_alive(settings.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_outgoing_inflight_upper_limit(INFLIGHT)
            .set_max_packet_size(Some(256 * 1024))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut events) = AsyncClient::new(options, usize::from(INFLIGHT));
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let loop_tracker = tracker.clone();
        let broker = format!("{}:{}", settings.host, settings.port);
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match events.poll().await {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                            count_connection();
                            if failures > 0 {
                                tracing::info!(%broker, "MQTT connection to IoT Core restored");
                                failures = 0;
                            }
                        }
                        settle(&loop_tracker, event);
                    }
                    Err(ConnectionError::RequestsDone) => return,
                    Err(error) => {
                        disconnected(&loop_tracker);
                        failures = failures.saturating_add(1);
                        let pause = RECONNECT.delay(failures);
                        tracing::warn!(%broker, %error, ?pause, "MQTT connection to IoT Core lost; reconnecting");
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        });
        Ok(MqttSink {
            client,
            tracker,
            publish_order: Arc::new(tokio::sync::Mutex::new(())),
            settings,
        })
    }

    /// Publishes `records`; answers when each is confirmed, with those IoT Core refused
    /// for good.
    pub fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            let mut publishes = Vec::new();
            let mut sent = Vec::new();
            for record in records {
                match prepare(&record, self.settings.basic_ingest_rule.as_deref()) {
                    Ok(publish) => {
                        publishes.push(publish);
                        sent.push(record);
                    }
                    Err(reason) => rejected.push(Rejected { record, reason }),
                }
            }
            let deadline = tokio::time::Instant::now() + self.settings.delivery_timeout;
            // Handing publishes to rumqttc runs in a task of its own: the order of the
            // waiters must match the order of the publishes even if this request is
            // dropped half-way (the device went away).
            let client = self.client.clone();
            let tracker = self.tracker.clone();
            // The turn is taken here, before the task is spawned: windows reach this in
            // their order, and the lock serves waiters in the order they came, whereas
            // spawned tasks may start in any order on the runtime's threads (a later
            // window's publishes then overtook an earlier one's).
            let turn = self.publish_order.clone().lock_owned().await;
            let handing = tokio::spawn(async move {
                let _turn = turn;
                let mut waiting = Vec::with_capacity(publishes.len());
                for publish in publishes {
                    let (done, confirmed) = oneshot::channel();
                    lock(&tracker).unsent.push_back((publish.qos, done));
                    let qos = if publish.qos == 0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    let handed = match publish.properties {
                        Some(properties) => {
                            client
                                .publish_with_properties(
                                    publish.topic,
                                    qos,
                                    publish.retain,
                                    publish.payload,
                                    properties,
                                )
                                .await
                        }
                        None => {
                            client
                                .publish(publish.topic, qos, publish.retain, publish.payload)
                                .await
                        }
                    };
                    if let Err(error) = handed {
                        // Never handed over: take its waiter back out (the last one).
                        lock(&tracker).unsent.pop_back();
                        return Err(format!("the MQTT client stopped: {error}"));
                    }
                    waiting.push(confirmed);
                }
                Ok(waiting)
            });
            let waiting = match tokio::time::timeout_at(deadline, handing).await {
                Ok(Ok(Ok(waiting))) => waiting,
                Ok(Ok(Err(error))) => return Err(SinkError::Unavailable(error)),
                Ok(Err(_)) | Err(_) => {
                    return Err(SinkError::Unavailable(
                        "IoT Core did not take the publishes in time".to_string(),
                    ));
                }
            };
            let all = futures_util::future::join_all(waiting);
            let Ok(answers) = tokio::time::timeout_at(deadline, all).await else {
                return Err(SinkError::Unavailable(format!(
                    "IoT Core did not acknowledge every publish within {:?}",
                    self.settings.delivery_timeout
                )));
            };
            for (record, answer) in sent.into_iter().zip(answers) {
                match answer {
                    Ok(Answer::Confirmed) => {}
                    Ok(Answer::Refused(reason)) => rejected.push(Rejected { record, reason }),
                    Ok(Answer::Lost) | Err(_) => {
                        return Err(SinkError::Unavailable(
                            "IoT Core did not take every publish (the connection was lost, or it asked for a retry)"
                                .to_string(),
                        ));
                    }
                }
            }
            Ok(rejected)
        })
    }
}

/// Counts a connection made (`sluice_sink_connections_total{sink="iot-core"}`): one
/// that another client with the same id keeps taking over shows as a count that grows.
fn count_connection() {
    crate::metrics::METRICS
        .sink_connections
        .get_or_create(&crate::metrics::SinkLabel {
            sink: crate::record::SinkId::IotCore.name().to_string(),
        })
        .inc();
}

fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection dropped: rumqttc now holds the unacknowledged publishes and the
/// requests it had queued, for re-sending after the reconnect.
fn disconnected(tracker: &Mutex<Tracker>) {
    let mut tracker = lock(tracker);
    if tracker.connected {
        tracker.connected = false;
        tracker.held_for_resend = Some(tracker.unsent.len());
    }
}

/// Moves waiters along as rumqttc reports sends and acknowledgements.
fn settle(tracker: &Mutex<Tracker>, event: Event) {
    let mut tracker = lock(tracker);
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => {
            tracker.connected = true;
            let held = tracker.held_for_resend.take();
            if let (Some(held), false) = (held, ack.session_present) {
                // A fresh session: rumqttc dropped what it held for re-sending. Those
                // deliveries learn that their publishes were lost (the spool re-sends them).
                for (_, done) in tracker.unacked.drain() {
                    let _ = done.send(Answer::Lost);
                }
                let held = held.min(tracker.unsent.len());
                for (_, done) in tracker.unsent.drain(..held) {
                    let _ = done.send(Answer::Lost);
                }
            }
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            // A re-sent publish (after a reconnect) keeps its packet id and its waiter.
            if pkid != 0 && tracker.unacked.contains_key(&pkid) {
                return;
            }
            let Some((qos, done)) = tracker.unsent.pop_front() else {
                return;
            };
            if qos == 0 || pkid == 0 {
                let _ = done.send(Answer::Confirmed);
            } else {
                tracker.unacked.insert(pkid, done);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some(done) = tracker.unacked.remove(&ack.pkid) {
                let why = ack.properties.and_then(|p| p.reason_string);
                let _ = done.send(answer(ack.reason, why));
            }
        }
        _ => {}
    }
}

/// What a PUBACK's reason means for its record.
fn answer(reason: PubAckReason, why: Option<String>) -> Answer {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Answer::Confirmed,
        PubAckReason::NotAuthorized
        | PubAckReason::TopicNameInvalid
        | PubAckReason::PayloadFormatInvalid => Answer::Refused(match why {
            Some(why) => format!("IoT Core refused the publish ({reason:?}): {why}"),
            None => format!("IoT Core refused the publish ({reason:?})"),
        }),
        // Quota exceeded, implementation specific, unspecified, packet id in use: later.
        _ => Answer::Lost,
    }
}

impl crate::sink::Sink for MqttSink {
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        MqttSink::deliver(self, records)
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnectReturnCode, PubAck};

    use super::*;

    fn connack(session_present: bool) -> Event {
        Event::Incoming(Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
            properties: None,
        }))
    }

    fn waiter(tracker: &Mutex<Tracker>, qos: u8) -> oneshot::Receiver<Answer> {
        let (done, confirmed) = oneshot::channel();
        lock(tracker).unsent.push_back((qos, done));
        confirmed
    }

    #[test]
    fn waiters_follow_packet_ids_and_acks() {
        let tracker = Mutex::new(Tracker::default());
        settle(&tracker, connack(false));
        let mut first = waiter(&tracker, 1);
        let mut second = waiter(&tracker, 0);
        let mut third = waiter(&tracker, 1);
        settle(&tracker, Event::Outgoing(Outgoing::Publish(7)));
        settle(&tracker, Event::Outgoing(Outgoing::Publish(0)));
        settle(&tracker, Event::Outgoing(Outgoing::Publish(8)));
        assert_eq!(
            second.try_recv(),
            Ok(Answer::Confirmed),
            "QoS 0: confirmed once sent"
        );
        assert!(first.try_recv().is_err(), "QoS 1 waits for its PUBACK");
        settle(
            &tracker,
            Event::Incoming(Packet::PubAck(PubAck::new(8, None))),
        );
        assert_eq!(third.try_recv(), Ok(Answer::Confirmed));
        assert!(first.try_recv().is_err());
        settle(
            &tracker,
            Event::Incoming(Packet::PubAck(PubAck::new(7, None))),
        );
        assert_eq!(first.try_recv(), Ok(Answer::Confirmed));
    }

    #[test]
    fn a_pubacks_reason_decides_between_delivered_dead_letter_and_retry() {
        let tracker = Mutex::new(Tracker::default());
        settle(&tracker, connack(false));
        let mut waiters: Vec<_> = (1..=4).map(|_| waiter(&tracker, 1)).collect();
        for pkid in 1..=4 {
            settle(&tracker, Event::Outgoing(Outgoing::Publish(pkid)));
        }
        let reasons = [
            PubAckReason::NoMatchingSubscribers,
            PubAckReason::NotAuthorized,
            PubAckReason::QuotaExceeded,
            PubAckReason::TopicNameInvalid,
        ];
        for (pkid, reason) in (1..=4).zip(reasons) {
            let mut ack = PubAck::new(pkid, None);
            ack.reason = reason;
            settle(&tracker, Event::Incoming(Packet::PubAck(ack)));
        }
        let answers: Vec<Answer> = waiters.iter_mut().map(|w| w.try_recv().unwrap()).collect();
        assert_eq!(answers[0], Answer::Confirmed);
        assert!(matches!(&answers[1], Answer::Refused(why) if why.contains("NotAuthorized")));
        assert_eq!(answers[2], Answer::Lost, "quota exceeded: later");
        assert!(matches!(&answers[3], Answer::Refused(_)));
    }

    #[test]
    fn a_resumed_session_resends_without_moving_waiters() {
        let tracker = Mutex::new(Tracker::default());
        settle(&tracker, connack(false));
        let mut sent = waiter(&tracker, 1);
        settle(&tracker, Event::Outgoing(Outgoing::Publish(1)));
        let mut queued = waiter(&tracker, 1);
        disconnected(&tracker);
        settle(&tracker, connack(true));
        // rumqttc re-sends packet 1 with the same id, then the queued publish.
        settle(&tracker, Event::Outgoing(Outgoing::Publish(1)));
        settle(&tracker, Event::Outgoing(Outgoing::Publish(2)));
        settle(
            &tracker,
            Event::Incoming(Packet::PubAck(PubAck::new(2, None))),
        );
        assert_eq!(queued.try_recv(), Ok(Answer::Confirmed));
        settle(
            &tracker,
            Event::Incoming(Packet::PubAck(PubAck::new(1, None))),
        );
        assert_eq!(sent.try_recv(), Ok(Answer::Confirmed));
    }

    #[test]
    fn a_fresh_session_fails_what_rumqttc_dropped_and_keeps_later_publishes() {
        let tracker = Mutex::new(Tracker::default());
        settle(&tracker, connack(false));
        let mut sent = waiter(&tracker, 1);
        settle(&tracker, Event::Outgoing(Outgoing::Publish(1)));
        let mut queued = waiter(&tracker, 1);
        disconnected(&tracker);
        // Published while the connection was down: still in rumqttc's channel.
        let mut later = waiter(&tracker, 1);
        settle(&tracker, connack(false));
        assert_eq!(
            sent.try_recv(),
            Ok(Answer::Lost),
            "unacknowledged and dropped: sent again from the spool"
        );
        assert_eq!(
            queued.try_recv(),
            Ok(Answer::Lost),
            "held for re-sending and dropped: sent again from the spool"
        );
        // The later publish goes out after the reconnect and may reuse packet id 1.
        settle(&tracker, Event::Outgoing(Outgoing::Publish(1)));
        settle(
            &tracker,
            Event::Incoming(Packet::PubAck(PubAck::new(1, None))),
        );
        assert_eq!(later.try_recv(), Ok(Answer::Confirmed));
    }
}
