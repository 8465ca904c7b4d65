//! WebSocket sessions: `GET /ws`, subprotocol `sluice.v1`.
//!
//! The device authenticates on the upgrade request exactly as on HTTP (client
//! certificate or bearer token); then it streams messages and the gateway acknowledges
//! each one by the id the device chose, once it is safe (spooled, or handed over on a
//! best-effort route), or refuses it with a reason. The session stays open through bad
//! frames and refusals.
//!
//! **Text frames** are JSON objects with a `type`:
//!
//! - device → gateway: `{"type": "publish", "id": "m-1", "topic": "…", "payload": <JSON>}`
//!   (or `"payload_base64"`; optional `"qos"`, `"content_type"`);
//! - gateway → device: `{"type": "welcome", "device", "window", "max_frame_bytes"}` first,
//!   then `{"type": "ack", "id", "message_id", "status", "credit"}` per message and
//!   `{"type": "error", "id", "code", "message"}` (plus `retry_after` for `rate_limited`).
//!
//! **Binary frames** are the compact form for constrained devices:
//!
//! - publish: `0x01`, flags (bit 0: QoS 1), id length (u8), id, topic length (u16, big
//!   endian), topic, payload (the rest);
//! - ack: `0x02`, status (0 accepted, 1 dropped, 2 dead-lettered), credit (u16, big
//!   endian), id length (u8), id;
//! - error: `0x03`, code length (u8), code, id length (u8), id, message (the rest, UTF-8).
//!
//! **Flow control.** The device may have `window` messages unacknowledged (the welcome
//! says how many; each ack carries the `credit` left). At the window the gateway stops
//! reading the socket until an ack frees room, so TCP slows a fast device down instead of
//! the gateway dropping it.
//!
//! **Keepalive and close codes.** The gateway pings every `ping_interval_secs`; a session
//! silent for `idle_timeout_secs` is closed with 4000 (`idle timeout`). A frame over
//! `max_frame_bytes` closes it with 1009, a protocol error with 1002, gateway shutdown
//! with 1001. A session ends when its credential does: 4001 when its token or
//! certificate expires, 4003 when a configuration reload revokes its certificate.
//! Messages already received are still processed and acknowledged first.
//!
//! **Commands.** With `[upstream]`, the session has its own session at IoT Core under
//! the device's id, subscribed to the command topics ([`crate::ingress::commands`]);
//! each message there comes as `{"type": "command", "id", "topic", "qos", "payload"…}`
//! and is acknowledged at IoT Core once the frame is written. A reply
//! (`{"type": "command_reply", "id", "status"?, "payload"?}`) goes to the command's
//! response topic or the reply topic, held to the policy like any publish: nothing
//! comes back once IoT Core has it, an error frame when it is refused.

mod frames;

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;

use crate::auth::Identity;
use crate::config::WebSocketConfig;
use crate::ingress::admit::{Submission, admit};
use crate::ingress::commands;
use crate::ingress::device::Device;
use crate::ingress::session::{DeviceSession, Ended};
use crate::ingress::state::AppState;
use crate::ingress::verdict::{Refusal, Verdict, verdict};
use frames::{Incoming, Publish, Reply, close, parse_binary, parse_incoming, text};

/// The subprotocol name.
pub const SUBPROTOCOL: &str = "sluice.v1";
/// Close code for a session idle past its timeout.
pub const CLOSE_IDLE: u16 = 4000;
/// Close code for a session whose token or certificate expired.
pub const CLOSE_EXPIRED: u16 = 4001;
/// Close code for a session whose certificate a reload revoked.
pub const CLOSE_REVOKED: u16 = 4003;
/// Bytes read from a session's socket at a time.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Bytes of outgoing frames collected before they are written.
const WRITE_BUFFER_BYTES: usize = 4 * 1024;
/// Longest message id a device may choose.
const MAX_ID_LEN: usize = 128;
/// QoS 1 commands IoT Core may have in flight to a session (each is acknowledged
/// there as soon as its frame is written).
const COMMANDS_IN_FLIGHT: u16 = 16;

/// `GET /ws`: the device (authenticated by [`Device`]), then the upgrade.
pub async fn upgrade(
    State(state): State<AppState>,
    device: Device,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, Refusal> {
    let Device {
        identity,
        rules,
        remote,
    } = device;
    let offered = headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    if let Some(offered) = offered
        && !offered.split(',').any(|p| p.trim() == SUBPROTOCOL)
    {
        return Err(Refusal::BadRequest(format!(
            "the WebSocket subprotocol must be `{SUBPROTOCOL}`, offered `{offered}`"
        )));
    }
    let max = rules.websocket.max_frame_bytes;
    Ok(ws
        // Small buffers: an idle session should cost little (tungstenite's defaults are
        // 128 KiB each way); they grow for large frames up to max_frame_bytes.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .protocols([SUBPROTOCOL])
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| {
            // The session outlives the upgrade request; it keeps its span (and request
            // id), so log records of its messages, plugins included, can be told apart.
            let span = tracing::info_span!(parent: &tracing::Span::current(), "ws_session", device = %identity.device_id);
            tracing::Instrument::instrument(session(socket, state, identity, remote), span)
        })
        .into_response())
}

/// Runs one publish through policy, plugins, routing and the spool; `bidirectional`:
/// the session receives commands (it takes part in command & control).
async fn handle(
    state: &AppState,
    identity: &Identity,
    publish: Publish,
    bidirectional: bool,
) -> Reply {
    let Publish {
        id,
        topic,
        payload,
        content_type,
        qos,
        binary,
    } = publish;
    if id.is_empty() || id.len() > MAX_ID_LEN {
        let refusal = Refusal::BadRequest(format!("the id must be 1 to {MAX_ID_LEN} bytes"));
        return Reply::of(id, binary, Verdict::Refused(refusal));
    }
    let publish = Submission {
        topic,
        payload,
        content_type,
        qos,
        attributes: vec![("ws.id".to_string(), id.clone())],
    };
    let limit = state.pipeline.max_payload_bytes();
    let messages = match admit(&state.rules(), identity, limit, vec![publish], false) {
        Ok(messages) => messages,
        Err(refusal) => return Reply::of(id, binary, Verdict::Refused(refusal)),
    };
    let outcome = state.pipeline.process(messages, bidirectional).await;
    Reply::of(id, binary, verdict(outcome))
}

/// The close frame for why the gateway ends a session.
fn close_for(ended: &Ended) -> Frame {
    match ended {
        Ended::Expired(_) => close(CLOSE_EXPIRED, "the credential expired"),
        Ended::Revoked => close(CLOSE_REVOKED, "the certificate was revoked"),
        Ended::TakenOver => close(1008, "another session took over"),
        Ended::UpstreamLost => close(1011, "the session at IoT Core was closed; connect again"),
        Ended::ShuttingDown => close(1001, "the gateway is shutting down"),
    }
}

async fn session(
    socket: WebSocket,
    state: AppState,
    identity: Identity,
    remote: Option<std::net::SocketAddr>,
) {
    // The session keeps the settings it opened with; a reload applies to new sessions.
    let settings = &state.rules().websocket.clone();
    let window = settings.window;
    let (mut tx, mut rx) = socket.split();
    let welcome = text(json!({
        "type": "welcome",
        "protocol": SUBPROTOCOL,
        "device": identity.device_id,
        "window": window,
        "max_frame_bytes": settings.max_frame_bytes,
    }));
    if tx.send(welcome).await.is_err() {
        return;
    }
    let mut session = DeviceSession::open(&state, &identity, "websocket", window, remote, None);
    if let (Some(upstream), Some(spec)) = (
        &state.upstream,
        commands::spec(&state, &identity, COMMANDS_IN_FLIGHT),
    ) {
        session.attach_upstream(upstream.open(spec));
    }
    run_session(&mut tx, &mut rx, &state, settings, &identity, &mut session).await;
    session.close(false).await;
    let _ = tx.close().await;
}

type Tx = futures_util::stream::SplitSink<WebSocket, Frame>;
type Rx = futures_util::stream::SplitStream<WebSocket>;

async fn run_session(
    tx: &mut Tx,
    rx: &mut Rx,
    state: &AppState,
    settings: &WebSocketConfig,
    identity: &Identity,
    session: &mut DeviceSession,
) {
    let window = settings.window;
    let bidirectional = session.upstream.is_some();
    let mut recent = crate::upstream::commands::Recent::default();
    let mut in_flight = FuturesUnordered::new();
    let mut last_heard = Instant::now();
    let idle = Duration::from_secs(settings.idle_timeout_secs);
    let mut ping = tokio::time::interval(Duration::from_secs(settings.ping_interval_secs));
    ping.tick().await;
    // Why the session ends (a close frame to send), once the loop stops reading.
    let ending: Option<Frame> = loop {
        tokio::select! {
            frame = rx.next(), if in_flight.len() < window => {
                let frame = match frame {
                    None => break None,
                    Some(Ok(frame)) => frame,
                    Some(Err(error)) => {
                        tracing::debug!(device = %identity.device_id, %error, "WebSocket read failed");
                        let inner = error.into_inner();
                        let too_big = inner
                            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
                        break Some(if too_big {
                            close(1009, "frame over max_frame_bytes")
                        } else {
                            close(1002, "protocol error")
                        });
                    }
                };
                last_heard = Instant::now();
                let parsed = match frame {
                    Frame::Text(text) => match parse_incoming(text.as_str()) {
                        Ok(Incoming::Publish(publish)) => Ok(publish),
                        Ok(Incoming::Reply(reply)) => {
                            let status = reply.status.as_deref().unwrap_or("done");
                            let sent = commands::reply(state, identity, session.upstream.as_ref(), &recent, &reply.id, status, reply.payload).await;
                            if let Err(refusal) = sent {
                                let credit = window - in_flight.len();
                                let frame = Reply::of(reply.id, false, Verdict::Refused(refusal)).frame(credit);
                                if tx.send(frame).await.is_err() {
                                    break None;
                                }
                            }
                            continue;
                        }
                        Err(bad) => Err(bad),
                    },
                    Frame::Binary(bytes) => parse_binary(&bytes),
                    Frame::Close(_) => break None,
                    Frame::Ping(_) | Frame::Pong(_) => continue,
                };
                session.received(1);
                match parsed {
                    Ok(publish) => in_flight.push(futures_util::future::Either::Left(async move {
                        handle(state, identity, publish, bidirectional).await
                    })),
                    Err(bad) => in_flight.push(futures_util::future::Either::Right(
                        futures_util::future::ready(Reply::from_bad(bad)),
                    )),
                }
            }
            Some(reply) = in_flight.next() => {
                session.answered(1);
                let credit = window - in_flight.len();
                if tx.send(reply.frame(credit)).await.is_err() {
                    break None;
                }
            }
            publish = crate::upstream::session::next_for(&mut session.upstream) => {
                let Some(upstream) = &session.upstream else { continue };
                let Some(command) = commands::command(state, identity, upstream, publish) else {
                    continue;
                };
                // Not written: not acknowledged, so IoT Core sends it again.
                if tx.send(text(command.to_json())).await.is_err() {
                    break None;
                }
                commands::delivered(upstream, &mut recent, &command);
                session.commands_sent(1);
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    break Some(close(CLOSE_IDLE, "idle timeout"));
                }
                if tx.send(Frame::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            ended = session.end.ended() => break Some(close_for(&ended)),
        }
    };
    // Messages already received are answered before the session closes.
    while let Some(reply) = in_flight.next().await {
        session.answered(1);
        let credit = window - in_flight.len();
        if tx.send(reply.frame(credit)).await.is_err() {
            return;
        }
    }
    if let Some(frame) = ending {
        let _ = tx.send(frame).await;
    }
}
