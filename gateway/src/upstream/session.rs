//! One device's MQTT 5 session at the endpoint, driven by its own task over its own
//! connection ([`crate::upstream::wire`]).
//!
//! **Nothing waits on the endpoint unasked.** A request (subscribe, publish, a device's
//! acknowledgement) is queued for the task and never waits for room; while the session is
//! not connected a subscribe or a publish fails at once with [`Failure::Unavailable`]: a
//! device's publishes to the spool never depend on it, and its SUBACKs say the truth.
//!
//! **Answers.** A request gets its packet id when it is queued, and its waiter is filed
//! under that id; the SUBACK or PUBACK with the id resolves it. At most
//! [`OUTGOING_IN_FLIGHT`] QoS 1 publishes (fewer if the endpoint's receive maximum says
//! so) are written and unanswered at once; the others wait their turn, in order. A lost
//! connection drops everything in flight, and the waiters hear [`Failure::Unavailable`].
//!
//! **Messages for the device** arrive in [`UpstreamSession::next`] and are acknowledged
//! to the endpoint only when the device acknowledged them ([`Link::ack`]): QoS 1 end to
//! end, so that a gateway that crashes loses nothing (IoT Core sends again). At most the
//! device's receive maximum of QoS 1 messages are in flight (the session announces it to
//! the endpoint); QoS 0 messages beyond what the device takes are counted as dropped, as
//! QoS 0 allows.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter,
    LastWill, Packet, PingReq, PubAck, PubAckReason, Publish, PublishProperties, RetainForwardRule,
    Subscribe, SubscribeReasonCode, Unsubscribe,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::upstream::Upstream;
use crate::upstream::pace::PER_CLIENT_ID;
use crate::upstream::wire::{self, Wire, WireError};

/// The largest packet taken from the endpoint: IoT Core's messages are at most 128 KiB,
/// and room is left for the topic and properties.
const MAX_INCOMING_PACKET: u32 = 256 * 1024;

/// QoS 1 publishes of the device (requests passed through, telemetry) written and
/// unanswered at once, at most (the endpoint's receive maximum may say fewer).
pub const OUTGOING_IN_FLIGHT: u16 = 16;

/// Publishes queued for the endpoint at most; beyond, a publish is refused
/// ([`Failure::Unavailable`]: the sink's own connection takes telemetry then).
const OUTGOING_QUEUE: usize = 256;

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

/// What is queued for the endpoint, and the waiters for its answers: shared by the
/// session's task and whoever asks (the device's connection, the IoT Core sink).
#[derive(Default)]
struct Waiting {
    /// Whether requests are taken: the session is connected.
    open: bool,
    /// Packets for the endpoint other than publishes (acknowledgements, subscribes,
    /// unsubscribes), in order.
    control: Vec<Packet>,
    /// Publishes not yet written, in order; a QoS 0 one with its waiter (answered once
    /// it is written), a QoS 1 one's is in `pubacks`.
    outbox: VecDeque<(Publish, Option<oneshot::Sender<PubAckReason>>)>,
    /// Subscribes' waiters, by packet id.
    subacks: HashMap<u16, oneshot::Sender<Vec<SubscribeReasonCode>>>,
    /// QoS 1 publishes' waiters, by packet id (queued or written).
    pubacks: HashMap<u16, oneshot::Sender<PubAckReason>>,
    /// Unsubscribes not answered yet (their packet ids are in use).
    unsubacks: HashSet<u16>,
    /// The packet id given last.
    last_pkid: u16,
    /// End with DISCONNECT once what is queued is written.
    disconnect: bool,
    /// The device was told its session went on before the endpoint answered.
    promised: bool,
}

/// The longest a closing session waits for the answers to its publishes in flight.
const SETTLE_AT_CLOSE: Duration = Duration::from_secs(2);

impl Waiting {
    /// Everything in flight is lost (dropping a waiter tells it so); nothing more is
    /// taken.
    fn lost(&mut self) {
        let promised = self.promised;
        *self = Waiting {
            promised,
            ..Waiting::default()
        };
    }

    /// A packet id that nothing in flight has.
    fn next_pkid(&mut self) -> u16 {
        loop {
            // 0 is no packet id.
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let id = self.last_pkid;
            if !self.subacks.contains_key(&id)
                && !self.pubacks.contains_key(&id)
                && !self.unsubacks.contains(&id)
            {
                return id;
            }
        }
    }

    /// Queues a SUBSCRIBE of `filters`; its answer comes on the receiver.
    fn subscribe(&mut self, filters: Vec<Filter>) -> oneshot::Receiver<Vec<SubscribeReasonCode>> {
        let (answer, answered) = oneshot::channel();
        let pkid = self.next_pkid();
        self.subacks.insert(pkid, answer);
        self.control.push(Packet::Subscribe(Subscribe {
            pkid,
            filters,
            properties: None,
        }));
        answered
    }

    /// Whether every publish queued has been written and answered.
    fn settled(&self) -> bool {
        self.outbox.is_empty() && self.pubacks.is_empty()
    }
}

/// What the session's task and those asking share.
#[derive(Default)]
struct Shared {
    /// What is queued, and the waiters.
    waiting: Mutex<Waiting>,
    /// Told when something was queued.
    queued: Notify,
    /// Told whenever the last publish in flight got its answer.
    settled: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues with `queue` (which says whether it queued anything) and wakes the task.
    fn queue<T>(&self, queue: impl FnOnce(&mut Waiting) -> Option<T>) -> Option<T> {
        let queued = queue(&mut self.lock());
        if queued.is_some() {
            self.queued.notify_one();
        }
        queued
    }
}

/// What asking the endpoint something on a session takes: shared by the device's
/// connection (which owns the session, [`UpstreamSession`]) and the IoT Core sink (which
/// delivers the device's telemetry through it).
pub struct Link {
    /// Requests and their waiters, shared with the task.
    shared: Arc<Shared>,
    /// Where the session stands.
    state: watch::Receiver<State>,
    /// How long answers are waited for, in milliseconds.
    timeout_ms: u64,
}

/// A device's session at the endpoint.
pub struct UpstreamSession {
    /// Requests and their answers.
    link: Arc<Link>,
    /// The device, under which the session is listed at the endpoint.
    device: String,
    /// Messages for the device (boxed: the channel's first block holds 32 whatever the
    /// traffic, and an idle session should not).
    incoming: mpsc::Receiver<Box<Publish>>,
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
        let filters: Vec<Filter> = filters
            .into_iter()
            .map(|(path, qos)| Filter::new(path, qos_of(qos)))
            .collect();
        let answered = self
            .shared
            .queue(|waiting| waiting.open.then(|| waiting.subscribe(filters)))
            .ok_or(Failure::Unavailable)?;
        self.wait(answered).await
    }

    /// Ends subscriptions (without waiting for the endpoint's answer: an unsubscribe
    /// cannot be refused).
    pub fn unsubscribe(&self, filters: &[String]) {
        let per_packet = crate::quota::IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE;
        for chunk in filters.chunks(per_packet) {
            let queued = self.shared.queue(|waiting| {
                waiting.open.then(|| {
                    let pkid = waiting.next_pkid();
                    waiting.unsubacks.insert(pkid);
                    waiting.control.push(Packet::Unsubscribe(Unsubscribe {
                        pkid,
                        filters: chunk.to_vec(),
                        properties: None,
                    }));
                })
            });
            if queued.is_none() {
                tracing::debug!(?chunk, "unsubscribe not passed on; the session is down");
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
        let mut publish = Publish::new(topic, qos_of(qos), payload, properties);
        publish.retain = retain;
        let answered = self
            .shared
            .queue(|waiting| {
                if !waiting.open || waiting.outbox.len() >= OUTGOING_QUEUE {
                    return None;
                }
                let (answer, answered) = oneshot::channel();
                if publish.qos == QoS::AtMostOnce {
                    waiting.outbox.push_back((publish, Some(answer)));
                } else {
                    publish.pkid = waiting.next_pkid();
                    waiting.pubacks.insert(publish.pkid, answer);
                    waiting.outbox.push_back((publish, None));
                }
                Some(answered)
            })
            .ok_or(Failure::Unavailable)?;
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
                let told = self.shared.settled.notified();
                if self.shared.lock().settled() {
                    return;
                }
                told.await;
            }
        };
        let _ = tokio::time::timeout(limit, settled).await;
    }

    /// The device acknowledged `publish` (or it cannot be delivered and must not come
    /// again): the endpoint hears the PUBACK now.
    pub fn ack(&self, publish: &Publish) {
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        let pkid = publish.pkid;
        let queued = self.shared.queue(|waiting| {
            waiting.open.then(|| {
                waiting
                    .control
                    .push(Packet::PubAck(PubAck::new(pkid, None)))
            })
        });
        if queued.is_none() {
            tracing::debug!("acknowledgement not passed on; the endpoint sends it again");
        }
    }

    /// Asks the task to end with DISCONNECT; false when the session is not connected.
    fn disconnect(&self) -> bool {
        self.shared
            .queue(|waiting| waiting.open.then(|| waiting.disconnect = true))
            .is_some()
    }
}

impl UpstreamSession {
    /// Starts `spec`'s session at `upstream`; it connects in the background.
    pub(super) fn open(upstream: Arc<Upstream>, spec: Spec) -> UpstreamSession {
        let settings = &upstream.settings;
        let connect = Packet::Connect(
            Connect {
                keep_alive: settings.keep_alive_secs,
                client_id: spec.client_id.clone(),
                clean_start: spec.clean_start,
                properties: Some(ConnectProperties {
                    session_expiry_interval: Some(spec.session_expiry_secs),
                    receive_maximum: Some(spec.receive_maximum.max(1)),
                    max_packet_size: Some(MAX_INCOMING_PACKET),
                    ..ConnectProperties::new()
                }),
            },
            spec.will,
            None,
        );
        let room = usize::from(spec.receive_maximum.max(1));
        let (to_device, incoming) = mpsc::channel(room + QOS0_ROOM);
        let (state_tx, state) = watch::channel(State::Connecting);
        let shared = Arc::new(Shared::default());
        let driver = Driver {
            upstream: upstream.clone(),
            client_id: spec.client_id,
            connect,
            shared: shared.clone(),
            to_device,
            state: state_tx,
            subscriptions: spec.subscriptions,
        };
        let task = tokio::spawn(driver.run());
        let link = Arc::new(Link {
            shared,
            state,
            timeout_ms: settings.answer_timeout_ms,
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
        let mut waiting = self.shared.lock();
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
        self.incoming.recv().await.map(|publish| *publish)
    }

    /// The next message for the device if one is here now.
    pub fn try_next(&mut self) -> Option<Publish> {
        self.incoming.try_recv().ok().map(|publish| *publish)
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
        let ending = self.is_over();
        if !ending {
            self.link.settle(SETTLE_AT_CLOSE).await;
        }
        // A session that is over ends by itself (one IoT Core no longer had is closed
        // with DISCONNECT, so that no will goes): it is not cut short.
        if ending || (politely && self.link.disconnect()) {
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

/// How a connection that was made ended.
enum End {
    /// The session asked for it (DISCONNECT written).
    Politely,
    /// The endpoint said another connection took the client id.
    TakenOver,
    /// Anything else, and why.
    Lost(String),
}

/// The session's task: it owns the connection.
struct Driver {
    upstream: Arc<Upstream>,
    /// The device's client id.
    client_id: String,
    /// The CONNECT the session sends ([`Packet::Connect`]).
    connect: Packet,
    shared: Arc<Shared>,
    to_device: mpsc::Sender<Box<Publish>>,
    state: watch::Sender<State>,
    /// Subscribed once connected (the spec's).
    subscriptions: Vec<String>,
}

impl Driver {
    async fn run(self) {
        let client_id = &self.client_id;
        let settings = &self.upstream.settings;
        let mut failures = 0;
        let mut last_attempt: Option<Instant> = None;
        let wire = loop {
            if let Some(at) = last_attempt {
                tokio::time::sleep_until(at + PER_CLIENT_ID).await;
            }
            self.upstream.pace.turn().await;
            last_attempt = Some(Instant::now());
            let tls = self.upstream.tls.clone();
            let connecting = wire::connect(
                tls,
                &settings.host,
                settings.port,
                &self.connect,
                MAX_INCOMING_PACKET,
            );
            // Boxed: the TLS handshake's state is large, and the task keeps its future
            // for as long as the session lives.
            let error = match Box::pin(connecting).await {
                Ok(connected) => break connected,
                Err(error) => error,
            };
            if failures == 0 {
                tracing::warn!(%client_id, %error, "cannot reach IoT Core for a device; trying again");
            }
            if matches!(
                error,
                WireError::Refused(
                    ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
                )
            ) {
                crate::metrics::METRICS.upstream("refused");
            } else {
                crate::metrics::METRICS.upstream("connect_failed");
            }
            self.upstream.connected(false);
            failures += 1;
            // Nothing is in flight: subscribes and publishes are refused until the
            // session is connected.
            self.state.send_replace(State::Down);
            tokio::time::sleep(RECONNECT.delay(failures)).await;
        };
        let (wire, ack) = wire;
        self.upstream.connected(true);
        crate::metrics::METRICS.upstream("connected");
        // Under the lock, so that a promise is either seen here or not made.
        let gone = {
            let mut waiting = self.shared.lock();
            let gone = !ack.session_present && waiting.promised;
            if !gone {
                waiting.open = true;
                self.state.send_replace(State::Connected {
                    session_present: ack.session_present,
                });
            }
            gone
        };
        if gone {
            tracing::info!(%client_id, "IoT Core no longer had the session its device was told went on; the device reconnects");
            crate::metrics::METRICS.upstream("session_gone");
            self.upstream.forget(client_id);
            self.state.send_replace(State::Lost);
            // Politely: this is no abnormal end of the device.
            end_politely(wire).await;
            return;
        }
        self.subscribe_spec();
        let (room, server_keep_alive) = ack
            .properties
            .map_or((None, None), |p| (p.receive_max, p.server_keep_alive));
        let room = room.unwrap_or(u16::MAX).clamp(1, OUTGOING_IN_FLIGHT);
        // MQTT 5: a Server Keep Alive in the CONNACK replaces the one the CONNECT asked
        // for (IoT Core's range is the configuration's, but another broker may ask for
        // less); 0 is none at all.
        let keep_alive = server_keep_alive.unwrap_or(settings.keep_alive_secs);
        let keep_alive = (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)));
        let end = self.serve(wire, usize::from(room), keep_alive).await;
        self.shared.lock().lost();
        match end {
            End::Politely => {}
            End::TakenOver => {
                tracing::info!(%client_id, "IoT Core session taken over by another connection");
                crate::metrics::METRICS.upstream("taken_over");
                self.state.send_replace(State::TakenOver);
            }
            End::Lost(error) => {
                tracing::info!(%client_id, %error, "IoT Core session lost; the device's connection ends with it");
                crate::metrics::METRICS.upstream("lost");
                self.state.send_replace(State::Lost);
            }
        }
    }

    /// Serves a connection until it ends: writes what is queued (at most `room` QoS 1
    /// publishes unanswered), reads what comes, and pings within `keep_alive` (if any).
    async fn serve(&self, mut wire: Wire, room: usize, keep_alive: Option<Duration>) -> End {
        // Without a keep-alive, a ping that never comes due.
        let keep_alive = keep_alive.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let mut in_flight = 0;
        let mut ping_at = Instant::now() + keep_alive;
        let mut awaiting_pong = false;
        loop {
            let mut out = BytesMut::new();
            let (written, disconnect) = self.take_writable(&wire, &mut out, &mut in_flight, room);
            if !out.is_empty() {
                if let Err(error) = wire.send(&out).await {
                    return End::Lost(error.to_string());
                }
                ping_at = Instant::now() + keep_alive;
                for answer in written {
                    let _ = answer.send(PubAckReason::Success);
                }
                if self.shared.lock().settled() {
                    self.shared.settled.notify_waiters();
                }
            }
            drop(out);
            if disconnect {
                end_politely(wire).await;
                return End::Politely;
            }
            tokio::select! {
                packet = wire.read() => match packet {
                    Ok(packet) => {
                        if let Some(end) = self.incoming(packet, &mut in_flight, &mut awaiting_pong) {
                            return end;
                        }
                    }
                    Err(error) => return End::Lost(error.to_string()),
                },
                () = self.shared.queued.notified() => {}
                () = tokio::time::sleep_until(ping_at) => {
                    if awaiting_pong {
                        return End::Lost("no PINGRESP within the keep-alive".to_string());
                    }
                    awaiting_pong = true;
                    let mut ping = BytesMut::new();
                    if let Err(error) = wire.encode(&Packet::PingReq(PingReq), &mut ping) {
                        return End::Lost(error.to_string());
                    }
                    if let Err(error) = wire.send(&ping).await {
                        return End::Lost(error.to_string());
                    }
                    ping_at = Instant::now() + keep_alive;
                }
            }
        }
    }

    /// Encodes into `out` what may be written now: the control packets, then publishes
    /// in order while fewer than `room` QoS 1 ones are unanswered. Returns the waiters of
    /// the QoS 0 publishes among them (answered once written) and whether to end with
    /// DISCONNECT after.
    fn take_writable(
        &self,
        wire: &Wire,
        out: &mut BytesMut,
        in_flight: &mut usize,
        room: usize,
    ) -> (Vec<oneshot::Sender<PubAckReason>>, bool) {
        let mut waiting = self.shared.lock();
        for packet in std::mem::take(&mut waiting.control) {
            if let Err(error) = wire.encode(&packet, out) {
                // A SUBSCRIBE larger than the endpoint takes: its waiter hears it was
                // not passed on.
                if let Packet::Subscribe(subscribe) = &packet {
                    waiting.subacks.remove(&subscribe.pkid);
                }
                tracing::warn!(client_id = %self.client_id, %error, packet = wire::name_of(&packet), "not sent to IoT Core");
            }
        }
        let mut written = Vec::new();
        while let Some((front, _)) = waiting.outbox.front() {
            if front.qos != QoS::AtMostOnce && *in_flight >= room {
                break;
            }
            let Some((publish, answer)) = waiting.outbox.pop_front() else {
                break;
            };
            let pkid = publish.pkid;
            let packet = Packet::Publish(publish);
            match (wire.encode(&packet, out), answer) {
                (Ok(()), Some(answer)) => written.push(answer),
                (Ok(()), None) => *in_flight += 1,
                // Larger than the endpoint takes: the waiter hears it was not passed on
                // (telemetry goes through the sink's own connection then).
                (Err(error), _) => {
                    waiting.pubacks.remove(&pkid);
                    crate::metrics::METRICS.upstream("publish_too_large");
                    tracing::warn!(client_id = %self.client_id, %error, "publish not sent to IoT Core");
                }
            }
        }
        (written, waiting.disconnect)
    }

    /// Handles a packet from the endpoint; `Some` when the connection ends with it.
    fn incoming(
        &self,
        packet: Packet,
        in_flight: &mut usize,
        awaiting_pong: &mut bool,
    ) -> Option<End> {
        match packet {
            Packet::Publish(publish) if publish.qos == QoS::ExactlyOnce => {
                return Some(End::Lost(
                    "the endpoint sent QoS 2 on a session that subscribes at QoS 1 at most"
                        .to_string(),
                ));
            }
            Packet::Publish(publish) => self.for_device(publish),
            Packet::PubAck(ack) => {
                *in_flight = in_flight.saturating_sub(1);
                let mut waiting = self.shared.lock();
                if let Some(answer) = waiting.pubacks.remove(&ack.pkid) {
                    let _ = answer.send(ack.reason);
                }
                if waiting.settled() {
                    self.shared.settled.notify_waiters();
                }
            }
            Packet::SubAck(ack) => {
                if let Some(answer) = self.shared.lock().subacks.remove(&ack.pkid) {
                    let _ = answer.send(ack.return_codes);
                }
            }
            Packet::UnsubAck(ack) => {
                self.shared.lock().unsubacks.remove(&ack.pkid);
            }
            Packet::PingResp(_) => *awaiting_pong = false,
            Packet::Disconnect(Disconnect {
                reason_code: DisconnectReasonCode::SessionTakenOver,
                ..
            }) => return Some(End::TakenOver),
            Packet::Disconnect(disconnect) => {
                return Some(End::Lost(format!(
                    "the endpoint disconnected: {:?}",
                    disconnect.reason_code
                )));
            }
            other => {
                tracing::debug!(client_id = %self.client_id, packet = wire::name_of(&other), "packet from IoT Core ignored");
            }
        }
        None
    }

    /// Subscribes the spec's filters (again, on a resumed session: the endpoint keeps
    /// one subscription per filter, and sends no retained message for it twice). A
    /// refusal is logged and counted; nobody waits for the answers.
    fn subscribe_spec(&self) {
        let per_subscribe = crate::quota::IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE;
        for chunk in self.subscriptions.chunks(per_subscribe) {
            let filters: Vec<Filter> = chunk
                .iter()
                .map(|path| Filter {
                    retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                    ..Filter::new(path.clone(), QoS::AtLeastOnce)
                })
                .collect();
            let answered = self.shared.lock().subscribe(filters);
            let chunk = chunk.to_vec();
            let client_id = self.client_id.clone();
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
        match self.to_device.try_send(Box::new(publish)) {
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

/// Ends a connection with DISCONNECT (normal: the endpoint publishes no will).
async fn end_politely(mut wire: Wire) {
    let mut bytes = BytesMut::new();
    let disconnect = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
    if wire.encode(&disconnect, &mut bytes).is_ok() && wire.send(&bytes).await.is_ok() {
        wire.shut().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut waiting = Waiting {
            last_pkid: u16::MAX - 1,
            ..Waiting::default()
        };
        let (answer, _answered) = oneshot::channel();
        waiting.pubacks.insert(1, answer);
        waiting.unsubacks.insert(2);
        let _subscribed = waiting.subscribe(vec![Filter::new("a/b", QoS::AtLeastOnce)]);
        // 65535 went to the subscribe; 0 is no id, 1 and 2 are in flight.
        assert!(waiting.subacks.contains_key(&u16::MAX));
        assert_eq!(waiting.next_pkid(), 3);
        assert!(!waiting.settled(), "a QoS 1 publish is unanswered");
    }

    #[test]
    fn a_lost_connection_drops_every_waiter_and_keeps_the_promise() {
        let mut waiting = Waiting {
            open: true,
            promised: true,
            ..Waiting::default()
        };
        let mut subscribed = waiting.subscribe(vec![Filter::new("a/b", QoS::AtLeastOnce)]);
        waiting.lost();
        assert!(!waiting.open && waiting.promised && waiting.control.is_empty());
        assert!(matches!(
            subscribed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
