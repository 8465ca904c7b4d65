//! MQTT 3.1.1 and 5.0 devices, so that device code written for AWS IoT Core keeps
//! working with only its endpoint, port and CA changed:
//!
//! - over TLS on `[mqtt] listen` (8883 by convention; plain TCP on loopback only), the
//!   device named by its client certificate exactly as for HTTPS;
//! - over TLS on the device listener, chosen by ALPN as IoT Core does on 443
//!   (`x-amzn-mqtt-ca` or `mqtt`; `h2` and `http/1.1` get the HTTP API);
//! - over WebSocket at `GET /mqtt` (subprotocol `mqtt`) on the device listener, on by
//!   default: authenticated by client certificate, a bearer header, or the token as the
//!   MQTT password; without `[auth]` the client id names the device.
//!
//! - [`codec`]: packets in and out (rumqttc's `mqttbytes`, and why);
//! - [`connection`]: one connection from CONNECT to its end (who the client is, the
//!   CONNACK, the saved session, the last will);
//! - [`session`]: the connected session: publishes through the admission step and the
//!   pipeline, PUBACK once durable, subscriptions;
//! - [`answer`]: a refusal, or the gateway's reason to end a session, as a reason code;
//! - [`commands`]: a session's subscriptions and the downlink's commands sent on them;
//! - [`saved`]: sessions kept between connections, on disk;
//! - [`clients`]: a client id held by one connection at a time.

pub mod answer;
pub mod clients;
pub mod codec;
pub mod commands;
pub mod connection;
pub mod saved;
pub mod session;

use std::io;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Credential, PeerIdentity};
use crate::config::{Config, MqttConfig};
use crate::ingress::guard::Guard;
use crate::ingress::mqtt::connection::{Credentials, Limits, Stream, Transport};
use crate::ingress::sessions::RemoteAddr;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;

/// The WebSocket subprotocol of MQTT.
pub const SUBPROTOCOL: &str = "mqtt";
/// ALPN names that select MQTT on a TLS port: IoT Core's, and the standard one.
pub const ALPN: [&[u8]; 2] = [b"x-amzn-mqtt-ca", b"mqtt"];
/// An MQTT connection idle this long is closed by the listener: past IoT Core's longest
/// keep-alive (1200 s) times 1.5, so that only the session's keep-alive decides.
const MQTT_IDLE: Duration = Duration::from_secs(1800);
/// How often a WebSocket carrying MQTT is pinged, so that a quiet device's connection
/// does not count as idle to the HTTP listener.
const WS_PING: Duration = Duration::from_secs(30);

/// The limits of `config`.
pub fn limits(config: &MqttConfig) -> Limits {
    Limits {
        window: config.window,
        max_packet_bytes: config.max_packet_bytes,
        connect_timeout: Duration::from_secs(config.connect_timeout_secs),
        session_expiry_secs: config.session_expiry_secs,
    }
}

/// `GET /mqtt`: upgrades to a WebSocket carrying MQTT; the client authenticates in its
/// CONNECT (or with this request's bearer header, or its connection's certificate).
pub async fn upgrade(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    remote: Option<Extension<RemoteAddr>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, Refusal> {
    let rules = state.rules();
    if !rules.mqtt.websocket {
        return Err(Refusal::BadRequest(
            "MQTT over WebSocket is turned off (mqtt.websocket)".to_string(),
        ));
    }
    let offered = headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !offered.split(',').any(|p| p.trim() == SUBPROTOCOL) {
        return Err(Refusal::BadRequest(format!(
            "GET /mqtt needs the WebSocket subprotocol `{SUBPROTOCOL}`, offered `{offered}`"
        )));
    }
    let limits = limits(&rules.mqtt);
    let credentials = Credentials {
        credential: crate::ingress::device::credential(peer.map(|Extension(peer)| peer), &headers)?,
        remote: remote.map(|Extension(RemoteAddr(address))| address),
    };
    Ok(ws
        .protocols([SUBPROTOCOL])
        .max_message_size(limits.max_packet_bytes + 16)
        .on_upgrade(move |socket| {
            let transport = WsTransport {
                socket,
                ping: tokio::time::interval_at(tokio::time::Instant::now() + WS_PING, WS_PING),
            };
            connection::run(transport, state, credentials, limits, "mqtt-ws")
        })
        .into_response())
}

/// MQTT in WebSocket binary frames (a packet may span frames, and a frame hold several).
struct WsTransport {
    socket: WebSocket,
    ping: tokio::time::Interval,
}

impl Transport for WsTransport {
    async fn read_more(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        loop {
            tokio::select! {
                frame = self.socket.recv() => match frame {
                    None | Some(Ok(Frame::Close(_))) => return Ok(0),
                    Some(Err(error)) => return Err(io::Error::other(error)),
                    Some(Ok(Frame::Binary(bytes))) if !bytes.is_empty() => {
                        buffer.extend_from_slice(&bytes);
                        return Ok(bytes.len());
                    }
                    Some(Ok(Frame::Text(_))) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "MQTT over WebSocket is binary frames"));
                    }
                    Some(Ok(_)) => {}
                },
                _ = self.ping.tick() => {
                    self.socket.send(Frame::Ping(Default::default())).await.map_err(io::Error::other)?;
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.socket
            .send(Frame::Binary(bytes.to_vec().into()))
            .await
            .map_err(io::Error::other)
    }
}

/// Runs MQTT on a TLS connection the device listener accepted (ALPN chose MQTT).
pub async fn serve_tls<S>(
    stream: S,
    peer: PeerIdentity,
    remote: std::net::SocketAddr,
    guard: &Guard,
    state: AppState,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let limits = limits(&state.rules().mqtt);
    let credentials = Credentials {
        credential: Credential {
            certificate: peer,
            ..Credential::default()
        },
        remote: Some(remote),
    };
    let stream = Stream(guard.watch_idle(stream, MQTT_IDLE));
    connection::run(stream, state, credentials, limits, "mqtt").await;
}

/// Binds `[mqtt] listen`, if set, and prints `sluice: mqtt on <scheme>://<address>`
/// (`mqtts` with `[server.tls]`).
pub async fn bind(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    let Some(listen) = config.mqtt.listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (mqtt)"))?;
    let address = listener.local_addr()?;
    let scheme = if config.server.tls.is_some() {
        "mqtts"
    } else {
        "mqtt"
    };
    println!("sluice: mqtt on {scheme}://{address}");
    tracing::info!(%address, scheme, "MQTT listening");
    Ok(Some(listener))
}

/// Serves MQTT on `listener` until the gateway stops: TLS with the device listener's
/// certificate (and client certificates) when `[server.tls]` is set, else plain TCP
/// (validated to be loopback).
pub async fn serve(listener: Option<TcpListener>, config: &Config, state: AppState) {
    let Some(listener) = listener else {
        return;
    };
    let live = state.live.clone();
    let guard = Guard::new("mqtt", &config.server);
    let mut shutdown = state.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let Some(slot) = guard.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let guard = guard.clone();
        let tls = live.tls.load_full();
        tokio::spawn(async move {
            let _slot = slot;
            let limits = limits(&state.rules().mqtt);
            match tls {
                Some(acceptor) => {
                    let handshake = TlsAcceptor::clone(&acceptor).accept(stream);
                    let Some(stream) = guard.handshake(peer, handshake).await else {
                        return;
                    };
                    let identity = state
                        .live
                        .peer_identity(stream.get_ref().1.peer_certificates());
                    let credentials = Credentials {
                        credential: Credential {
                            certificate: identity,
                            ..Credential::default()
                        },
                        remote: Some(peer),
                    };
                    let stream = Stream(guard.watch_idle(stream, MQTT_IDLE));
                    // Boxed, each branch: the task is then as big as the branch it takes,
                    // not the larger (TLS) one for every connection.
                    Box::pin(connection::run(stream, state, credentials, limits, "mqtt")).await;
                }
                None => {
                    let stream = Stream(guard.watch_idle(stream, MQTT_IDLE));
                    let credentials = Credentials {
                        remote: Some(peer),
                        ..Credentials::default()
                    };
                    Box::pin(connection::run(stream, state, credentials, limits, "mqtt")).await;
                }
            }
        });
    }
}

/// Whether a TLS connection's negotiated protocol is MQTT.
pub fn is_mqtt_alpn(protocol: Option<&[u8]>) -> bool {
    protocol.is_some_and(|p| ALPN.contains(&p))
}
