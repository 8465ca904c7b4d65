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
//! **Command replies** (`{"type": "command_reply", "id", "status"?, "payload"?}`) are
//! publishes on the device's reply topic, held to the policy like any other: a refused
//! one gets an error frame.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Identity, PeerIdentity};
use crate::config::WebSocketConfig;
use crate::ingress::admit::{
    ApiError, Publish as Admitted, admit, admit_reply, authenticate, decode_payload, rejected,
};
use crate::ingress::sessions::{RemoteAddr, SessionInfo};
use crate::ingress::state::AppState;
use crate::pipeline::Status;

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

/// `GET /ws`: authenticates, then upgrades.
pub async fn upgrade(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    remote: Option<Extension<RemoteAddr>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let rules = state.rules();
    let identity = authenticate(&rules, peer.as_deref(), &headers)?;
    let remote = remote.map(|Extension(RemoteAddr(address))| address);
    let offered = headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    if let Some(offered) = offered
        && !offered.split(',').any(|p| p.trim() == SUBPROTOCOL)
    {
        return Err(ApiError::BadRequest(format!(
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

/// A device's publish in a text frame.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextPublish {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    topic: String,
    payload: Option<serde_json::Value>,
    payload_base64: Option<String>,
    content_type: Option<String>,
    qos: Option<u8>,
}

/// A publish, from either frame kind.
#[derive(Debug)]
struct Publish {
    id: String,
    topic: String,
    payload: Vec<u8>,
    content_type: String,
    qos: u8,
    binary: bool,
}

/// A frame the device got wrong: answered with an error frame, the session goes on.
#[derive(Debug)]
struct BadFrame {
    id: Option<String>,
    binary: bool,
    message: String,
}

/// A device's answer to a command.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandReply {
    #[serde(rename = "type")]
    _kind: String,
    id: String,
    status: Option<String>,
    payload: Option<serde_json::Value>,
}

/// What a text frame asks for.
#[derive(Debug)]
enum Incoming {
    Publish(Publish),
    Reply(CommandReply),
}

fn parse_incoming(text: &str) -> Result<Incoming, BadFrame> {
    let is_reply =
        serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v["type"] == "command_reply");
    if is_reply {
        return serde_json::from_str::<CommandReply>(text)
            .map(Incoming::Reply)
            .map_err(|e| BadFrame {
                id: None,
                binary: false,
                message: format!("not a command_reply frame: {e}"),
            });
    }
    parse_text(text).map(Incoming::Publish)
}

fn parse_text(text: &str) -> Result<Publish, BadFrame> {
    let bad = |id: Option<String>, message: String| BadFrame {
        id,
        binary: false,
        message,
    };
    let frame: TextPublish = serde_json::from_str(text).map_err(|e| {
        // Name the id if the frame has one, so the device can match the error.
        let id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string));
        bad(id, format!("not a publish frame: {e}"))
    })?;
    if frame.kind != "publish" {
        return Err(bad(
            Some(frame.id),
            format!("unknown frame type `{}`", frame.kind),
        ));
    }
    let (payload, default_type) = match decode_payload(frame.payload, frame.payload_base64) {
        Ok(decoded) => decoded,
        Err(why) => return Err(bad(Some(frame.id), why)),
    };
    Ok(Publish {
        id: frame.id,
        topic: frame.topic,
        payload,
        content_type: frame
            .content_type
            .unwrap_or_else(|| default_type.to_string()),
        qos: frame.qos.unwrap_or(0),
        binary: false,
    })
}

fn parse_binary(bytes: &[u8]) -> Result<Publish, BadFrame> {
    let bad = |message: &str| BadFrame {
        id: None,
        binary: true,
        message: message.to_string(),
    };
    let [kind, flags, id_len, rest @ ..] = bytes else {
        return Err(bad("a binary frame starts with type, flags and id length"));
    };
    if *kind != 0x01 {
        return Err(bad("unknown binary frame type (0x01 is publish)"));
    }
    let id_len = *id_len as usize;
    let (id, rest) = rest
        .split_at_checked(id_len)
        .ok_or_else(|| bad("the frame ends inside the id"))?;
    let id = std::str::from_utf8(id)
        .map_err(|_| bad("the id is not UTF-8"))?
        .to_string();
    let [hi, lo, rest @ ..] = rest else {
        return Err(BadFrame {
            id: Some(id),
            binary: true,
            message: "the frame ends before the topic length".to_string(),
        });
    };
    let topic_len = u16::from_be_bytes([*hi, *lo]) as usize;
    let Some((topic, payload)) = rest.split_at_checked(topic_len) else {
        return Err(BadFrame {
            id: Some(id),
            binary: true,
            message: "the frame ends inside the topic".to_string(),
        });
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Err(BadFrame {
            id: Some(id),
            binary: true,
            message: "the topic is not UTF-8".to_string(),
        });
    };
    Ok(Publish {
        id,
        topic: topic.to_string(),
        payload: payload.to_vec(),
        content_type: String::new(),
        qos: flags & 1,
        binary: true,
    })
}

/// What goes back for one frame: an ack or an error.
enum Reply {
    Ack {
        id: String,
        message_id: String,
        status: Status,
        binary: bool,
    },
    Error {
        id: Option<String>,
        code: &'static str,
        message: String,
        retry_after: Option<u64>,
        binary: bool,
    },
}

impl Reply {
    fn from_bad(bad: BadFrame) -> Reply {
        crate::metrics::METRICS.refusal("bad_frame");
        Reply::Error {
            id: bad.id,
            code: "bad_frame",
            message: bad.message,
            retry_after: None,
            binary: bad.binary,
        }
    }

    fn from_api(id: String, binary: bool, error: ApiError) -> Reply {
        crate::metrics::METRICS.refusal(error.code());
        Reply::Error {
            id: Some(id),
            code: error.code(),
            message: error.message(),
            retry_after: error.retry_after(),
            binary,
        }
    }

    /// The frame, with `credit` left in the window after this reply.
    fn frame(self, credit: usize) -> Frame {
        match self {
            Reply::Ack {
                id,
                message_id,
                status,
                binary: false,
            } => text(
                json!({"type": "ack", "id": id, "message_id": message_id, "status": status, "credit": credit}),
            ),
            Reply::Ack { id, status, .. } => {
                let status = match status {
                    Status::Accepted => 0,
                    Status::Dropped => 1,
                    Status::DeadLettered | Status::Rejected => 2,
                };
                let mut out = vec![0x02, status];
                out.extend_from_slice(&(credit.min(u16::MAX as usize) as u16).to_be_bytes());
                push_short(&mut out, &id);
                Frame::Binary(out.into())
            }
            Reply::Error {
                id,
                code,
                message,
                retry_after,
                binary: false,
            } => {
                let mut body = json!({"type": "error", "id": id, "code": code, "message": message});
                if let Some(secs) = retry_after {
                    body["retry_after"] = secs.into();
                }
                text(body)
            }
            Reply::Error {
                id, code, message, ..
            } => {
                let mut out = vec![0x03];
                push_short(&mut out, code);
                push_short(&mut out, id.as_deref().unwrap_or(""));
                out.extend_from_slice(message.as_bytes());
                Frame::Binary(out.into())
            }
        }
    }
}

fn push_short(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

fn text(value: serde_json::Value) -> Frame {
    Frame::Text(Utf8Bytes::from(value.to_string()))
}

fn close(code: u16, reason: &'static str) -> Frame {
    Frame::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Runs one publish through policy, plugins, routing and the spool.
async fn handle(state: &AppState, identity: &Identity, publish: Publish) -> Reply {
    let Publish {
        id,
        topic,
        payload,
        content_type,
        qos,
        binary,
    } = publish;
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Reply::from_api(
            id,
            binary,
            ApiError::BadRequest(format!("the id must be 1 to {MAX_ID_LEN} bytes")),
        );
    }
    let publish = Admitted {
        topic,
        payload,
        content_type,
        qos,
        attributes: vec![("ws.id".to_string(), id.clone())],
    };
    let limit = state.pipeline.max_payload_bytes();
    let messages = match admit(&state.rules(), identity, limit, vec![publish], false) {
        Ok(messages) => messages,
        Err(error) => return Reply::from_api(id, binary, error),
    };
    // A session that receives commands takes part in command & control.
    let bidirectional = state.downlink.is_some();
    match state.pipeline.process(messages, bidirectional).await {
        Ok(mut reports) => match reports.pop() {
            Some(report) if report.status == Status::Rejected => {
                Reply::from_api(id, binary, rejected(report))
            }
            Some(report) => Reply::Ack {
                id,
                message_id: report.id,
                status: report.status,
                binary,
            },
            None => Reply::from_api(id, binary, ApiError::BadRequest("no report".to_string())),
        },
        Err(error) => Reply::from_api(id, binary, error.into()),
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
    let info = state.sessions.open(&identity, "websocket", window, remote);
    let mut attached = match &state.downlink {
        Some(downlink) => Some(downlink.attach(&identity.device_id).await),
        None => None,
    };
    run_session(
        &mut tx,
        &mut rx,
        &state,
        settings,
        &identity,
        &info,
        attached.as_mut(),
    )
    .await;
    if let (Some(downlink), Some(attached)) = (&state.downlink, attached) {
        downlink.detach(&identity.device_id, attached.session).await;
    }
    state.sessions.close(info.session);
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
    info: &SessionInfo,
    mut commands: Option<&mut crate::downlink::Attached>,
) {
    let window = settings.window;
    let mut shutdown = state.shutdown.clone();
    let mut in_flight = FuturesUnordered::new();
    let mut last_heard = Instant::now();
    let idle = Duration::from_secs(settings.idle_timeout_secs);
    let mut ping = tokio::time::interval(Duration::from_secs(settings.ping_interval_secs));
    ping.tick().await;
    // The session ends with its credential: at its expiry, or when a reload revokes it.
    let expiry = async {
        match identity.expires_at_secs {
            Some(at) => {
                let left = at.saturating_sub(crate::message::now_ms() / 1000);
                tokio::time::sleep(Duration::from_secs(left.saturating_add(1))).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let mut updates = state.live.updates.subscribe();
    // A reload between the upgrade and here would otherwise go unnoticed.
    updates.mark_changed();
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
                            if let Some(downlink) = &state.downlink {
                                let topic = downlink.reply_topic(&identity.device_id);
                                let size = text.len();
                                match admit_reply(&state.rules(), identity, &topic, size) {
                                    Ok(()) => {
                                        let status = reply.status.as_deref().unwrap_or("done");
                                        downlink.reply(&identity.device_id, &reply.id, status, reply.payload).await;
                                    }
                                    Err(error) => {
                                        let credit = window - in_flight.len();
                                        let frame = Reply::from_api(reply.id, false, error).frame(credit);
                                        if tx.send(frame).await.is_err() {
                                            break None;
                                        }
                                    }
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
                info.messages.fetch_add(1, Ordering::Relaxed);
                let now = info.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                info.max_in_flight.fetch_max(now, Ordering::Relaxed);
                match parsed {
                    Ok(publish) => in_flight.push(futures_util::future::Either::Left(async move {
                        handle(state, identity, publish).await
                    })),
                    Err(bad) => in_flight.push(futures_util::future::Either::Right(
                        futures_util::future::ready(Reply::from_bad(bad)),
                    )),
                }
            }
            Some(reply) = in_flight.next() => {
                info.in_flight.fetch_sub(1, Ordering::Relaxed);
                let credit = window - in_flight.len();
                if tx.send(reply.frame(credit)).await.is_err() {
                    break None;
                }
            }
            Some(()) = nudged(&mut commands) => {
                let (Some(downlink), Some(attached)) = (&state.downlink, &commands) else {
                    continue;
                };
                let device = &identity.device_id;
                let taken = downlink.claim(device, attached.session, usize::MAX, |_| true);
                let mut sent = Vec::with_capacity(taken.len());
                let mut closed = false;
                for (seq, command) in taken {
                    if !state.rules().policy.may_subscribe(identity, &command.topic) {
                        tracing::info!(%device, topic = %command.topic, "command refused by the policy");
                        downlink.reply(device, &command.id, "denied", None).await;
                        sent.push(seq);
                        continue;
                    }
                    if tx.send(text(command.to_json())).await.is_err() {
                        closed = true;
                        break;
                    }
                    info.commands.fetch_add(1, Ordering::Relaxed);
                    sent.push(seq);
                }
                // Sent (or denied): out of the queue; the rest goes back at detach.
                downlink.done(device, sent).await;
                if closed {
                    break None;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    break Some(close(CLOSE_IDLE, "idle timeout"));
                }
                if tx.send(Frame::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            () = &mut expiry => break Some(close(CLOSE_EXPIRED, "the credential expired")),
            Ok(()) = updates.changed() => {
                let now = crate::message::now_ms() / 1000;
                match state.rules().auth.still_valid(identity, now) {
                    Ok(()) => {}
                    Err(crate::auth::AuthError::CertificateRevoked) => {
                        break Some(close(CLOSE_REVOKED, "the certificate was revoked"));
                    }
                    Err(_) => break Some(close(CLOSE_EXPIRED, "the credential expired")),
                }
            }
            () = shutdown.wait() => break Some(close(1001, "the gateway is shutting down")),
        }
    };
    // Messages already received are answered before the session closes.
    while let Some(reply) = in_flight.next().await {
        info.in_flight.fetch_sub(1, Ordering::Relaxed);
        let credit = window - in_flight.len();
        if tx.send(reply.frame(credit)).await.is_err() {
            return;
        }
    }
    if let Some(frame) = ending {
        let _ = tx.send(frame).await;
    }
}

/// Resolves when the session may have commands to take; never without a downlink.
async fn nudged(commands: &mut Option<&mut crate::downlink::Attached>) -> Option<()> {
    match commands {
        Some(attached) => attached.nudges.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_publish_frames_parse_and_malformed_ones_say_why() {
        let mut frame = vec![0x01, 0x01, 2, b'm', b'1', 0, 3];
        frame.extend_from_slice(b"a/b");
        frame.extend_from_slice(b"\x00\x01payload");
        let publish = parse_binary(&frame).unwrap();
        assert_eq!(publish.id, "m1");
        assert_eq!(publish.topic, "a/b");
        assert_eq!(publish.payload, b"\x00\x01payload");
        assert_eq!(publish.qos, 1);
        assert!(parse_binary(&[0x01]).is_err());
        let cut = parse_binary(&[0x01, 0, 2, b'm', b'1', 0, 9, b'a'])
            .err()
            .unwrap();
        assert_eq!(cut.id.as_deref(), Some("m1"), "the id is named when known");
        assert!(parse_binary(&[0x07, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn text_frames_parse_and_errors_name_the_id() {
        let publish =
            parse_text(r#"{"type":"publish","id":"a","topic":"t","payload":{"x":1}}"#).unwrap();
        assert_eq!(publish.payload, br#"{"x":1}"#);
        assert_eq!(publish.content_type, "application/json");
        let bad = parse_text(r#"{"type":"publish","id":"b","topic":7}"#)
            .err()
            .unwrap();
        assert_eq!(bad.id.as_deref(), Some("b"));
        assert!(parse_text("not json").is_err());
    }
}
