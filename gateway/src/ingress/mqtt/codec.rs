//! MQTT packets in and out, for 3.1.1 and 5.0, on rumqttc's `mqttbytes` codecs.
//!
//! Why these codecs: rumqttc is already the IoT Core sink's client, its `mqttbytes`
//! modules decode and encode every packet of both versions (the server's side too:
//! CONNECT, SUBSCRIBE, …), with a size limit checked from the fixed header before any
//! allocation, and they build with our toolchain. `rmqtt-codec` was the other candidate;
//! it would be a second MQTT stack for the same job. The crate needs care in three
//! places, handled here:
//!
//! - its 3.1.1 CONNECT reader also accepts a 5.0 CONNECT, so the version is read from
//!   the CONNECT's protocol level first ([`detect_version`]) and the matching reader used;
//! - its 5.0 reader refuses the legal two-byte DISCONNECT (no reason code), which is
//!   taken here before the reader;
//! - its 3.1.1 PUBACK is written here (four bytes), to share one function with 5.0's.
//!
//! PUBACK reason codes are the specification's for PUBACK only (0x87, 0x97, 0x83, 0x90,
//! 0x99, …): paho-mqtt 2.2 treats any other (0x95 and 0x96 are DISCONNECT codes) as a
//! protocol error and drops the connection, so a too-large packet is a DISCONNECT 0x95.

use bytes::{BufMut as _, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::message::attribute;
pub use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubAckReason, SubscribeReasonCode};

/// The protocol version a client chose in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A packet from a client, whatever its version.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The first packet of a connection.
    Connect(Connect),
    /// A message.
    Publish(Publish),
    /// The client's acknowledgement of a QoS 1 publish the gateway sent.
    PubAck {
        /// The packet id.
        pkid: u16,
    },
    /// Subscriptions (for commands).
    Subscribe {
        /// The packet id.
        pkid: u16,
        /// Filters with the QoS asked for.
        filters: Vec<(String, u8)>,
    },
    /// Subscriptions to end.
    Unsubscribe {
        /// The packet id.
        pkid: u16,
        /// The filters.
        filters: Vec<String>,
    },
    /// Keep-alive.
    PingReq,
    /// The client ends the connection; its last will is dropped unless `with_will`
    /// (5.0's reason 0x04).
    Disconnect {
        /// 5.0: DISCONNECT with reason 0x04 (disconnect with will message).
        with_will: bool,
    },
    /// A packet a client does not send to a server (CONNACK, SUBACK, …), or QoS 2's.
    Unexpected(&'static str),
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    /// The version.
    pub version: Version,
    /// The client id.
    pub client_id: String,
    /// Clean session (3.1.1) or clean start (5.0).
    pub clean: bool,
    /// Seconds; 0: none.
    pub keep_alive: u16,
    /// The user name, if any.
    pub username: Option<String>,
    /// The password, if any (a token, for Sluice).
    pub password: Option<String>,
    /// 5.0: how many QoS 1 publishes the client takes unacknowledged.
    pub receive_maximum: Option<u16>,
    /// 5.0: the largest packet the client takes.
    pub max_packet_size: Option<u32>,
    /// 5.0: seconds the session outlives the connection (0 or absent: none).
    pub session_expiry: Option<u32>,
    /// The last will: published when the connection drops without a DISCONNECT (its
    /// `pkid` is 0).
    pub will: Option<Publish>,
    /// 5.0: the enhanced authentication method asked for (none is supported: CONNACK
    /// 0x8C).
    pub auth_method: Option<String>,
}

/// A PUBLISH from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// 0, 1 or 2.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// The topic (a 5.0 topic alias is not supported: the gateway offers none).
    pub topic: String,
    /// The packet id (QoS 1 and 2).
    pub pkid: u16,
    /// The payload.
    pub payload: Bytes,
    /// 5.0 properties as the publish API's `mqtt.*` attributes, and the content type.
    pub properties: Properties,
}

/// MQTT 5 publish properties, in the forms the HTTPS publish API takes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// `content_type`.
    pub content_type: Option<String>,
    /// `mqtt.*` attributes: response topic, correlation data (base64), message expiry
    /// (seconds), payload format (`UNSPECIFIED_BYTES` / `UTF8_DATA`), user properties
    /// (base64 of a JSON array of one-key objects, as IoT Core's HTTPS API takes them).
    pub attributes: Vec<(String, String)>,
}

/// Why bytes could not be read as a packet: the connection is closed (5.0: with this
/// reason code first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Over the packet size limit (0x95).
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a valid packet (0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The CONNECT names a protocol this server does not speak (CONNACK 0x01 / 0x84).
    #[error("unsupported protocol: {0}")]
    Protocol(String),
    /// 5.0: a topic alias, where the gateway announced a Topic Alias Maximum of 0 (0x94).
    #[error("a topic alias, where the gateway takes none (Topic Alias Maximum 0)")]
    TopicAlias,
}

impl CodecError {
    /// The MQTT 5 DISCONNECT reason for it, once the session runs (before, a
    /// [`CodecError::Protocol`] is a CONNACK 0x84 / 0x01).
    pub fn reason_code(&self) -> DisconnectReasonCode {
        match self {
            CodecError::TooLarge(_) => DisconnectReasonCode::PacketTooLarge,
            CodecError::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            CodecError::Protocol(_) => DisconnectReasonCode::ProtocolError,
            CodecError::TopicAlias => DisconnectReasonCode::TopicAliasInvalid,
        }
    }
}

/// The remaining length of the packet at the start of `bytes` and where its variable
/// header starts, or `None` when the fixed header is not all there yet.
fn fixed_header(bytes: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut length = 0usize;
    for (index, byte) in bytes.iter().skip(1).take(4).enumerate() {
        length |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((length, index + 2)));
        }
    }
    if bytes.len() >= 5 {
        return Err(CodecError::Malformed(
            "remaining length over four bytes".to_string(),
        ));
    }
    Ok(None)
}

/// The version of the CONNECT at the start of `bytes`; `None` until enough bytes are in.
pub fn detect_version(bytes: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some((_, start)) = fixed_header(bytes)? else {
        return Ok(None);
    };
    // Not a CONNECT (the flags included): closed without a CONNACK, which would be in a
    // version the client never named (MQTT-3.1.0-1, MQTT-3.1.4-1 / 5.0 §4.13).
    if bytes[0] != 0x10 {
        return Err(CodecError::Malformed(
            "the first packet must be CONNECT".to_string(),
        ));
    }
    let header = &bytes[start..];
    if header.len() < 7 {
        return Ok(None);
    }
    match (&header[..6], header[6]) {
        (b"\x00\x04MQTT", 4) => Ok(Some(Version::V4)),
        (b"\x00\x04MQTT", 5) => Ok(Some(Version::V5)),
        (b"\x00\x06MQIsdp", _) => Err(CodecError::Protocol(
            "MQTT 3.1 is not supported; use 3.1.1 or 5.0".to_string(),
        )),
        (_, level) => Err(CodecError::Protocol(format!(
            "protocol level {level} is not supported; use 3.1.1 (4) or 5.0 (5)"
        ))),
    }
}

/// The next packet in `buffer` (taken out of it), `None` when it is not all there yet.
pub fn read(
    version: Version,
    buffer: &mut BytesMut,
    max_bytes: usize,
) -> Result<Option<Incoming>, CodecError> {
    let Some((length, start)) = fixed_header(buffer)? else {
        return Ok(None);
    };
    if length > max_bytes {
        return Err(CodecError::TooLarge(length));
    }
    if buffer.len() < start + length {
        return Ok(None);
    }
    // The legal two-byte DISCONNECT, which the 5.0 reader refuses.
    if buffer[0] == 0xe0 && length == 0 {
        let _ = buffer.split_to(2);
        return Ok(Some(Incoming::Disconnect { with_will: false }));
    }
    // rumqttc's readers check neither (found by the fuzz target, gateway/fuzz).
    if !flags_allowed(buffer[0]) {
        return Err(CodecError::Malformed(format!(
            "fixed header {:#04x}: flags this packet type may not have",
            buffer[0]
        )));
    }
    let malformed = |error: &dyn std::fmt::Display| CodecError::Malformed(error.to_string());
    let packet = match version {
        Version::V4 => from_v4(v4::Packet::read(buffer, max_bytes).map_err(|e| malformed(&e))?),
        Version::V5 => from_v5(
            v5::Packet::read(buffer, Some(u32::try_from(max_bytes).unwrap_or(u32::MAX)))
                .map_err(|e| malformed(&e))?,
        )?,
    };
    let empty = match &packet {
        Incoming::Subscribe { filters, .. } => filters.is_empty(),
        Incoming::Unsubscribe { filters, .. } => filters.is_empty(),
        _ => false,
    };
    if empty {
        return Err(CodecError::Malformed(
            "a SUBSCRIBE or UNSUBSCRIBE needs at least one topic filter".to_string(),
        ));
    }
    Ok(Some(packet))
}

/// Whether a packet's first byte has the flags its type must have (MQTT 3.1.1 and 5.0,
/// section 2.1.3): PUBLISH any but QoS 3; PUBREL, SUBSCRIBE and UNSUBSCRIBE `0010`; the
/// rest `0000`.
fn flags_allowed(first: u8) -> bool {
    let flags = first & 0x0f;
    match first >> 4 {
        3 => flags & 0x06 != 0x06,
        6 | 8 | 10 => flags == 0x02,
        _ => flags == 0,
    }
}

fn from_v4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::Connect(connect) => {
            let (username, password) = match connect.login {
                Some(login) => (Some(login.username), Some(login.password)),
                None => (None, None),
            };
            Incoming::Connect(Connect {
                version: Version::V4,
                client_id: connect.client_id,
                clean: connect.clean_session,
                keep_alive: connect.keep_alive,
                username: username.filter(|u| !u.is_empty()),
                password: password.filter(|p| !p.is_empty()),
                receive_maximum: None,
                max_packet_size: None,
                session_expiry: None,
                will: connect.last_will.map(|will| Publish {
                    qos: will.qos as u8,
                    retain: will.retain,
                    topic: will.topic,
                    pkid: 0,
                    payload: will.message,
                    properties: Properties::default(),
                }),
                auth_method: None,
            })
        }
        v4::Packet::Publish(publish) => Incoming::Publish(Publish {
            qos: publish.qos as u8,
            retain: publish.retain,
            topic: publish.topic,
            pkid: publish.pkid,
            payload: publish.payload,
            properties: Properties::default(),
        }),
        v4::Packet::PubAck(ack) => Incoming::PubAck { pkid: ack.pkid },
        v4::Packet::Subscribe(subscribe) => Incoming::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(unsubscribe) => Incoming::Unsubscribe {
            pkid: unsubscribe.pkid,
            filters: unsubscribe.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect { with_will: false },
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            Incoming::Unexpected("a QoS 2 packet")
        }
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => Incoming::Unexpected("a packet only servers send"),
    }
}

/// A 5.0 topic as text: the specification makes a topic that is not UTF-8 a malformed
/// packet (rumqttc's reader leaves 5.0 topics as bytes).
fn utf8_topic(topic: Bytes) -> Result<String, CodecError> {
    String::from_utf8(topic.to_vec())
        .map_err(|_| CodecError::Malformed("the topic is not UTF-8".to_string()))
}

fn from_v5(packet: v5::Packet) -> Result<Incoming, CodecError> {
    Ok(match packet {
        v5::Packet::Connect(connect, will, login) => {
            let properties = connect.properties.unwrap_or_default();
            let will = will.map(|will| {
                let properties = will.properties.map(|p| {
                    attributes(
                        p.content_type,
                        p.response_topic,
                        p.correlation_data,
                        p.message_expiry_interval,
                        p.payload_format_indicator,
                        &p.user_properties,
                    )
                });
                Ok::<_, CodecError>(Publish {
                    qos: will.qos as u8,
                    retain: will.retain,
                    topic: utf8_topic(will.topic)?,
                    pkid: 0,
                    payload: will.message,
                    properties: properties.unwrap_or_default(),
                })
            });
            Incoming::Connect(Connect {
                version: Version::V5,
                client_id: connect.client_id,
                clean: connect.clean_start,
                keep_alive: connect.keep_alive,
                username: login
                    .as_ref()
                    .map(|l| l.username.clone())
                    .filter(|u| !u.is_empty()),
                password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                receive_maximum: properties.receive_maximum,
                max_packet_size: properties.max_packet_size,
                session_expiry: properties.session_expiry_interval,
                will: will.transpose()?,
                auth_method: properties.authentication_method,
            })
        }
        v5::Packet::Publish(publish) => {
            if publish
                .properties
                .as_ref()
                .is_some_and(|p| p.topic_alias.is_some())
            {
                return Err(CodecError::TopicAlias);
            }
            let out = publish.properties.map(|p| {
                attributes(
                    p.content_type,
                    p.response_topic,
                    p.correlation_data,
                    p.message_expiry_interval,
                    p.payload_format_indicator,
                    &p.user_properties,
                )
            });
            Incoming::Publish(Publish {
                qos: publish.qos as u8,
                retain: publish.retain,
                topic: utf8_topic(publish.topic)?,
                pkid: publish.pkid,
                payload: publish.payload,
                properties: out.unwrap_or_default(),
            })
        }
        v5::Packet::PubAck(ack) => Incoming::PubAck { pkid: ack.pkid },
        v5::Packet::Subscribe(subscribe) => Incoming::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(unsubscribe) => Incoming::Unsubscribe {
            pkid: unsubscribe.pkid,
            filters: unsubscribe.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(disconnect) => Incoming::Disconnect {
            with_will: disconnect.reason_code
                == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            Incoming::Unexpected("a QoS 2 packet")
        }
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH (enhanced authentication)"),
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => Incoming::Unexpected("a packet only servers send"),
    })
}

/// MQTT 5 message properties (of a PUBLISH or a will) as the HTTPS API's attributes.
fn attributes(
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    message_expiry: Option<u32>,
    payload_format: Option<u8>,
    user_properties: &[(String, String)],
) -> Properties {
    use base64::Engine as _;
    let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut attributes = Vec::new();
    if let Some(topic) = response_topic {
        attributes.push((attribute::RESPONSE_TOPIC.to_string(), topic));
    }
    if let Some(data) = correlation_data {
        attributes.push((attribute::CORRELATION_DATA.to_string(), base64(&data)));
    }
    if let Some(secs) = message_expiry {
        attributes.push((attribute::MESSAGE_EXPIRY.to_string(), secs.to_string()));
    }
    if let Some(format) = payload_format {
        let name = if format == 1 {
            "UTF8_DATA"
        } else {
            "UNSPECIFIED_BYTES"
        };
        attributes.push((
            attribute::PAYLOAD_FORMAT_INDICATOR.to_string(),
            name.to_string(),
        ));
    }
    if !user_properties.is_empty() {
        let pairs: Vec<serde_json::Value> = user_properties
            .iter()
            .map(|(k, v)| serde_json::json!({ k: v }))
            .collect();
        let json = serde_json::Value::Array(pairs).to_string();
        attributes.push((
            attribute::USER_PROPERTIES.to_string(),
            base64(json.as_bytes()),
        ));
    }
    Properties {
        content_type,
        attributes,
    }
}

/// The MQTT 5 properties that `attributes` wrote (the inverse of [`attributes`]), for a
/// publish passed on to IoT Core as the device sent it. `None` when there are none.
pub fn mqtt5_properties(properties: &Properties) -> Option<v5::PublishProperties> {
    crate::upstream::properties::of(properties.content_type.as_deref(), &properties.attributes)
}

/// A client's last will as the will of its session at IoT Core.
pub fn mqtt5_will(will: &Publish) -> v5::LastWill {
    let properties = mqtt5_properties(&will.properties).map(|p| v5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    });
    v5::LastWill {
        topic: Bytes::from(will.topic.clone()),
        message: will.payload.clone(),
        qos: if will.qos == 0 {
            rumqttc::v5::mqttbytes::QoS::AtMostOnce
        } else {
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce
        },
        retain: will.retain,
        properties,
    }
}

/// What a CONNACK says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    /// Accepted.
    Accepted,
    /// The protocol version is not supported.
    BadProtocol,
    /// The client id is not usable or not allowed.
    BadClientId,
    /// The credentials are wrong.
    BadCredentials,
    /// Not allowed to connect.
    NotAuthorized,
    /// 5.0: an enhanced authentication method, which the gateway does not support.
    BadAuthMethod,
}

/// What an accepting MQTT 5 CONNACK announces.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    /// QoS 1 publishes the client may have unacknowledged.
    pub receive_maximum: u16,
    /// The largest packet the gateway takes.
    pub max_packet: usize,
    /// The keep-alive the gateway holds the client to (seconds).
    pub keep_alive: u16,
    /// A session kept from an earlier connection goes on.
    pub session_present: bool,
    /// 5.0: the session expiry the gateway holds the client to, when less than it asked.
    pub session_expiry: Option<u32>,
    /// 5.0: the client id the gateway gave a client that sent an empty one.
    pub assigned_client_id: Option<String>,
    /// 5.0: whether shared subscriptions (`$share/…`) are available (with `[upstream]`).
    pub shared_subscriptions: bool,
}

/// A CONNACK; with [`ConnAckCode::Accepted`], MQTT 5 clients are told `accepted`; the
/// reason string is left out where the packet would exceed `limit` (the client's Maximum
/// Packet Size).
pub fn connack(
    version: Version,
    code: ConnAckCode,
    accepted: Accepted,
    reason: Option<&str>,
    limit: Option<u32>,
) -> BytesMut {
    fitted(reason, limit, |reason| {
        connack_with(version, code, accepted.clone(), reason)
    })
}

fn connack_with(
    version: Version,
    code: ConnAckCode,
    accepted: Accepted,
    reason: Option<&str>,
) -> BytesMut {
    let Accepted {
        receive_maximum,
        max_packet,
        keep_alive,
        session_present,
        session_expiry,
        assigned_client_id,
        shared_subscriptions,
    } = accepted;
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let code = match code {
                ConnAckCode::Accepted => v4::ConnectReturnCode::Success,
                ConnAckCode::BadProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                ConnAckCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnAckCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                // 3.1.1 has no authentication method to refuse.
                ConnAckCode::NotAuthorized | ConnAckCode::BadAuthMethod => {
                    v4::ConnectReturnCode::NotAuthorized
                }
            };
            v4::ConnAck::new(code, session_present)
                .write(&mut out)
                .expect("a CONNACK always encodes");
        }
        Version::V5 => {
            // A refusal carries its reason alone (a receive maximum of 0 would be a
            // protocol error).
            let accepted = code == ConnAckCode::Accepted;
            let code = match code {
                ConnAckCode::Accepted => v5::ConnectReturnCode::Success,
                ConnAckCode::BadProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                ConnAckCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnAckCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                ConnAckCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                ConnAckCode::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
            };
            let properties = v5::ConnAckProperties {
                session_expiry_interval: session_expiry.filter(|_| accepted),
                receive_max: accepted.then_some(receive_maximum),
                max_qos: accepted.then_some(1),
                retain_available: None,
                max_packet_size: accepted.then(|| u32::try_from(max_packet).unwrap_or(u32::MAX)),
                assigned_client_identifier: assigned_client_id.filter(|_| accepted),
                topic_alias_max: accepted.then_some(0),
                reason_string: reason.map(reason_string),
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: accepted.then_some(0),
                // Absent means available.
                shared_subscription_available: (accepted && !shared_subscriptions).then_some(0),
                server_keep_alive: accepted.then_some(keep_alive),
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            let ack = v5::ConnAck {
                session_present: session_present && accepted,
                code,
                properties: Some(properties),
            };
            v5::Packet::ConnAck(ack)
                .write(&mut out, None)
                .expect("a CONNACK always encodes");
        }
    }
    out
}

/// A PUBACK for `pkid`: 3.1.1 has no reason; 5.0 carries `reason` and, for a refusal,
/// the reason in words, left out where the packet would exceed `limit` (the client's
/// Maximum Packet Size, as MQTT 5 §3.4.2.2.2 asks).
pub fn puback(
    version: Version,
    pkid: u16,
    reason: PubAckReason,
    why: Option<&str>,
    limit: Option<u32>,
) -> BytesMut {
    fitted(why, limit, |why| puback_with(version, pkid, reason, why))
}

/// `encode`d with the reason string `why`, or without it where that would take the
/// packet past `limit` (a client's Maximum Packet Size).
fn fitted(
    why: Option<&str>,
    limit: Option<u32>,
    encode: impl Fn(Option<&str>) -> BytesMut,
) -> BytesMut {
    let out = encode(why);
    if why.is_some() && limit.is_some_and(|limit| out.len() > limit as usize) {
        return encode(None);
    }
    out
}

fn puback_with(version: Version, pkid: u16, reason: PubAckReason, why: Option<&str>) -> BytesMut {
    let mut out = BytesMut::with_capacity(8);
    match version {
        Version::V4 => {
            out.put_u8(0x40);
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            let properties = why.map(|why| v5::PubAckProperties {
                reason_string: Some(reason_string(why)),
                user_properties: Vec::new(),
            });
            let ack = v5::PubAck {
                pkid,
                reason,
                properties,
            };
            v5::Packet::PubAck(ack)
                .write(&mut out, None)
                .expect("a PUBACK always encodes");
        }
    }
    out
}

/// A PINGRESP.
pub fn pingresp() -> &'static [u8] {
    &[0xd0, 0x00]
}

/// A DISCONNECT from the server (5.0 only: 3.1.1 just closes) with `reason`, and an
/// empty property length: the specification lets a remaining length of 1 leave it out,
/// but some clients' readers (rumqttc's) then fail on the packet.
pub fn disconnect(reason: DisconnectReasonCode) -> BytesMut {
    let mut out = BytesMut::with_capacity(4);
    out.put_u8(0xe0);
    out.put_u8(2);
    out.put_u8(reason as u8);
    out.put_u8(0);
    out
}

/// A DISCONNECT 0x9C (use another server) naming `reference` (5.0 only), for a
/// gateway that leaves with `mqtt.server_reference` set.
pub fn disconnect_to(reference: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(8 + reference.len());
    v5::Packet::Disconnect(v5::Disconnect {
        reason_code: DisconnectReasonCode::UseAnotherServer,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: Some(reference.to_string()),
        }),
    })
    .write(&mut out, None)
    .expect("a DISCONNECT always encodes");
    out
}

/// Longest reason string sent, in bytes: a reason is for a person reading a log, and a
/// long one (a refusal quoting a 64 KiB topic) would overflow the property's 16-bit
/// length and break the packet.
pub const MAX_REASON_BYTES: usize = 256;

/// `why` as a reason string: control characters (a NUL from a topic, say) replaced by
/// `?`, cut to [`MAX_REASON_BYTES`] on a character boundary, with `…` where it was cut.
pub fn reason_string(why: &str) -> String {
    let clean: String = why
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.len() <= MAX_REASON_BYTES {
        return clean;
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

/// The byte a PUBACK reason is on the wire (rumqttc keeps its own mapping private), for
/// metrics and logs.
pub fn puback_code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// A SUBACK's answer for one filter: the QoS granted, or the reason it was refused.
pub type Granted = Result<u8, SubscribeReasonCode>;

/// A SUBACK: per filter, the granted QoS or the refusal (3.1.1: 0x80 for any), and (5.0)
/// `why` as the reason string, left out where the packet would exceed `limit` (the
/// client's Maximum Packet Size).
pub fn suback(
    version: Version,
    pkid: u16,
    granted: &[Granted],
    why: Option<&str>,
    limit: Option<u32>,
) -> BytesMut {
    fitted(why, limit, |why| suback_with(version, pkid, granted, why))
}

fn suback_with(version: Version, pkid: u16, granted: &[Granted], why: Option<&str>) -> BytesMut {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let codes = granted
                .iter()
                .map(|g| match g {
                    Ok(0) => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
                    Ok(_) => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::SubAck::new(pkid, codes)
                .write(&mut out)
                .expect("a SUBACK always encodes");
        }
        Version::V5 => {
            let codes = granted
                .iter()
                .map(|g| match g {
                    Ok(0) => SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce),
                    Ok(_) => SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                    Err(code) => *code,
                })
                .collect();
            let ack = v5::SubAck {
                pkid,
                return_codes: codes,
                properties: why.map(|why| v5::SubAckProperties {
                    reason_string: Some(reason_string(why)),
                    user_properties: Vec::new(),
                }),
            };
            v5::Packet::SubAck(ack)
                .write(&mut out, None)
                .expect("a SUBACK always encodes");
        }
    }
    out
}

/// An UNSUBACK for `pkid` with `count` filters (5.0: each reason 0x00, success).
pub fn unsuback(version: Version, pkid: u16, count: usize) -> BytesMut {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            out.put_u8(0xb0);
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            let ack = v5::UnsubAck {
                pkid,
                reasons: vec![v5::UnsubAckReason::Success; count],
                properties: None,
            };
            v5::Packet::UnsubAck(ack)
                .write(&mut out, None)
                .expect("an UNSUBACK always encodes");
        }
    }
    out
}

/// Whether `bytes` start with a whole packet (so reading them needs no more input).
pub fn complete(bytes: &[u8]) -> bool {
    matches!(fixed_header(bytes), Ok(Some((length, start))) if bytes.len() >= start + length)
        || fixed_header(bytes).is_err()
}

/// A message from the device's session at IoT Core, to the device with packet id `pkid`
/// (its QoS as IoT Core sent it, at most 1): MQTT 5 keeps the message's properties
/// (response topic, correlation data, user properties, content type, expiry), 3.1.1 has
/// none. The retain flag says the message is a retained one sent on subscribe; the DUP
/// flag that IoT Core sends it again (it went to the device's session before, and was
/// not acknowledged).
pub fn relayed(version: Version, from: &v5::Publish, pkid: u16) -> BytesMut {
    let mut out = BytesMut::new();
    let at_least_once = from.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce;
    match version {
        Version::V4 => {
            let qos = if at_least_once {
                rumqttc::mqttbytes::QoS::AtLeastOnce
            } else {
                rumqttc::mqttbytes::QoS::AtMostOnce
            };
            let mut packet = v4::Publish::from_bytes(
                String::from_utf8_lossy(&from.topic),
                qos,
                from.payload.clone(),
            );
            packet.pkid = if at_least_once { pkid } else { 0 };
            packet.retain = from.retain;
            packet.dup = from.dup && at_least_once;
            packet.write(&mut out).expect("a PUBLISH always encodes");
        }
        Version::V5 => {
            let mut packet = from.clone();
            packet.dup = from.dup && at_least_once;
            packet.pkid = if at_least_once { pkid } else { 0 };
            if at_least_once {
                packet.qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            }
            if let Some(properties) = packet.properties.as_mut() {
                // Aliases and subscription ids are the upstream connection's own.
                properties.topic_alias = None;
                properties.subscription_identifiers.clear();
            }
            v5::Packet::Publish(packet)
                .write(&mut out, None)
                .expect("a PUBLISH always encodes");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    fn connect_v4(client_id: &str) -> BytesMut {
        let mut out = BytesMut::new();
        let mut connect = v4::Connect::new(client_id);
        connect.set_login("user?SDK=Python&Version=1.0", "token");
        v4::Packet::Connect(connect)
            .write(&mut out, 1 << 20)
            .unwrap();
        out
    }

    fn connect_v5(client_id: &str) -> BytesMut {
        let mut out = BytesMut::new();
        let mut properties = v5::ConnectProperties::new();
        properties.receive_maximum = Some(7);
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: client_id.to_string(),
            clean_start: false,
            properties: Some(properties),
        };
        v5::Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .unwrap();
        out
    }

    #[test]
    fn the_version_comes_from_the_connect_and_each_reader_gets_its_own() {
        let mut v4_bytes = connect_v4("dev-1");
        assert_eq!(detect_version(&v4_bytes), Ok(Some(Version::V4)));
        match read(Version::V4, &mut v4_bytes, 1 << 20) {
            Ok(Some(Incoming::Connect(connect))) => {
                assert_eq!(connect.client_id, "dev-1");
                assert_eq!(connect.password.as_deref(), Some("token"));
            }
            other => panic!("{other:?}"),
        }
        let mut v5_bytes = connect_v5("dev-2");
        assert_eq!(detect_version(&v5_bytes), Ok(Some(Version::V5)));
        match read(Version::V5, &mut v5_bytes, 1 << 20) {
            Ok(Some(Incoming::Connect(connect))) => {
                assert_eq!(connect.client_id, "dev-2");
                assert_eq!(connect.receive_maximum, Some(7));
                assert!(!connect.clean);
            }
            other => panic!("{other:?}"),
        }
        // Half a CONNECT: wait for more.
        let whole = connect_v4("dev-3");
        assert_eq!(detect_version(&whole[..5]), Ok(None));
        let mut half = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(read(Version::V4, &mut half, 1 << 20), Ok(None));
        // Not a CONNECT, or one with flags: malformed (closed, no CONNACK).
        for first in [&b"\x30\x02\x00\x00"[..], b"\x12\x02\x00\x00"] {
            assert!(matches!(
                detect_version(first),
                Err(CodecError::Malformed(_))
            ));
        }
    }

    /// Packets with flags their type may not have, and a SUBSCRIBE or UNSUBSCRIBE with no
    /// filter, are malformed (the fuzz target found an UNSUBSCRIBE `0xaa` with none,
    /// answered with an UNSUBACK of no reason codes, itself malformed in MQTT 5).
    #[test]
    fn wrong_flags_and_empty_filter_lists_are_malformed() {
        for version in [Version::V4, Version::V5] {
            let property = if version == Version::V5 {
                &b"\x00"[..]
            } else {
                b""
            };
            let mut unsubscribe = BytesMut::from(&b"\xaa\x06\x00\x01"[..]);
            unsubscribe.extend_from_slice(property);
            unsubscribe.extend_from_slice(b"\x00\x01x");
            unsubscribe[1] = (unsubscribe.len() - 2) as u8;
            let mut empty = BytesMut::from(&b"\xa2\x02\x00\x01"[..]);
            empty.extend_from_slice(property);
            empty[1] = (empty.len() - 2) as u8;
            for (what, mut bytes) in [
                ("flags", unsubscribe),
                ("empty", empty),
                ("ping", BytesMut::from(&b"\xc1\x00"[..])),
            ] {
                assert!(
                    matches!(
                        read(version, &mut bytes, 1024),
                        Err(CodecError::Malformed(_))
                    ),
                    "{what} {version:?}"
                );
            }
        }
        assert!(flags_allowed(0x3b) && !flags_allowed(0x36) && flags_allowed(0x62));
    }

    #[test]
    fn the_two_byte_disconnect_and_oversized_packets() {
        let mut bytes = BytesMut::from(&b"\xe0\x00"[..]);
        assert_eq!(
            read(Version::V5, &mut bytes, 100),
            Ok(Some(Incoming::Disconnect { with_will: false }))
        );
        assert!(bytes.is_empty());
        let mut big = BytesMut::from(&b"\x30\xff\xff\x03"[..]);
        assert_eq!(
            read(Version::V5, &mut big, 1000),
            Err(CodecError::TooLarge(127 + (127 << 7) + (3 << 14)))
        );
    }

    #[test]
    fn a_v5_publish_brings_its_properties_as_attributes() {
        let properties = v5::PublishProperties {
            content_type: Some("application/json".to_string()),
            message_expiry_interval: Some(60),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![("k".to_string(), "v".to_string())],
            ..Default::default()
        };
        let mut packet = v5::Publish::new(
            "a/b",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            b"{}".to_vec(),
            Some(properties),
        );
        packet.pkid = 9;
        let mut bytes = BytesMut::new();
        v5::Packet::Publish(packet).write(&mut bytes, None).unwrap();
        let Ok(Some(Incoming::Publish(publish))) = read(Version::V5, &mut bytes, 1 << 20) else {
            panic!("not a publish");
        };
        assert_eq!(publish.pkid, 9);
        assert_eq!(publish.qos, 1);
        assert_eq!(
            publish.properties.content_type.as_deref(),
            Some("application/json")
        );
        let attributes: std::collections::BTreeMap<_, _> =
            publish.properties.attributes.iter().cloned().collect();
        assert_eq!(attributes["mqtt.message_expiry"], "60");
        assert_eq!(attributes["mqtt.correlation_data"], "AQI=");
        use base64::Engine as _;
        let users = base64::engine::general_purpose::STANDARD
            .decode(&attributes["mqtt.user_properties"])
            .unwrap();
        assert_eq!(users, br#"[{"k":"v"}]"#);
    }

    /// A 5.0 topic that is not UTF-8 is a malformed packet (0x81), not a topic with
    /// U+FFFD in it; a topic alias, where the gateway announced none, is 0x94.
    #[test]
    fn a_topic_not_utf8_and_a_topic_alias_end_the_connection() {
        let publish = |topic: &[u8], properties: Option<v5::PublishProperties>| {
            let mut packet = v5::Publish::new(
                "x",
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                b"{}".to_vec(),
                properties,
            );
            packet.topic = Bytes::copy_from_slice(topic);
            let mut bytes = BytesMut::new();
            v5::Packet::Publish(packet).write(&mut bytes, None).unwrap();
            read(Version::V5, &mut bytes, 1 << 20)
        };
        let error = publish(b"a/\xff", None).unwrap_err();
        assert_eq!(error.reason_code(), DisconnectReasonCode::MalformedPacket);
        let aliased = v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        let error = publish(b"a/b", Some(aliased)).unwrap_err();
        assert_eq!(error, CodecError::TopicAlias);
        assert_eq!(error.reason_code(), DisconnectReasonCode::TopicAliasInvalid);
        assert!(matches!(
            publish(b"a/b", None),
            Ok(Some(Incoming::Publish(_)))
        ));
    }

    /// A DISCONNECT reads back with rumqttc's reader (it fails on the spec's shortest
    /// form, without a property length).
    #[test]
    fn a_disconnect_reads_back() {
        let mut bytes = disconnect(DisconnectReasonCode::TopicAliasInvalid);
        match v5::Packet::read(&mut bytes, None) {
            Ok(v5::Packet::Disconnect(disconnect)) => assert_eq!(
                disconnect.reason_code,
                DisconnectReasonCode::TopicAliasInvalid
            ),
            other => panic!("{other:?}"),
        }
    }

    /// An accepting MQTT 5 CONNACK announces the gateway's limits and the keep-alive it
    /// holds the client to; a refusal only its reason (a receive maximum of 0 would be a
    /// protocol error). An UNSUBACK answers each filter.
    #[test]
    fn connacks_and_unsubacks_say_what_they_must() {
        let accepted = Accepted {
            receive_maximum: 100,
            max_packet: 4096,
            keep_alive: 1200,
            assigned_client_id: Some("dev-1".to_string()),
            ..Accepted::default()
        };
        let mut ack = connack(Version::V5, ConnAckCode::Accepted, accepted, None, None);
        match v5::Packet::read(&mut ack, None) {
            Ok(v5::Packet::ConnAck(ack)) => {
                let properties = ack.properties.unwrap();
                assert_eq!(properties.receive_max, Some(100));
                assert_eq!(properties.max_packet_size, Some(4096));
                assert_eq!(properties.server_keep_alive, Some(1200));
                assert_eq!(
                    properties.assigned_client_identifier.as_deref(),
                    Some("dev-1")
                );
                assert_eq!(properties.shared_subscription_available, Some(0));
            }
            other => panic!("{other:?}"),
        }
        let mut refused = connack(
            Version::V5,
            ConnAckCode::NotAuthorized,
            Accepted::default(),
            Some("no"),
            None,
        );
        match v5::Packet::read(&mut refused, None) {
            Ok(v5::Packet::ConnAck(ack)) => {
                let properties = ack.properties.unwrap();
                assert_eq!(properties.receive_max, None);
                assert_eq!(properties.reason_string.as_deref(), Some("no"));
            }
            other => panic!("{other:?}"),
        }
        let mut unsub = unsuback(Version::V5, 3, 2);
        match v5::Packet::read(&mut unsub, None) {
            Ok(v5::Packet::UnsubAck(ack)) => {
                assert_eq!(ack.pkid, 3);
                assert_eq!(ack.reasons.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(&unsuback(Version::V4, 3, 2)[..], b"\xb0\x02\x00\x03");
    }

    /// A reason string is short and clean whatever it quotes: a refusal naming a 70 KB
    /// topic with a NUL in it still makes a well-formed PUBACK (its length used to wrap
    /// at 65,535 and the NUL went out as it was).
    #[test]
    fn reason_strings_are_bounded_and_clean() {
        let why = format!("topic `a\0b{}`: too long", "é".repeat(35_000));
        let mut ack = puback(
            Version::V5,
            9,
            PubAckReason::TopicNameInvalid,
            Some(&why),
            None,
        );
        match v5::Packet::read(&mut ack, None) {
            Ok(v5::Packet::PubAck(ack)) => {
                let reason = ack.properties.unwrap().reason_string.unwrap();
                assert!(reason.len() <= MAX_REASON_BYTES, "{}", reason.len());
                assert!(reason.starts_with("topic `a?b"), "{reason}");
                assert!(reason.ends_with('…'), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(ack.is_empty(), "one packet, nothing left over");
        assert_eq!(reason_string("short"), "short");
    }

    /// A reason string never takes an answer past the client's Maximum Packet Size: it is
    /// left out (MQTT 5 §3.4.2.2.2), the answer kept.
    #[test]
    fn reason_strings_are_left_out_past_the_clients_maximum_packet_size() {
        let why = "the topic has 9 slashes, over IoT Core's limit of 7";
        let reason = |packet: v5::Packet| match packet {
            v5::Packet::PubAck(ack) => ack.properties.and_then(|p| p.reason_string),
            v5::Packet::SubAck(ack) => ack.properties.and_then(|p| p.reason_string),
            v5::Packet::ConnAck(ack) => ack.properties.and_then(|p| p.reason_string),
            other => panic!("{other:?}"),
        };
        let refused = Err(SubscribeReasonCode::NotAuthorized);
        for limit in [None, Some(20), Some(1000)] {
            let answers = [
                puback(
                    Version::V5,
                    1,
                    PubAckReason::TopicNameInvalid,
                    Some(why),
                    limit,
                ),
                suback(Version::V5, 1, &[refused], Some(why), limit),
                connack(
                    Version::V5,
                    ConnAckCode::NotAuthorized,
                    Accepted::default(),
                    Some(why),
                    limit,
                ),
            ];
            for mut answer in answers {
                let fits = limit.is_none_or(|limit| answer.len() <= limit as usize);
                assert!(fits, "{} bytes, limit {limit:?}", answer.len());
                let packet = v5::Packet::read(&mut answer, None).unwrap();
                let expected = (limit != Some(20)).then(|| why.to_string());
                assert_eq!(reason(packet), expected, "limit {limit:?}");
            }
        }
    }

    #[test]
    fn pubacks_carry_their_reason_in_v5() {
        assert_eq!(
            &puback(
                Version::V4,
                7,
                PubAckReason::NotAuthorized,
                Some("no"),
                None
            )[..],
            b"\x40\x02\x00\x07"
        );
        let mut ack = puback(
            Version::V5,
            7,
            PubAckReason::NotAuthorized,
            Some("denied"),
            None,
        );
        for reason in [
            PubAckReason::Success,
            PubAckReason::QuotaExceeded,
            PubAckReason::PayloadFormatInvalid,
        ] {
            // rumqttc reads back the byte `puback_code` says it is.
            let mut bytes = puback(Version::V5, 1, reason, Some("why"), None);
            assert_eq!(bytes[4], puback_code(reason), "{reason:?}");
            assert!(
                matches!(v5::Packet::read(&mut bytes, None), Ok(v5::Packet::PubAck(a)) if a.reason == reason)
            );
        }
        match v5::Packet::read(&mut ack, None) {
            Ok(v5::Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, 7);
                assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized);
                assert_eq!(
                    ack.properties.unwrap().reason_string.as_deref(),
                    Some("denied")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// Random and mutated bytes never panic the reader and never make it allocate past
    /// the size limit (it refuses from the fixed header).
    #[test]
    fn random_and_mutated_packets_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seeds: Vec<BytesMut> = vec![connect_v4("seed"), connect_v5("seed")];
        let mut publish = BytesMut::new();
        let mut p = v5::Publish::new(
            "t/1",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            vec![1, 2, 3],
            None,
        );
        p.pkid = 1;
        v5::Packet::Publish(p).write(&mut publish, None).unwrap();
        seeds.push(publish);
        for round in 0..20_000 {
            let mut bytes = if round % 3 == 0 {
                let len = rng.random_range(0..64);
                BytesMut::from(&(0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()[..])
            } else {
                let mut bytes = seeds[round % seeds.len()].clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
                bytes
            };
            let _ = detect_version(&bytes);
            for version in [Version::V4, Version::V5] {
                let mut copy = bytes.clone();
                for _ in 0..4 {
                    match read(version, &mut copy, 4096) {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            }
            bytes.clear();
        }
    }
}
