//! MQTT 3.1.1 and 5.0 devices, so that device code written for AWS IoT Core keeps
//! working with only its endpoint, port and CA changed:
//!
//! - over TLS on `[mqtt] listen` (8883 by convention; plain TCP on loopback only), the
//!   device named by its client certificate exactly as for HTTPS;
//! - over TLS on the device listener, chosen by ALPN as IoT Core does on 443
//!   (`x-amzn-mqtt-ca` or `mqtt`; `h2`, `http/1.1` and `x-amzn-http-ca` get the HTTP API);
//! - over WebSocket at `GET /mqtt` (subprotocol `mqtt`) on the device listener, on by
//!   default: authenticated by client certificate, a bearer header, or the token as the
//!   MQTT password; without `[auth]` the client id names the device.
//!
//! - [`codec`]: packets in and out (rumqttc's `mqttbytes`, and why);
//! - [`connection`]: one connection from CONNECT to its end (who the client is, the
//!   CONNACK, the session at IoT Core, the last will);
//! - [`session`]: the connected session: publishes through the admission step and the
//!   pipeline, PUBACK once durable, subscriptions;
//! - [`answer`]: a refusal, or the gateway's reason to end a session, as a reason code;
//! - [`outbound`]: a session's subscriptions, and the messages on their way to the
//!   device;
//! - [`relay`]: the device's own session at IoT Core, seen from its connection
//!   (subscriptions, requests on reserved topics, messages for the device);
//! - [`clients`]: a client id held by one connection at a time;
//! - [`transport`]: what carries the bytes (a stream, WebSocket frames).

pub mod answer;
pub mod clients;
pub mod codec;
pub mod connection;
pub mod outbound;
pub mod relay;
pub mod session;
pub mod transport;

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;

use crate::auth::{Credential, PeerIdentity};
use crate::config::MqttConfig;
use crate::ingress::accept::Connection;
use crate::ingress::guard::{Guard, ReadAllowance};
use crate::ingress::mqtt::connection::Credentials;
use crate::ingress::mqtt::session::Limits;
use crate::ingress::mqtt::transport::{Stream, WsTransport};
use crate::ingress::sessions::RemoteAddr;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;

/// The WebSocket subprotocol of MQTT.
pub const SUBPROTOCOL: &str = "mqtt";
/// An MQTT connection idle this long is closed by the listener: past IoT Core's longest
/// keep-alive (1200 s) times 1.5, so that only the session's keep-alive decides.
const MQTT_IDLE: Duration = Duration::from_secs(1800);
/// How often a WebSocket carrying MQTT is pinged, so that a quiet device's connection
/// does not count as idle to the HTTP listener.
const WS_PING: Duration = Duration::from_secs(30);
/// What MQTT over WebSocket may read before its CONNECT: the largest CONNECT, and what
/// one read of the WebSocket may take beyond it (tungstenite's read buffer, 128 KiB, of
/// a client that sends its first packets right behind the CONNECT). Past it the
/// connection is closed; without it a client could make the gateway buffer a frame of
/// the full packet size before saying who it is.
const WS_BEFORE_CONNECT_BYTES: usize = connection::MAX_CONNECT_BYTES + 128 * 1024;

/// The limits of `config`.
pub fn limits(config: &MqttConfig) -> Limits {
    Limits {
        window: config.window,
        max_packet_bytes: config.max_packet_bytes,
        connect_timeout: Duration::from_secs(config.connect_timeout_secs),
        session_expiry_secs: config.session_expiry_secs,
        v311_plugin_failure: config.v311_plugin_failure,
    }
}

/// `GET /mqtt`: upgrades to a WebSocket carrying MQTT; the client authenticates in its
/// CONNECT (or with this request's bearer header, or its connection's certificate).
pub async fn upgrade(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    remote: Option<Extension<RemoteAddr>>,
    allowance: Option<Extension<ReadAllowance>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
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
        credential: crate::ingress::device::credential(
            peer.map(|Extension(peer)| peer),
            &headers,
            &uri,
            &rules,
        )?,
        remote: remote.map(|Extension(RemoteAddr(address))| address),
    };
    let allowance = allowance.map(|Extension(allowance)| allowance);
    if let Some(allowance) = &allowance {
        allowance.limit(WS_BEFORE_CONNECT_BYTES);
    }
    Ok(ws
        .protocols([SUBPROTOCOL])
        .max_message_size(limits.max_packet_bytes + 16)
        .on_upgrade(move |socket| {
            let transport = WsTransport {
                socket,
                ping: tokio::time::interval_at(tokio::time::Instant::now() + WS_PING, WS_PING),
                allowance,
            };
            connection::run(transport, state, credentials, limits, "mqtt-ws")
        })
        .into_response())
}

/// Runs MQTT on a connection the accept path handed over: `[mqtt] listen`, or the
/// device listener where ALPN chose MQTT. The connection's place under the limit is
/// given back when the session ends. (Made before it runs: a future holds only the
/// session's own future, no second copy of what it was made from.)
pub fn serve(
    connection: Connection,
    guard: &Guard,
    state: AppState,
) -> impl Future<Output = ()> + Send + 'static {
    let limits = limits(&state.rules().mqtt);
    let credentials = Credentials {
        credential: Credential {
            certificate: connection.peer,
            ..Credential::default()
        },
        remote: Some(connection.remote),
    };
    let slot = connection.slot;
    let stream = Stream(guard.watch_idle(connection.stream, MQTT_IDLE));
    connection::run(stream, state, credentials, limits, "mqtt").map(move |()| drop(slot))
}
