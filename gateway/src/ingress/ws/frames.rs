//! The `sluice.v1` dialect's frames: publishes and command replies parsed from text
//! (JSON) and binary frames, and the acks and errors written back; [`Reply::of`] is the
//! one mapping from a message's verdict to its frame.

use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes};
use serde::Deserialize;
use serde_json::json;

use crate::ingress::admit::decode_payload;
use crate::ingress::verdict::Verdict;
use crate::pipeline::Status;

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
pub(super) struct Publish {
    /// The id the device chose, echoed in the ack.
    pub(super) id: String,
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    pub(super) content_type: String,
    pub(super) qos: u8,
    /// Came in a binary frame: answered in one.
    pub(super) binary: bool,
}

/// A frame the device got wrong: answered with an error frame, the session goes on.
#[derive(Debug)]
pub(super) struct BadFrame {
    /// The id the frame named, when it could be read.
    pub(super) id: Option<String>,
    binary: bool,
    message: String,
}

/// A device's answer to a command.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandReply {
    #[serde(rename = "type")]
    _kind: String,
    /// The command's id.
    pub(super) id: String,
    pub(super) status: Option<String>,
    pub(super) payload: Option<serde_json::Value>,
}

/// What a text frame asks for.
#[derive(Debug)]
pub(super) enum Incoming {
    Publish(Publish),
    Reply(CommandReply),
}

pub(super) fn parse_incoming(text: &str) -> Result<Incoming, BadFrame> {
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

pub(super) fn parse_binary(bytes: &[u8]) -> Result<Publish, BadFrame> {
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
#[derive(Debug)]
pub(super) enum Reply {
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
    pub(super) fn from_bad(bad: BadFrame) -> Reply {
        crate::metrics::METRICS.refusal("bad_frame");
        Reply::Error {
            id: bad.id,
            code: "bad_frame",
            message: bad.message,
            retry_after: None,
            binary: bad.binary,
        }
    }

    /// The one mapping from a message's verdict to what its frame says.
    pub fn of(id: String, binary: bool, verdict: Verdict) -> Reply {
        match verdict {
            Verdict::Accepted(report) => Reply::Ack {
                id,
                message_id: report.id,
                status: report.status,
                binary,
            },
            Verdict::Refused(refusal) => {
                crate::metrics::METRICS.refusal(refusal.code());
                Reply::Error {
                    id: Some(id),
                    code: refusal.code(),
                    message: refusal.message(),
                    retry_after: refusal.retry_after(),
                    binary,
                }
            }
        }
    }

    /// The frame, with `credit` left in the window after this reply.
    pub(super) fn frame(self, credit: usize) -> Frame {
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

pub(super) fn text(value: serde_json::Value) -> Frame {
    Frame::Text(Utf8Bytes::from(value.to_string()))
}

pub(super) fn close(code: u16, reason: &'static str) -> Frame {
    Frame::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::verdict::Refusal;
    use crate::pipeline::MessageReport;

    /// Each verdict as a text and a binary frame: acks with their status and credit,
    /// refusals with their code (and `retry_after` where the device should wait).
    #[test]
    fn verdicts_map_to_frames() {
        let accepted = |status| {
            Verdict::Accepted(MessageReport {
                id: "g1".to_string(),
                status,
                routes: Vec::new(),
                error: None,
                failure_kind: None,
            })
        };
        let refused = |refusal| Verdict::Refused(refusal);
        let rate_limited = Refusal::RateLimited {
            grant: "g".to_string(),
            limit: "max_messages_per_sec",
            retry_after: 2,
        };
        let cases: Vec<(Verdict, serde_json::Value, Vec<u8>)> = vec![
            (
                accepted(Status::Accepted),
                json!({"type": "ack", "id": "m", "message_id": "g1", "status": "accepted", "credit": 3}),
                vec![0x02, 0, 0, 3, 1, b'm'],
            ),
            (
                accepted(Status::Dropped),
                json!({"type": "ack", "id": "m", "message_id": "g1", "status": "dropped", "credit": 3}),
                vec![0x02, 1, 0, 3, 1, b'm'],
            ),
            (
                accepted(Status::DeadLettered),
                json!({"type": "ack", "id": "m", "message_id": "g1", "status": "dead-lettered", "credit": 3}),
                vec![0x02, 2, 0, 3, 1, b'm'],
            ),
            (
                refused(Refusal::BadTopic("bad".to_string())),
                json!({"type": "error", "id": "m", "code": "bad_request", "message": "bad"}),
                [&[0x03, 11][..], b"bad_request", &[1, b'm'], b"bad"].concat(),
            ),
            (
                refused(rate_limited.clone()),
                json!({"type": "error", "id": "m", "code": "rate_limited", "message": rate_limited.message(), "retry_after": 2}),
                [
                    &[0x03, 12][..],
                    b"rate_limited",
                    &[1, b'm'],
                    rate_limited.message().as_bytes(),
                ]
                .concat(),
            ),
        ];
        for (verdict, text, binary) in cases {
            let Frame::Text(got) = Reply::of("m".to_string(), false, verdict.clone()).frame(3)
            else {
                panic!("not a text frame");
            };
            let got: serde_json::Value = serde_json::from_str(got.as_str()).unwrap();
            assert_eq!(got, text);
            let Frame::Binary(got) = Reply::of("m".to_string(), true, verdict).frame(3) else {
                panic!("not a binary frame");
            };
            assert_eq!(got.to_vec(), binary, "{text}");
        }
    }

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
