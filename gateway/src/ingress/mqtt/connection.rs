//! One MQTT connection from its first byte to its end, whatever carries it (TLS, TCP on
//! loopback, a WebSocket): the CONNECT and who sent it, the CONNACK, the session
//! ([`super::session`]) inside the device session shell, and what its end leaves behind
//! (the session at IoT Core, the DISCONNECT, the last will).

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;

use crate::auth::{AuthError, Credential, Identity};
use crate::ingress::admit::admit;
use crate::ingress::mqtt::codec::{self, CodecError, ConnAckCode, Connect, Publish, Version};
use crate::ingress::mqtt::outbound::Outbound;
use crate::ingress::mqtt::session::{End, Limits, Session, submission};
use crate::ingress::mqtt::transport::Transport;
use crate::ingress::session::{DeviceSession, Ended};
use crate::ingress::state::AppState;
use crate::ingress::verdict::{Verdict, verdict};

/// The largest CONNECT taken: before a client is authenticated it may not make the
/// gateway hold more (a CONNECT carries ids, credentials and a will).
pub const MAX_CONNECT_BYTES: usize = 64 * 1024;

/// IoT Core's keep-alive range, in seconds: a client asking for less gets the least, for
/// none or more the most.
const KEEP_ALIVE_SECS: (u16, u16) = (30, 1200);

/// What the connection presents besides its CONNECT.
#[derive(Default)]
pub struct Credentials {
    /// The connection's client certificate and (over WebSocket) the upgrade request's
    /// bearer token; the CONNECT adds its password and client id.
    pub credential: Credential,
    /// The address the connection comes from.
    pub remote: Option<std::net::SocketAddr>,
}

/// Runs one connection to its end.
///
/// In three steps, the first and last boxed: an idle connection's task holds only what
/// an open session needs (the CONNECT's handling, the will and the close are not kept
/// for its life; BENCHMARKS.md, memory per idle MQTT connection). The credentials are
/// boxed before the future is made for the same reason: an argument that an async
/// function moves on still takes its room in that function's future.
pub fn run<T: Transport>(
    io: T,
    state: AppState,
    credentials: Credentials,
    limits: Limits,
    protocol: &'static str,
) -> impl Future<Output = ()> + Send {
    run_boxed(io, state, Box::new(credentials), limits, protocol)
}

async fn run_boxed<T: Transport>(
    mut io: T,
    state: AppState,
    credentials: Box<Credentials>,
    limits: Limits,
    protocol: &'static str,
) {
    // The open session's own state lives in one box, borrowed from here on: a value
    // moved out of a future's local is still kept in the future (rustc keeps its room).
    let Some(mut opened) = Box::pin(open(&mut io, &state, credentials, limits, protocol)).await
    else {
        return;
    };
    // A debug span: at the default level none is kept for the session's life (it cost an
    // idle connection about 2 KB); the session's own log lines name the device.
    let span = tracing::debug_span!("mqtt_session", device = %opened.identity.device_id, protocol);
    let mut outbound = Outbound::new(opened.settings.window);
    let buffer = std::mem::take(&mut opened.buffer);
    let Opened {
        identity,
        device,
        settings,
        ..
    } = &mut *opened;
    let session = Session {
        state: &state,
        identity,
        version: settings.version,
        window: settings.window,
        limits,
        idle: settings.idle,
        upstream_spec: settings.upstream_spec.take(),
        client_max_packet: settings.client_max_packet,
        waits_for_room: Default::default(),
    };
    let end = tracing::Instrument::instrument(
        session.serve(&mut io, buffer, device, &mut outbound),
        span,
    )
    .await;
    state
        .mqtt_clients
        .unregister(&opened.client_id, opened.registration);
    Box::pin(finish(&mut io, &state, opened, end)).await;
}

/// What a session's settings are once its CONNECT is accepted.
struct Settings {
    version: Version,
    window: u16,
    idle: Duration,
    upstream_spec: Option<Box<crate::upstream::Spec>>,
    client_max_packet: Option<u32>,
}

/// A connection whose CONNECT was accepted and answered.
struct Opened {
    identity: Identity,
    client_id: String,
    will: Option<Publish>,
    /// Its hold on the client id (`MqttClients::register`).
    registration: u64,
    device: DeviceSession,
    /// What the client sent after its CONNECT.
    buffer: BytesMut,
    settings: Settings,
}

/// Reads the CONNECT, finds who sent it, opens the device's session at IoT Core when it
/// keeps one, and answers with the CONNACK; `None` when the connection ends there.
async fn open<T: Transport>(
    io: &mut T,
    state: &AppState,
    credentials: Box<Credentials>,
    limits: Limits,
    protocol: &'static str,
) -> Option<Box<Opened>> {
    let mut buffer = BytesMut::new();
    let connect_limits = Limits {
        max_packet_bytes: limits.max_packet_bytes.min(MAX_CONNECT_BYTES),
        ..limits
    };
    let connect = match tokio::time::timeout(
        limits.connect_timeout,
        read_connect(io, &mut buffer, connect_limits),
    )
    .await
    {
        Ok(Ok(connect)) => {
            io.connected();
            connect
        }
        Ok(Err(Some(error))) => {
            tracing::debug!(%error, "MQTT connection refused before CONNECT");
            if let CodecError::Protocol(_) = error {
                let ack = codec::connack(
                    Version::V4,
                    ConnAckCode::BadProtocol,
                    codec::Accepted::default(),
                    None,
                    None,
                );
                let _ = io.send(&ack).await;
            }
            crate::metrics::METRICS.refusal("mqtt_bad_connect");
            return None;
        }
        Ok(Err(None)) | Err(_) => return None,
    };
    let mut connect = connect;
    let version = connect.version;
    let asked_id = connect.client_id.clone();
    let client_max_packet = connect.max_packet_size;
    let refuse = async |io: &mut T, code: ConnAckCode, why: String| {
        tracing::info!(client_id = %asked_id, why = %why, "MQTT CONNECT refused");
        crate::metrics::METRICS.refusal("mqtt_connect_refused");
        let ack = codec::connack(
            version,
            code,
            codec::Accepted::default(),
            Some(&why),
            client_max_packet,
        );
        let _ = io.send(&ack).await;
        None
    };
    if let Some(method) = &connect.auth_method {
        let why = format!(
            "enhanced authentication (method `{method}`) is not supported; send the token as the password"
        );
        return refuse(io, ConnAckCode::BadAuthMethod, why).await;
    }
    // An empty client id gets one from the gateway (MQTT 5: Assigned Client Identifier),
    // as at IoT Core; 3.1.1 allows that only with a clean session.
    let assigned = connect.client_id.is_empty();
    if assigned && version == Version::V4 && !connect.clean {
        let why = "an empty client id needs a clean session".to_string();
        return refuse(io, ConnAckCode::BadClientId, why).await;
    }
    let Credentials { credential, remote } = *credentials;
    let identity = match identify(state, credential, &mut connect) {
        Ok(identity) => identity,
        Err((code, why)) => return refuse(io, code, why).await,
    };
    if let Some(will) = &connect.will
        && !state.rules().policy.may_publish(&identity, &will.topic)
    {
        let why = format!("the last will's topic `{}` is not allowed", will.topic);
        return refuse(io, ConnAckCode::NotAuthorized, why).await;
    }
    let named = state
        .rules()
        .policy
        .names_client_id(&identity, &connect.client_id);
    let kicked = match state
        .mqtt_clients
        .register(&connect.client_id, &identity.device_id, named)
    {
        Ok(kicked) => kicked,
        Err(owner) => {
            let why = format!(
                "the client id `{}` is device `{owner}`'s; only a grant naming it lets another device use it",
                connect.client_id
            );
            return refuse(io, ConnAckCode::BadClientId, why).await;
        }
    };
    let asked_expiry = match version {
        Version::V4 if connect.clean => 0,
        Version::V4 => limits.session_expiry_secs,
        Version::V5 => connect.session_expiry.unwrap_or(0),
    };
    let expiry = asked_expiry.min(limits.session_expiry_secs);
    let window = limits
        .window
        .min(connect.receive_maximum.unwrap_or(u16::MAX))
        .max(1);
    // The device's session at IoT Core: opened now for a device that keeps a session
    // (IoT Core holds it, and says whether it had it), otherwise when first needed.
    // A client id whose session IoT Core lost after its device was told it went on
    // starts clean, and hears so.
    let forgotten = state
        .upstream
        .as_ref()
        .is_some_and(|endpoint| endpoint.take_forgotten(&connect.client_id));
    let upstream_spec = state.upstream.as_ref().map(|_| {
        Box::new(crate::upstream::Spec {
            device: identity.device_id.clone(),
            client_id: connect.client_id.clone(),
            clean_start: connect.clean || forgotten,
            session_expiry_secs: expiry,
            will: connect.will.as_ref().map(codec::mqtt5_will),
            receive_maximum: window,
            subscriptions: Vec::new(),
        })
    });
    // A session lives at IoT Core, which every instance shares, or nowhere: without
    // `[upstream]` a device receives nothing, so there is nothing to keep.
    let mut upstream = None;
    let mut session_present = false;
    if let (Some(endpoint), Some(spec)) = (&state.upstream, &upstream_spec)
        && expiry > 0
    {
        let session = endpoint.open(crate::upstream::Spec::clone(spec));
        let answer = if endpoint.reachable() {
            session
                .connected_within(crate::upstream::CONNACK_WAIT)
                .await
        } else {
            None
        };
        session_present = match answer {
            Some(present) => present,
            // IoT Core did not answer in time: the device is told its session goes on
            // (so that it keeps and sends again what it has not had acknowledged); if
            // IoT Core then says it had none, the device is told to reconnect and
            // hears the truth.
            None if !spec.clean_start => session.promise_present(),
            None => false,
        };
        upstream = Some(session);
    }
    let keep_alive = match connect.keep_alive {
        0 => KEEP_ALIVE_SECS.1,
        secs => secs.clamp(KEEP_ALIVE_SECS.0, KEEP_ALIVE_SECS.1),
    };
    let accepted = codec::Accepted {
        receive_maximum: limits.window,
        max_packet: limits.max_packet_bytes,
        keep_alive,
        session_present,
        session_expiry: (version == Version::V5 && asked_expiry > expiry).then_some(expiry),
        assigned_client_id: assigned.then(|| connect.client_id.clone()),
        shared_subscriptions: state.upstream.is_some(),
    };
    let ack = codec::connack(version, ConnAckCode::Accepted, accepted, None, None);
    if io.send(&ack).await.is_err() {
        state.mqtt_clients.unregister(&connect.client_id, kicked.id);
        return None;
    }
    let mut device = DeviceSession::open(
        state,
        &identity,
        protocol,
        usize::from(window),
        remote,
        Some(kicked.receiver),
    );
    if let Some(upstream) = upstream {
        device.attach_upstream(upstream);
    }
    Some(Box::new(Opened {
        identity,
        client_id: connect.client_id,
        will: connect.will,
        registration: kicked.id,
        device,
        buffer,
        settings: Settings {
            version,
            window,
            idle: Duration::from_millis(u64::from(keep_alive) * 1500),
            upstream_spec,
            client_max_packet,
        },
    }))
}

/// What a session's end leaves behind: the DISCONNECT that says why the gateway ended
/// it (5.0), the last will, the session at IoT Core closed and the session unlisted.
async fn finish<T: Transport>(io: &mut T, state: &AppState, opened: Box<Opened>, end: End) {
    let Opened {
        identity,
        will: last_will,
        device,
        settings: Settings { version, .. },
        ..
    } = *opened;
    let identity = &identity;
    // The will is for the device's abnormal end: a dropped connection, a protocol error,
    // a takeover (MQTT 5 §3.1.4). Not for the gateway's own decisions: its shutdown, or a
    // credential it found expired or revoked.
    let will = match &end {
        End::Disconnected { with_will } => *with_will,
        End::Ended(Ended::ShuttingDown | Ended::Expired(_) | Ended::Revoked) => false,
        End::Closed | End::Refused(..) | End::Ended(Ended::TakenOver | Ended::UpstreamLost) => true,
    };
    let refused = match end {
        End::Refused(reason, why) => Some((reason, why)),
        End::Ended(ended) => Some((
            crate::ingress::mqtt::answer::disconnect_reason(&ended),
            ended_in_words(&ended),
        )),
        End::Disconnected { .. } | End::Closed => None,
    };
    if let Some((reason, why)) = refused {
        tracing::info!(device = %identity.device_id, reason = format!("{:#04x}", reason as u8), why = %why, "MQTT connection closed by the gateway");
        if version == Version::V5 {
            let reference = state.rules().mqtt.server_reference.clone();
            let packet = match reference {
                Some(reference) if reason == codec::DisconnectReasonCode::ServerShuttingDown => {
                    codec::disconnect_to(&reference)
                }
                _ => codec::disconnect(reason),
            };
            let _ = io.send(&packet).await;
        }
    }
    // With a session at IoT Core, IoT Core publishes the will (the session's connection
    // is dropped rather than closed), if the policy in force now still grants its topic
    // (a reload may have taken it away since the CONNECT); otherwise the gateway does,
    // through its way, which checks it the same. Before the session is closed: once it
    // is gone from `GET /admin/devices`, its will is stored.
    let will = match (will, last_will, &device.upstream) {
        (true, Some(publish), None) => {
            publish_will(state, identity, publish).await;
            true
        }
        (true, Some(publish), Some(_)) => {
            let granted = state.rules().policy.may_publish(identity, &publish.topic);
            if !granted {
                will_refused(
                    identity,
                    &publish.topic,
                    "the policy no longer grants its topic",
                );
            }
            granted
        }
        (will, _, _) => will,
    };
    device.close(will).await;
}

/// Why the gateway ended a session, for its log.
fn ended_in_words(ended: &Ended) -> String {
    match ended {
        Ended::Expired(error) => error.to_string(),
        Ended::Revoked => AuthError::CertificateRevoked.to_string(),
        Ended::TakenOver => "another connection took over the client id".to_string(),
        Ended::UpstreamLost => {
            "the device's session at IoT Core was closed (another connection may have taken it over); connect again".to_string()
        }
        Ended::ShuttingDown => "the gateway is shutting down".to_string(),
    }
}

/// Sends a connection's last will through the pipeline, as the device's publish.
async fn publish_will(state: &AppState, identity: &Identity, will: Publish) {
    let topic = will.topic.clone();
    let limit = state.pipeline.max_payload_bytes();
    let outcome = match admit(
        &state.rules(),
        identity,
        limit,
        vec![submission(will)],
        false,
    ) {
        Ok(messages) => match verdict(state.pipeline.process(messages, false).await) {
            Verdict::Accepted(_) => Ok(()),
            Verdict::Refused(refusal) => Err(refusal.message()),
        },
        Err(refusal) => Err(refusal.message()),
    };
    match outcome {
        Ok(()) => {
            tracing::info!(device = %identity.device_id, %topic, "MQTT last will published");
            crate::metrics::METRICS.mqtt_publish("will", 1);
        }
        Err(why) => will_refused(identity, &topic, &why),
    }
}

/// Logs and counts a last will that does not go out, and why.
fn will_refused(identity: &Identity, topic: &str, why: &str) {
    tracing::warn!(device = %identity.device_id, %topic, %why, "MQTT last will refused");
    crate::metrics::METRICS.mqtt_publish("will_refused", 1);
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
                codec::Incoming::Connect(connect) => Ok(connect),
                _ => Err(Some(CodecError::Malformed(
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

/// Who the client is. With `[auth]`: its certificate, else a token (a bearer header over
/// WebSocket, or the MQTT password); the client id must be its device id. Without
/// `[auth]` the client id names the device, as `x-device-id` does over HTTP. An empty
/// client id is given one: the device id with `[auth]`, else a new unique one.
fn identify(
    state: &AppState,
    mut credential: Credential,
    connect: &mut Connect,
) -> Result<Identity, (ConnAckCode, String)> {
    let rules = state.rules();
    if connect.client_id.is_empty() && !rules.auth.required() {
        connect.client_id = format!("sluice-{}", uuid::Uuid::now_v7().simple());
    }
    let client_id = connect.client_id.clone();
    if client_id.len() > crate::auth::MAX_DEVICE_ID_LEN {
        return Err((
            ConnAckCode::BadClientId,
            format!(
                "the client id is over {} bytes",
                crate::auth::MAX_DEVICE_ID_LEN
            ),
        ));
    }
    credential.claimed_id = Some(client_id.clone());
    if credential.token.is_none() {
        // The AWS SDKs put `?SDK=…&Version=…` after the user name. With `[auth.jwt]` a
        // custom authorizer's token may be there too (`?x-amz-customauthorizer-name=…&
        // token=…`, as IoT Core takes it); else the password is the token.
        let in_user_name = rules.auth.token_key_name().and_then(|name| {
            let (_, query) = connect.username.as_deref()?.split_once('?')?;
            crate::ingress::device::query_value(query, name)
        });
        credential.token = in_user_name.or_else(|| connect.password.clone());
    }
    let identity = rules
        .auth
        .authenticate(credential)
        .map_err(|error| match error {
            AuthError::BadDeviceId(why) if !rules.auth.required() => {
                (ConnAckCode::BadClientId, format!("client id: {why}"))
            }
            AuthError::MissingCredentials => (ConnAckCode::NotAuthorized, error.to_string()),
            other => (ConnAckCode::BadCredentials, other.to_string()),
        })?;
    if client_id.is_empty() {
        connect.client_id.clone_from(&identity.device_id);
    } else if rules.auth.required() && !rules.policy.may_use_client_id(&identity, &client_id) {
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

#[cfg(test)]
mod tests {
    /// Bytes fed as a socket would feed them, three at a time (every packet split across
    /// reads): a 3.1.1 CONNECT, a QoS 1 PUBLISH and a DISCONNECT get the CONNACK and the
    /// PUBACK (sent once the message is stored).
    #[tokio::test]
    async fn a_connection_fed_in_small_reads_is_answered_like_a_socket() {
        let fixture = crate::testing::gateway("[routing]\ndefault_destination = \"local\"\n");
        let mut input = b"\x10\x12\x00\x04MQTT\x04\x02\x00\x3c\x00\x06reader".to_vec();
        input.extend_from_slice(b"\x32\x0b\x00\x03a/b\x00\x01{}xx");
        input.extend_from_slice(b"\xe0\x00");
        let sent = fixture.mqtt_connection(&input, 3).await;
        assert_eq!(sent, b"\x20\x02\x00\x00\x40\x02\x00\x01");
    }

    /// What an idle MQTT connection's task holds: the session's future, boxed per
    /// connection, is most of an idle connection's memory (BENCHMARKS.md: 5.3–5.5 KB in
    /// all, the target 6 KiB). It was 6.9 KB when the publish path, the CONNECT's handling
    /// and the will were kept in it for the session's life; it must stay small.
    #[tokio::test]
    async fn an_idle_sessions_future_stays_small() {
        let fixture = crate::testing::gateway("");
        let guard = crate::ingress::guard::Guard::new("mqtt", &Default::default());
        let (stream, _client) = tokio::io::duplex(64);
        let connection = crate::ingress::accept::Connection {
            stream: Box::new(stream),
            remote: "127.0.0.1:1883".parse().unwrap(),
            peer: Default::default(),
            protocol: crate::ingress::accept::Protocol::Mqtt,
            slot: guard.admit().expect("a slot"),
        };
        let session = crate::ingress::mqtt::serve(connection, &guard, fixture.state.clone());
        let size = std::mem::size_of_val(&session);
        assert!(size <= 2560, "an MQTT connection's future is {size} bytes");
    }
}
