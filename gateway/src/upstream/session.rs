//! One device's MQTT 5 session at the endpoint, driven by its own task.
//!
//! **Nothing waits on the endpoint unasked.** Requests go to the client with `try_*`
//! (never waiting for room), and while the session is not connected a subscribe or a
//! publish fails at once with [`Failure::Unavailable`]: a device's publishes to the
//! spool never depend on it, and its SUBACKs say the truth.
//!
//! **Answers.** rumqttc reports the packet id it gave a SUBSCRIBE or a PUBLISH when it
//! writes it (`Outgoing::Subscribe(pkid)`, `Outgoing::Publish(pkid)`), in the order the
//! requests were made; each request's waiter is queued in that order and moved to its
//! packet id then, and the SUBACK or PUBACK resolves it. A lost connection drops
//! everything in flight, and the waiters hear [`Failure::Unavailable`].
//!
//! **Messages for the device** arrive in [`UpstreamSession::next`] and are acknowledged
//! to the endpoint only when the device acknowledged them ([`UpstreamSession::ack`]):
//! QoS 1 end to end, so that a gateway that crashes loses nothing (IoT Core sends
//! again). At most the device's receive maximum of QoS 1 messages are in flight (the
//! session announces it to the endpoint); QoS 0 messages beyond what the device takes
//! are counted as dropped, as QoS 0 allows.
//!
//! **Ends.** A polite end sends DISCONNECT (no will); any other end drops the connection,
//! so that the endpoint publishes the device's will, as it would for a device connected
//! directly. A session that was connected and loses its connection stops for good and
//! says so ([`State::TakenOver`] when the endpoint said another connection took the
//! client id, [`State::Lost`] otherwise): the device's own connection ends with it, as a
//! device connected directly would lose its connection. Reconnecting behind the device's
//! back would fight the connection that took the client id over when the endpoint closes
//! without saying why (mosquitto 2.0 does; IoT Core sends DISCONNECT 0x8E): the two
//! instances would take the session from each other for ever. Only a session that never
//! connected (the endpoint unreachable when the device came) keeps trying.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Filter, LastWill, PubAckReason, Publish,
    PublishProperties, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, StateError,
};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::upstream::Upstream;
use crate::upstream::pace::PER_CLIENT_ID;

/// The largest packet taken from the endpoint: IoT Core's messages are at most 128 KiB,
/// and room is left for the topic and properties.
const MAX_INCOMING_PACKET: u32 = 256 * 1024;

/// Publishes of the device (requests passed through) unacknowledged at once.
const OUTGOING_IN_FLIGHT: u16 = 4;

/// QoS 0 messages held for a device beyond its receive maximum.
const QOS0_ROOM: usize = 64;

/// The pauses between attempts to reach the endpoint.
const RECONNECT: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(60),
    jitter: true,
};

/// What the session at the endpoint is for.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The device (its telemetry goes through the session).
    pub device: String,
    /// The device's client id.
    pub client_id: String,
    /// Start a new session (the device asked for a clean start).
    pub clean_start: bool,
    /// How long the endpoint keeps the session after the connection ends.
    pub session_expiry_secs: u32,
    /// The device's last will, published by the endpoint if the connection drops.
    pub will: Option<LastWill>,
    /// Most QoS 1 messages the device takes unacknowledged.
    pub receive_maximum: u16,
    /// Filters the session subscribes to (QoS 1) once connected, for a device that
    /// cannot subscribe itself; a retained message comes only for a subscription that
    /// is new at the endpoint.
    pub subscriptions: Vec<String>,
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The first attempt to connect is under way.
    Connecting,
    /// Not connected yet: the last attempt failed (the session keeps trying).
    Down,
    /// Connected; whether the endpoint had kept the session.
    Connected {
        /// The endpoint resumed the session (its subscriptions and queued messages).
        session_present: bool,
    },
    /// Another connection took the client id over: the session is over here.
    TakenOver,
    /// The connection was lost after it had been made: the session is over here (the
    /// device reconnects, as it would to the endpoint directly).
    Lost,
}

/// Why a subscribe or a publish did not get the endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The session is not connected, or lost what was in flight.
    #[error("IoT Core is not reachable for this device now")]
    Unavailable,
    /// No answer within the configured time.
    #[error("IoT Core did not answer within {0} ms")]
    Timeout(u64),
}

/// Waiters for the endpoint's answers.
#[derive(Default)]
struct Waiting {
    /// Subscribes handed to the client, not yet written (in order).
    subscribes: VecDeque<oneshot::Sender<Vec<SubscribeReasonCode>>>,
    /// Subscribes written, by packet id.
    subacks: HashMap<u16, oneshot::Sender<Vec<SubscribeReasonCode>>>,
    /// Publishes handed to the client, not yet written (in order).
    publishes: VecDeque<oneshot::Sender<PubAckReason>>,
    /// QoS 1 publishes written, by packet id.
    pubacks: HashMap<u16, oneshot::Sender<PubAckReason>>,
    /// The device was told its session went on before the endpoint answered.
    promised: bool,
}

/// The longest a closing session waits for the answers to its publishes in flight.
const SETTLE_AT_CLOSE: Duration = Duration::from_secs(2);

impl Waiting {
    /// Everything in flight is lost (dropping a waiter tells it so).
    fn lost(&mut self) {
        self.subscribes.clear();
        self.subacks.clear();
        self.publishes.clear();
        self.pubacks.clear();
    }
}

/// What asking the endpoint something on a session takes: shared by the device's
/// connection (which owns the session, [`UpstreamSession`]) and the IoT Core sink (which
/// delivers the device's telemetry through it).
pub struct Link {
    /// Requests to the session's task (never awaited: `try_*` only).
    client: AsyncClient,
    /// The waiters, shared with the task.
    waiting: Arc<Mutex<Waiting>>,
    /// Where the session stands.
    state: watch::Receiver<State>,
    /// How long answers are waited for, in milliseconds.
    timeout_ms: u64,
    /// Told whenever the last publish in flight got its answer.
    settled: Arc<tokio::sync::Notify>,
}

/// A device's session at the endpoint.
pub struct UpstreamSession {
    /// Requests and their answers.
    link: Arc<Link>,
    /// The device, under which the session is listed at the endpoint.
    device: String,
    /// Messages for the device.
    incoming: mpsc::Receiver<Publish>,
    /// The task that drives the connection (taken at close; aborted when dropped).
    task: Option<tokio::task::JoinHandle<()>>,
    /// The endpoint.
    upstream: Arc<Upstream>,
}

impl std::ops::Deref for UpstreamSession {
    type Target = Link;

    fn deref(&self) -> &Link {
        &self.link
    }
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the session is connected to the endpoint now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.state.borrow(), State::Connected { .. })
    }

    /// Subscribes to `filters` (each with the QoS asked for); the endpoint's answer per
    /// filter.
    pub async fn subscribe(
        &self,
        filters: Vec<(String, u8)>,
    ) -> Result<Vec<SubscribeReasonCode>, Failure> {
        if !self.is_connected() {
            return Err(Failure::Unavailable);
        }
        let filters: Vec<Filter> = filters
            .into_iter()
            .map(|(path, qos)| Filter::new(path, qos_of(qos)))
            .collect();
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = self.lock();
            waiting.subscribes.push_back(answer);
            if self.client.try_subscribe_many(filters).is_err() {
                waiting.subscribes.pop_back();
                return Err(Failure::Unavailable);
            }
        }
        self.wait(answered).await
    }

    /// Ends subscriptions (without waiting for the endpoint's answer: an unsubscribe
    /// cannot be refused).
    pub fn unsubscribe(&self, filters: &[String]) {
        for filter in filters {
            if let Err(error) = self.client.try_unsubscribe(filter.clone()) {
                tracing::debug!(%error, %filter, "unsubscribe not passed on; the session is down");
            }
        }
    }

    /// Publishes on the device's behalf and waits for the endpoint's PUBACK (QoS 1), or
    /// until the publish is written (QoS 0).
    pub async fn publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: bytes::Bytes,
        properties: Option<PublishProperties>,
    ) -> Result<PubAckReason, Failure> {
        if !self.is_connected() {
            return Err(Failure::Unavailable);
        }
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = self.lock();
            waiting.publishes.push_back(answer);
            let sent = self.client.try_publish_with_properties(
                topic,
                qos_of(qos),
                retain,
                payload,
                properties.unwrap_or_default(),
            );
            if sent.is_err() {
                waiting.publishes.pop_back();
                return Err(Failure::Unavailable);
            }
        }
        self.wait(answered).await
    }

    async fn wait<T>(&self, answered: oneshot::Receiver<T>) -> Result<T, Failure> {
        match tokio::time::timeout(Duration::from_millis(self.timeout_ms), answered).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Failure::Unavailable),
            Err(_) => Err(Failure::Timeout(self.timeout_ms)),
        }
    }

    /// Waits, at most `limit`, until every publish in flight on the session (telemetry
    /// delivered through it, a request passed through) has its answer: a session closed
    /// before would leave its telemetry unconfirmed, and the spool would send it again
    /// through the sink's connection, so that IoT Core had it twice.
    async fn settle(&self, limit: Duration) {
        let settled = async {
            loop {
                // Registered before looking, so that an answer in between wakes it.
                let told = self.settled.notified();
                {
                    let waiting = self.lock();
                    if waiting.publishes.is_empty() && waiting.pubacks.is_empty() {
                        return;
                    }
                }
                told.await;
            }
        };
        let _ = tokio::time::timeout(limit, settled).await;
    }

    /// The device acknowledged `publish` (or it cannot be delivered and must not come
    /// again): the endpoint hears the PUBACK now.
    pub fn ack(&self, publish: &Publish) {
        if let Err(error) = self.client.try_ack(publish) {
            tracing::debug!(%error, "acknowledgement not passed on; the endpoint sends it again");
        }
    }
}

impl UpstreamSession {
    /// Starts `spec`'s session at `upstream`; it connects in the background.
    pub(super) fn open(upstream: Arc<Upstream>, spec: Spec) -> UpstreamSession {
        let settings = &upstream.settings;
        let mut options = MqttOptions::new(spec.client_id.clone(), &settings.host, settings.port);
        options
            .set_keep_alive(Duration::from_secs(u64::from(settings.keep_alive_secs)))
            .set_clean_start(spec.clean_start)
            .set_session_expiry_interval(Some(spec.session_expiry_secs))
            .set_receive_maximum(Some(spec.receive_maximum.max(1)))
            .set_max_packet_size(Some(MAX_INCOMING_PACKET))
            // A message is acknowledged once the device acknowledged it.
            .set_manual_acks(true)
            // Requests passed through wait for their PUBACK one by one; rumqttc keeps a
            // slot per possible one (about 150 bytes each), so few are allowed.
            .set_outgoing_inflight_upper_limit(OUTGOING_IN_FLIGHT)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                upstream.tls.clone(),
            )));
        if let Some(will) = spec.will {
            options.set_last_will(will);
        }
        let room = usize::from(spec.receive_maximum.max(1));
        let (client, events) = AsyncClient::new(options, room + 16);
        let (to_device, incoming) = mpsc::channel(room + QOS0_ROOM);
        let (state_tx, state) = watch::channel(State::Connecting);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let timeout_ms = upstream.settings.answer_timeout_ms;
        let settled = Arc::new(tokio::sync::Notify::new());
        let driver = Driver {
            upstream: upstream.clone(),
            client: client.clone(),
            waiting: waiting.clone(),
            settled: settled.clone(),
            to_device,
            state: state_tx,
            subscriptions: spec.subscriptions,
        };
        let task = tokio::spawn(driver.run(events));
        let link = Arc::new(Link {
            client,
            waiting,
            state,
            timeout_ms,
            settled,
        });
        upstream.listed(&spec.device, &link);
        UpstreamSession {
            link,
            device: spec.device,
            incoming,
            task: Some(task),
            upstream,
        }
    }

    /// Waits for the first attempt to connect, at most `within` (and no longer once
    /// another session found the endpoint down): whether the endpoint kept the session,
    /// or `None` when it is not connected.
    pub async fn connected_within(&self, within: Duration) -> Option<bool> {
        let mut state = self.state.clone();
        let connected = state.wait_for(|state| !matches!(state, State::Connecting));
        tokio::select! {
            answer = tokio::time::timeout(within, connected) => match answer {
                Ok(Ok(state)) => match *state {
                    State::Connected { session_present } => Some(session_present),
                    _ => None,
                },
                _ => None,
            },
            () = self.upstream.found_down() => None,
        }
    }

    /// The device was told its session went on (session present 1) before the endpoint
    /// answered. Should the endpoint then say it had no session, this one ends (the
    /// device's connection with it) and the device's next CONNECT hears session present
    /// 0, so that it subscribes again.
    ///
    /// False when the endpoint answered meanwhile that it had no session: the device is
    /// told so instead.
    pub fn promise_present(&self) -> bool {
        let mut waiting = self.lock();
        if *self.state.borrow()
            == (State::Connected {
                session_present: false,
            })
        {
            return false;
        }
        waiting.promised = true;
        true
    }

    /// Where the session stands, now and as it changes.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The next message for the device. Cancel-safe.
    pub async fn next(&mut self) -> Option<Publish> {
        self.incoming.recv().await
    }

    /// The next message for the device if one is here now.
    pub fn try_next(&mut self) -> Option<Publish> {
        self.incoming.try_recv().ok()
    }

    /// Whether the session is over (taken over elsewhere, or its connection lost).
    pub fn is_over(&self) -> bool {
        matches!(*self.state.borrow(), State::Lost | State::TakenOver)
    }

    /// Ends the session: `politely` with DISCONNECT (no will), otherwise by dropping the
    /// connection (the endpoint publishes the will).
    pub async fn close(mut self, politely: bool) {
        let Some(task) = self.task.take() else {
            return;
        };
        let ending = matches!(*self.state.borrow(), State::Lost | State::TakenOver);
        if !ending {
            self.link.settle(SETTLE_AT_CLOSE).await;
        }
        // A session that is over ends by itself (one IoT Core no longer had is closed
        // with DISCONNECT, so that no will goes): it is not cut short.
        if ending || (politely && self.is_connected() && self.client.try_disconnect().is_ok()) {
            // The task ends once the DISCONNECT is written.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        } else {
            task.abort();
        }
    }
}

/// The next message for the device from its session, if it has one; never without one.
/// Cancel-safe.
pub async fn next_for(session: &mut Option<UpstreamSession>) -> Publish {
    if let Some(session) = session
        && let Some(publish) = session.next().await
    {
        return publish;
    }
    std::future::pending().await
}

impl Drop for UpstreamSession {
    fn drop(&mut self) {
        self.upstream.unlisted(&self.device, &self.link);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The MQTT QoS of `qos` (at most 1).
fn qos_of(qos: u8) -> QoS {
    if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// The session's task: it owns the connection.
struct Driver {
    upstream: Arc<Upstream>,
    /// To end the connection politely.
    client: AsyncClient,
    waiting: Arc<Mutex<Waiting>>,
    /// Told when the last publish in flight got its answer ([`Link::settle`]).
    settled: Arc<tokio::sync::Notify>,
    to_device: mpsc::Sender<Publish>,
    state: watch::Sender<State>,
    /// Subscribed once connected (the spec's).
    subscriptions: Vec<String>,
}

impl Driver {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(self, mut events: EventLoop) {
        let client_id = events.options.client_id();
        let mut connected = false;
        let mut failures = 0;
        let mut last_attempt: Option<Instant> = None;
        loop {
            if !connected {
                if let Some(at) = last_attempt {
                    tokio::time::sleep_until(at + PER_CLIENT_ID).await;
                }
                self.upstream.pace.turn().await;
                last_attempt = Some(Instant::now());
            }
            match events.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    connected = true;
                    failures = 0;
                    self.upstream.connected(true);
                    crate::metrics::METRICS.upstream("connected");
                    // Under the lock, so that a promise is either seen here or not made.
                    let waiting = self.lock();
                    if !ack.session_present && waiting.promised {
                        drop(waiting);
                        tracing::info!(%client_id, "IoT Core no longer had the session its device was told went on; the device reconnects");
                        crate::metrics::METRICS.upstream("session_gone");
                        self.upstream.forget(&client_id);
                        self.state.send_replace(State::Lost);
                        // Politely: this is no abnormal end of the device.
                        let _ = self.client.try_disconnect();
                        continue;
                    }
                    self.state.send_replace(State::Connected {
                        session_present: ack.session_present,
                    });
                    drop(waiting);
                    self.subscribe_spec(&client_id);
                }
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    let mut waiting = self.lock();
                    if let Some(answer) = waiting.subscribes.pop_front() {
                        waiting.subacks.insert(pkid, answer);
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    if let Some(answer) = self.lock().subacks.remove(&ack.pkid) {
                        let _ = answer.send(ack.return_codes);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut waiting = self.lock();
                    if let Some(answer) = waiting.publishes.pop_front() {
                        if pkid == 0 {
                            // QoS 0: written is all there is.
                            let _ = answer.send(PubAckReason::Success);
                        } else {
                            waiting.pubacks.insert(pkid, answer);
                        }
                    }
                    if waiting.publishes.is_empty() && waiting.pubacks.is_empty() {
                        self.settled.notify_waiters();
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                    let mut waiting = self.lock();
                    if let Some(answer) = waiting.pubacks.remove(&ack.pkid) {
                        let _ = answer.send(ack.reason);
                    }
                    if waiting.publishes.is_empty() && waiting.pubacks.is_empty() {
                        self.settled.notify_waiters();
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => self.for_device(publish),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code: DisconnectReasonCode::SessionTakenOver,
                    ..
                })) => {
                    tracing::info!(%client_id, "IoT Core session taken over by another connection");
                    crate::metrics::METRICS.upstream("taken_over");
                    self.lock().lost();
                    self.state.send_replace(State::TakenOver);
                    return;
                }
                Err(error) => {
                    if connected {
                        tracing::info!(%client_id, %error, "IoT Core session lost; the device's connection ends with it");
                        crate::metrics::METRICS.upstream("lost");
                        self.lock().lost();
                        self.state.send_replace(State::Lost);
                        return;
                    }
                    if failures == 0 {
                        tracing::warn!(%client_id, %error, "cannot reach IoT Core for a device; trying again");
                    }
                    if matches!(
                        error,
                        ConnectionError::ConnectionRefused(
                            ConnectReturnCode::NotAuthorized
                                | ConnectReturnCode::BadUserNamePassword
                        )
                    ) {
                        crate::metrics::METRICS.upstream("refused");
                    } else {
                        crate::metrics::METRICS.upstream("connect_failed");
                    }
                    self.upstream.connected(false);
                    failures += 1;
                    // Nothing is in flight: subscribes and publishes are refused until
                    // the session is connected.
                    self.state.send_replace(State::Down);
                    tokio::time::sleep(RECONNECT.delay(failures)).await;
                }
            }
        }
    }

    /// Subscribes the spec's filters (again, on a resumed session: the endpoint keeps
    /// one subscription per filter, and sends no retained message for it twice). A
    /// refusal is logged and counted; nobody waits for the answers.
    fn subscribe_spec(&self, client_id: &str) {
        let per_subscribe = crate::quota::IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE;
        for chunk in self.subscriptions.chunks(per_subscribe) {
            let filters: Vec<Filter> = chunk
                .iter()
                .map(|path| Filter {
                    retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                    ..Filter::new(path.clone(), QoS::AtLeastOnce)
                })
                .collect();
            let (answer, answered) = oneshot::channel();
            let mut waiting = self.lock();
            waiting.subscribes.push_back(answer);
            if self.client.try_subscribe_many(filters).is_err() {
                waiting.subscribes.pop_back();
                return;
            }
            drop(waiting);
            let chunk = chunk.to_vec();
            let client_id = client_id.to_string();
            tokio::spawn(async move {
                let Ok(codes) = answered.await else { return };
                for (filter, code) in chunk.iter().zip(codes) {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        crate::metrics::METRICS.upstream("subscribe_refused");
                        tracing::warn!(%client_id, %filter, ?code, "IoT Core refused a command subscription");
                    }
                }
            });
        }
    }

    /// A message for the device: handed to its connection, or (QoS 0, the device far
    /// behind) counted as dropped.
    fn for_device(&self, publish: Publish) {
        match self.to_device.try_send(publish) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(publish)) => {
                // QoS 1 cannot get here (the endpoint sends at most the receive
                // maximum unacknowledged, and the channel has room for that): it would
                // be sent again on the next session.
                crate::metrics::METRICS.upstream("dropped_qos0");
                tracing::debug!(topic = %String::from_utf8_lossy(&publish.topic), qos = ?publish.qos, "message for a device that is behind dropped");
            }
            // The device's connection is gone; the session closes with it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}
