//! One MQTT connection, whatever carries it (TLS, TCP on loopback, a WebSocket): CONNECT
//! and authentication, then publishes through the one admission step and the pipeline,
//! acknowledged once durable, in the order they came.
//!
//! **Batches.** Every PUBLISH that is in when the gateway reads (up to the window) is
//! admitted one by one and then runs through the pipeline as one batch: one spool commit
//! for them all, the PUBACKs in arrival order (MQTT requires it), and the next read only
//! after. A client with many QoS 1 publishes in flight thus gets them committed together.
//!
//! **Refusals** are answered with MQTT 5 PUBACK reason codes and the reason string: 0x87
//! not authorised, 0x97 quota exceeded (a grant's rate, a full spool), 0x83 a plugin
//! refused, 0x90 a bad topic, 0x99 other bad input; a packet over a grant's size is
//! DISCONNECT 0x95 (the messages before it acknowledged first), since 0x95 is not a
//! PUBACK code and clients (paho) drop the connection on one. MQTT 3.1.1 has no negative
//! PUBACK, so the connection is closed. QoS 2 is refused (5.0:
//! DISCONNECT 0x9B; 3.1.1: closed). When the spool is full, a 3.1.1 client's batch waits
//! and is tried again without reading further, so the client's own window holds it back.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::auth::{AuthError, DEVICE_HEADER, Identity, PeerIdentity, check_device_id};
use crate::ingress::admit::{ApiError, Publish as Admitted, admit, admit_reply, authenticate};
use crate::ingress::mqtt::codec::{
    self, CodecError, ConnAckCode, Connect, Incoming, Publish, Version,
};
use crate::ingress::mqtt::commands::Outbound;
use crate::ingress::mqtt::saved::Kept;
use crate::ingress::state::AppState;
use crate::pipeline::{Status, StoreError};
use crate::spool::SpoolError;

/// What carries the MQTT bytes.
pub trait Transport: Send {
    /// Reads more bytes into `buffer`; `Ok(0)` at the end. Cancel-safe.
    fn read_more(
        &mut self,
        buffer: &mut BytesMut,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes `bytes` whole.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

/// A byte stream (TLS, TCP).
pub struct Stream<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for Stream<S> {
    async fn read_more(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        self.0.read_buf(buffer).await
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes).await?;
        self.0.flush().await
    }
}

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
}

/// The largest CONNECT taken: before a client is authenticated it may not make the
/// gateway hold more (a CONNECT carries ids, credentials and a will).
const MAX_CONNECT_BYTES: usize = 64 * 1024;

/// IoT Core's keep-alive range, in seconds: a client asking for less gets the least, for
/// none or more the most.
const KEEP_ALIVE_SECS: (u16, u16) = (30, 1200);

/// What authenticates the client besides its CONNECT: the connection's client
/// certificate, and (over WebSocket) the upgrade request's headers.
#[derive(Default)]
pub struct Credentials {
    /// The TLS client certificate's identity.
    pub peer: Option<PeerIdentity>,
    /// The WebSocket upgrade request's headers (a bearer token there counts).
    pub headers: HeaderMap,
    /// The address the connection comes from.
    pub remote: Option<std::net::SocketAddr>,
}

/// Why a session ends.
enum End {
    /// The client sent DISCONNECT (5.0 with reason 0x04: publish its will anyway).
    Disconnected {
        /// Its last will goes out.
        with_will: bool,
    },
    /// The connection closed without a DISCONNECT.
    Closed,
    /// The gateway closed it (5.0: with this DISCONNECT reason code first).
    Refused(u8, String),
}

/// Runs one connection to its end.
pub async fn run<T: Transport>(
    mut io: T,
    state: AppState,
    credentials: Credentials,
    limits: Limits,
    protocol: &'static str,
) {
    let mut buffer = BytesMut::with_capacity(1024);
    let connect_limits = Limits {
        max_packet_bytes: limits.max_packet_bytes.min(MAX_CONNECT_BYTES),
        ..limits
    };
    let connect = match tokio::time::timeout(
        limits.connect_timeout,
        read_connect(&mut io, &mut buffer, connect_limits),
    )
    .await
    {
        Ok(Ok(connect)) => connect,
        Ok(Err(Some(error))) => {
            tracing::debug!(%error, "MQTT connection refused before CONNECT");
            if let CodecError::Protocol(_) = error {
                let ack = codec::connack(
                    Version::V4,
                    ConnAckCode::BadProtocol,
                    codec::Accepted::default(),
                    None,
                );
                let _ = io.send(&ack).await;
            }
            crate::metrics::METRICS.refusal("mqtt_bad_connect");
            return;
        }
        Ok(Err(None)) | Err(_) => return,
    };
    let version = connect.version;
    let refuse = async |io: &mut T, code: ConnAckCode, why: String| {
        tracing::info!(client_id = %connect.client_id, why = %why, "MQTT CONNECT refused");
        crate::metrics::METRICS.refusal("mqtt_connect_refused");
        let ack = codec::connack(version, code, codec::Accepted::default(), Some(&why));
        let _ = io.send(&ack).await;
    };
    let identity = match identify(&state, &credentials, &connect) {
        Ok(identity) => identity,
        Err((code, why)) => return refuse(&mut io, code, why).await,
    };
    if let Some(will) = &connect.will
        && !state.rules().policy.may_publish(&identity, &will.topic)
    {
        let why = format!("the last will's topic `{}` is not allowed", will.topic);
        return refuse(&mut io, ConnAckCode::NotAuthorized, why).await;
    }
    // The client id is taken over before its saved session is read, so that the
    // connection it takes over no longer writes it.
    let kicked = state.mqtt_clients.register(&connect.client_id);
    let asked_expiry = match version {
        Version::V4 if connect.clean => 0,
        Version::V4 => limits.session_expiry_secs,
        Version::V5 => connect.session_expiry.unwrap_or(0),
    };
    let expiry = asked_expiry.min(limits.session_expiry_secs);
    let kept = match state
        .mqtt_sessions
        .begin(
            &connect.client_id,
            &identity.device_id,
            connect.clean,
            expiry,
        )
        .await
    {
        Ok(kept) => kept,
        Err(error) => {
            tracing::error!(%error, "cannot read or save an MQTT session");
            state.mqtt_clients.unregister(&connect.client_id, kicked.id);
            let why = "the session store is unavailable".to_string();
            return refuse(&mut io, ConnAckCode::Unavailable, why).await;
        }
    };
    let window = limits
        .window
        .min(connect.receive_maximum.unwrap_or(u16::MAX))
        .max(1);
    let keep_alive = match connect.keep_alive {
        0 => KEEP_ALIVE_SECS.1,
        secs => secs.clamp(KEEP_ALIVE_SECS.0, KEEP_ALIVE_SECS.1),
    };
    let accepted = codec::Accepted {
        receive_maximum: limits.window,
        max_packet: limits.max_packet_bytes,
        keep_alive,
        session_present: kept.present,
        session_expiry: (version == Version::V5 && asked_expiry > expiry).then_some(expiry),
    };
    let ack = codec::connack(version, ConnAckCode::Accepted, accepted, None);
    if io.send(&ack).await.is_err() {
        state.mqtt_clients.unregister(&connect.client_id, kicked.id);
        return;
    }
    let span = tracing::info_span!("mqtt_session", device = %identity.device_id, protocol);
    let mut outbound = Outbound::new(window);
    outbound.restore(&state.rules(), &identity, &kept.filters);
    let mut attached = match &state.downlink {
        Some(downlink) => Some(downlink.attach(&identity.device_id).await),
        None => None,
    };
    let session = Session {
        state: &state,
        identity: &identity,
        version,
        window,
        limits,
        idle: Duration::from_millis(u64::from(keep_alive) * 1500),
        kept: &kept,
        commands: attached.as_ref().map(|a| a.session),
    };
    let info = state
        .sessions
        .open(&identity, protocol, usize::from(window), credentials.remote);
    let end = tracing::Instrument::instrument(
        session.serve(
            &mut io,
            buffer,
            kicked.receiver,
            &info,
            &mut outbound,
            attached.as_mut().map(|a| &mut a.nudges),
        ),
        span,
    )
    .await;
    if let (Some(downlink), Some(attached)) = (&state.downlink, attached) {
        downlink.detach(&identity.device_id, attached.session).await;
    }
    if state.mqtt_clients.unregister(&connect.client_id, kicked.id)
        && let Err(error) = state.mqtt_sessions.keep(&kept, outbound.filters()).await
    {
        tracing::error!(%error, "cannot save an MQTT session");
    }
    let will = match &end {
        End::Disconnected { with_will } => *with_will,
        End::Refused(0x8b, _) => false,
        End::Closed | End::Refused(..) => true,
    };
    if let End::Refused(reason, why) = end {
        tracing::info!(device = %identity.device_id, reason = format!("{reason:#04x}"), why = %why, "MQTT connection closed by the gateway");
        if version == Version::V5 {
            let _ = io.send(&codec::disconnect(reason)).await;
        }
    }
    // Before the session is closed: once it is gone from `GET /admin/devices`, its will
    // is stored.
    if let (true, Some(publish)) = (will, connect.will) {
        publish_will(&state, &identity, publish).await;
    }
    state.sessions.close(info.session);
}

/// A publish as the admission step takes it (the retain flag as `mqtt.retain`).
fn admitted(publish: Publish) -> Admitted {
    let mut attributes = publish.properties.attributes;
    if publish.retain {
        attributes.push(("mqtt.retain".to_string(), "true".to_string()));
    }
    Admitted {
        topic: publish.topic,
        payload: publish.payload.to_vec(),
        content_type: publish.properties.content_type.unwrap_or_default(),
        qos: publish.qos.min(1),
        attributes,
    }
}

/// Sends a connection's last will through the pipeline, as the device's publish.
async fn publish_will(state: &AppState, identity: &Identity, will: Publish) {
    let topic = will.topic.clone();
    let limit = state.pipeline.max_payload_bytes();
    let outcome = match admit(&state.rules(), identity, limit, vec![admitted(will)], false) {
        Ok(messages) => match state.pipeline.process(messages, false).await {
            Ok(reports) if reports.iter().all(|r| r.status != Status::Rejected) => Ok(()),
            Ok(_) => Err("a plugin rejected it".to_string()),
            Err(error) => Err(ApiError::from(error).message()),
        },
        Err(error) => Err(error.message()),
    };
    match outcome {
        Ok(()) => {
            tracing::info!(device = %identity.device_id, %topic, "MQTT last will published");
            crate::metrics::METRICS.mqtt_publish("will", 1);
        }
        Err(why) => {
            tracing::warn!(device = %identity.device_id, %topic, %why, "MQTT last will refused");
            crate::metrics::METRICS.mqtt_publish("will_refused", 1);
        }
    }
}

/// Resolves when the downlink may have commands for the session; never without one.
async fn nudged(nudges: &mut Option<&mut tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match nudges {
        Some(nudges) => nudges.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads up to the CONNECT; `Err(None)` when the client went away.
async fn read_connect<T: Transport>(
    io: &mut T,
    buffer: &mut BytesMut,
    limits: Limits,
) -> Result<Connect, Option<CodecError>> {
    loop {
        if let Some(version) = codec::detect_version(buffer).map_err(Some)?
            && let Some(packet) =
                codec::read(version, buffer, limits.max_packet_bytes).map_err(Some)?
        {
            return match packet {
                Incoming::Connect(connect) => Ok(connect),
                _ => Err(Some(CodecError::Protocol(
                    "the first packet must be CONNECT".to_string(),
                ))),
            };
        }
        match io.read_more(buffer).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Who the client is. With `[auth]`: its certificate, else a token (as the MQTT password,
/// or a bearer header over WebSocket); the client id must be its device id. Without
/// `[auth]` the client id names the device, as `x-device-id` does over HTTP.
fn identify(
    state: &AppState,
    credentials: &Credentials,
    connect: &Connect,
) -> Result<Identity, (ConnAckCode, String)> {
    let rules = state.rules();
    let client_id = connect.client_id.as_str();
    if client_id.len() > crate::auth::MAX_DEVICE_ID_LEN {
        return Err((
            ConnAckCode::BadClientId,
            format!(
                "the client id is over {} bytes",
                crate::auth::MAX_DEVICE_ID_LEN
            ),
        ));
    }
    let mut headers = credentials.headers.clone();
    if !rules.auth.required() {
        check_device_id(client_id)
            .map_err(|why| (ConnAckCode::BadClientId, format!("client id {why}")))?;
        let value = HeaderValue::from_str(client_id).map_err(|_| {
            (
                ConnAckCode::BadClientId,
                "the client id must be printable ASCII".to_string(),
            )
        })?;
        headers.insert(DEVICE_HEADER, value);
    } else if let Some(password) = &connect.password
        && !headers.contains_key(header::AUTHORIZATION)
    {
        // The AWS SDKs put `?SDK=…&Version=…` after the user name; the password is the
        // token.
        let value = HeaderValue::from_str(&format!("Bearer {password}")).map_err(|_| {
            (
                ConnAckCode::BadCredentials,
                "the password is not a token".to_string(),
            )
        })?;
        headers.insert(header::AUTHORIZATION, value);
    }
    let identity =
        authenticate(&rules, credentials.peer.as_ref(), &headers).map_err(|error| match error {
            ApiError::Unauthorized(AuthError::MissingCredentials) => {
                (ConnAckCode::NotAuthorized, error.message())
            }
            other => (ConnAckCode::BadCredentials, other.message()),
        })?;
    if rules.auth.required() && !rules.policy.may_use_client_id(&identity, client_id) {
        return Err((
            ConnAckCode::NotAuthorized,
            format!(
                "the client id `{client_id}` is not the device id `{}`, and no policy grant's `client_ids` allows it",
                identity.device_id
            ),
        ));
    }
    Ok(identity)
}

/// A connected session.
struct Session<'a> {
    state: &'a AppState,
    identity: &'a Identity,
    version: Version,
    /// Most publishes taken into one batch (unacknowledged at once).
    window: u16,
    limits: Limits,
    /// 1.5 × the keep-alive: silent this long, the connection is closed.
    idle: Duration,
    /// The session's persistence.
    kept: &'a Kept,
    /// The session's number at the downlink, when there is one.
    commands: Option<u64>,
}

impl Session<'_> {
    async fn serve<T: Transport>(
        &self,
        io: &mut T,
        mut buffer: BytesMut,
        mut kicked: tokio::sync::oneshot::Receiver<()>,
        info: &crate::ingress::sessions::SessionInfo,
        outbound: &mut Outbound,
        mut nudges: Option<&mut tokio::sync::mpsc::Receiver<()>>,
    ) -> End {
        let mut shutdown = self.state.shutdown.clone();
        // The session ends with its credential: at its expiry, or when a reload revokes
        // it (checked once now too, for a reload between the CONNECT and here).
        let expiry = async {
            match self.identity.expires_at_secs {
                Some(at) => {
                    let left = at.saturating_sub(crate::message::now_ms() / 1000);
                    tokio::time::sleep(Duration::from_secs(left.saturating_add(1))).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let mut updates = self.state.live.updates.subscribe();
        updates.mark_changed();
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
                        ending = Some(End::Refused(0x9b, "QoS 2 is not supported".to_string()));
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
                        if let (Some(seq), Some(downlink)) =
                            (outbound.acked(pkid), &self.state.downlink)
                        {
                            downlink.done(&self.identity.device_id, vec![seq]).await;
                            // Room in the window for the next command.
                            if let Err(end) = self.deliver(io, outbound, info).await {
                                return end;
                            }
                        }
                    }
                    Incoming::Subscribe { pkid, filters } => {
                        let granted =
                            outbound.subscribe(&self.state.rules(), self.identity, &filters);
                        // Saved before the SUBACK: a subscription acknowledged is kept.
                        if let Err(end) = self.save_subscriptions(outbound).await {
                            return end;
                        }
                        let ack = codec::suback(self.version, pkid, &granted);
                        if io.send(&ack).await.is_err() {
                            return End::Closed;
                        }
                        if let Err(end) = self.deliver(io, outbound, info).await {
                            return end;
                        }
                    }
                    Incoming::Unsubscribe { pkid, filters } => {
                        outbound.unsubscribe(&filters);
                        if let Err(end) = self.save_subscriptions(outbound).await {
                            return end;
                        }
                        let ack = codec::unsuback(self.version, pkid, filters.len());
                        if io.send(&ack).await.is_err() {
                            return End::Closed;
                        }
                    }
                    Incoming::Connect(_) => {
                        ending = Some(End::Refused(0x82, "a second CONNECT".to_string()));
                        break;
                    }
                    Incoming::Unexpected(what) => {
                        ending = Some(End::Refused(0x82, format!("{what} from a client")));
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                info.messages
                    .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if let Err(end) = self.publish(io, batch).await {
                    return end;
                }
            }
            if let Some(end) = ending {
                return end;
            }
            if !buffer.is_empty() && codec::complete(&buffer) {
                continue;
            }
            tokio::select! {
                read = io.read_more(&mut buffer) => match read {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => {}
                },
                Some(()) = nudged(&mut nudges) => {
                    if let Err(end) = self.deliver(io, outbound, info).await {
                        return end;
                    }
                }
                () = tokio::time::sleep(self.idle) => {
                    return End::Refused(0x8d, "no packet for 1.5 times the keep-alive".to_string());
                }
                _ = &mut kicked => {
                    return End::Refused(0x8e, "another connection took over the client id".to_string());
                }
                () = shutdown.wait() => {
                    return End::Refused(0x8b, "the gateway is shutting down".to_string());
                }
                () = &mut expiry => {
                    return End::Refused(0x87, "the credential expired".to_string());
                }
                Ok(()) = updates.changed() => {
                    let now = crate::message::now_ms() / 1000;
                    if let Err(error) = self.state.rules().auth.still_valid(self.identity, now) {
                        return End::Refused(0x87, error.to_string());
                    }
                }
            }
        }
    }

    /// Saves the session's subscriptions (a persistent session's); the session ends
    /// when the store cannot.
    async fn save_subscriptions(&self, outbound: &Outbound) -> Result<(), End> {
        let saved = self
            .state
            .mqtt_sessions
            .keep(self.kept, outbound.filters())
            .await;
        saved.map_err(|error| {
            tracing::error!(%error, "cannot save an MQTT session");
            End::Refused(0x80, "the session store is unavailable".to_string())
        })
    }

    /// Sends the device the commands its subscriptions match, as many as its window
    /// has room for.
    async fn deliver<T: Transport>(
        &self,
        io: &mut T,
        outbound: &mut Outbound,
        info: &crate::ingress::sessions::SessionInfo,
    ) -> Result<(), End> {
        let (Some(downlink), Some(session)) = (&self.state.downlink, self.commands) else {
            return Ok(());
        };
        let device = &self.identity.device_id;
        let rules = self.state.rules();
        let sending = outbound.take(downlink, session, &rules, self.identity, self.version);
        if !sending.bytes.is_empty() && io.send(&sending.bytes).await.is_err() {
            return Err(End::Closed);
        }
        info.commands
            .fetch_add(sending.sent, std::sync::atomic::Ordering::Relaxed);
        downlink.done(device, sending.done).await;
        for id in sending.denied {
            tracing::info!(%device, command = %id, "command refused by the policy");
            downlink.reply(device, &id, "denied", None).await;
        }
        Ok(())
    }

    /// Admits each publish, runs the admitted ones as one batch, and answers each in
    /// arrival order.
    async fn publish<T: Transport>(&self, io: &mut T, batch: Vec<Publish>) -> Result<(), End> {
        let started = std::time::Instant::now();
        let rules = self.state.rules();
        let limit = self.state.pipeline.max_payload_bytes();
        // Per publish: its packet id and QoS, and its refusal or its place in `messages`
        // (none for a command reply, which goes to the broker instead).
        let mut answers: Vec<(u16, u8, Result<Option<usize>, ApiError>)> =
            Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let device = &self.identity.device_id;
        for publish in batch {
            let (pkid, qos) = (publish.pkid, publish.qos);
            let answer = match &self.state.downlink {
                Some(downlink) if publish.topic == downlink.reply_topic(device) => {
                    let size = publish.payload.len();
                    match admit_reply(&rules, self.identity, &publish.topic, size) {
                        Ok(()) => {
                            downlink
                                .publish_raw_reply(device, publish.payload.to_vec())
                                .await;
                            Ok(None)
                        }
                        Err(error) => Err(error),
                    }
                }
                _ => admit(&rules, self.identity, limit, vec![admitted(publish)], false).map(
                    |mut admitted| {
                        messages.append(&mut admitted);
                        Some(messages.len() - 1)
                    },
                ),
            };
            // A refusal that ends the connection (any, in 3.1.1; 0x95 in 5.0) ends the
            // batch: what came after it is neither stored nor acknowledged, and the
            // client sends it again.
            let closes = answer
                .as_ref()
                .err()
                .is_some_and(|error| self.version == Version::V4 || reason_of(error).0 == 0x95);
            answers.push((pkid, qos, answer));
            if closes {
                break;
            }
        }
        // 3.1.1 cannot say "later": while the spool is full, the batch waits (nothing more
        // is read), for at most the keep-alive's span; then the connection is closed.
        let hold_until = std::time::Instant::now() + self.idle;
        let reports = loop {
            if messages.is_empty() {
                break Ok(Vec::new());
            }
            match self.state.pipeline.process(messages.clone(), false).await {
                Ok(reports) => break Ok(reports),
                Err(StoreError::Spool(SpoolError::Full { .. }))
                    if self.version == Version::V4 && std::time::Instant::now() < hold_until =>
                {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => break Err(reason_of(&ApiError::from(error))),
            }
        };
        let mut out = BytesMut::new();
        for (pkid, qos, answer) in answers {
            let refusal = match (&answer, &reports) {
                (Err(error), _) => Some(reason_of(error)),
                (Ok(None), _) => None,
                (Ok(Some(index)), Ok(reports)) => match reports.get(*index) {
                    Some(report) if report.status == Status::Rejected => {
                        let why = report
                            .error
                            .as_ref()
                            .map_or_else(|| "rejected".to_string(), |e| e.message.clone());
                        Some((0x83, why))
                    }
                    _ => None,
                },
                (Ok(_), Err(refusal)) => Some(refusal.clone()),
            };
            match (refusal, self.version) {
                (Some((reason, why)), Version::V4) => {
                    crate::metrics::METRICS.mqtt_publish(&format!("{reason:#04x}"), 1);
                    let _ = io.send(&out).await;
                    return Err(End::Refused(reason, why));
                }
                // Not a PUBACK code: the connection ends, after the acks before it.
                (Some((0x95, why)), Version::V5) => {
                    crate::metrics::METRICS.mqtt_publish("0x95", 1);
                    let _ = io.send(&out).await;
                    return Err(End::Refused(0x95, why));
                }
                (Some((reason, why)), Version::V5) => {
                    crate::metrics::METRICS.mqtt_publish(&format!("{reason:#04x}"), 1);
                    if qos == 1 {
                        out.extend_from_slice(&codec::puback(
                            self.version,
                            pkid,
                            reason,
                            Some(&why),
                        ));
                    }
                }
                (None, _) => {
                    crate::metrics::METRICS.mqtt_publish("accepted", 1);
                    if qos == 1 {
                        out.extend_from_slice(&codec::puback(self.version, pkid, 0, None));
                    }
                }
            }
        }
        if !out.is_empty() && io.send(&out).await.is_err() {
            return Err(End::Closed);
        }
        crate::metrics::METRICS
            .mqtt_puback_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The MQTT 5 reason code and string for a refusal.
fn reason_of(error: &ApiError) -> (u8, String) {
    let code = match error {
        ApiError::Forbidden { .. } | ApiError::Reserved { .. } | ApiError::Unauthorized(_) => 0x87,
        ApiError::TooLarge(_) => 0x95,
        ApiError::RateLimited { .. } => 0x97,
        ApiError::Unavailable { .. } => 0x97,
        ApiError::Plugin { .. } => 0x83,
        ApiError::BadRequest(message) if message.starts_with("topic") => 0x90,
        ApiError::BadRequest(_) => 0x99,
    };
    (code, error.message())
}
