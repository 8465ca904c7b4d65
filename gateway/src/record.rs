//! What travels from routing to delivery: a message with its routing decision
//! ([`Record`]), and the sink that delivers it ([`SinkId`]). Shared by the spool, which
//! keeps records per sink, and the sinks, which deliver them.

use serde::Serialize;

use crate::message::Message;
use crate::route::Decision;

/// A message with its routing decision, ready for delivery.
pub struct Record {
    /// The message as the plugins left it.
    pub message: Message,
    /// Where it goes, and why.
    pub decision: Decision,
}

/// The sinks that have a queue in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkId {
    /// Kinesis Data Streams.
    Kinesis,
    /// AWS IoT Core.
    IotCore,
    /// The local sink (files), including stand-ins for unconfigured cloud sinks.
    Local,
}

impl SinkId {
    /// Every sink, in table order.
    pub const ALL: [SinkId; 3] = [SinkId::Kinesis, SinkId::IotCore, SinkId::Local];

    /// `kinesis`, `iot-core` or `local`.
    pub fn name(self) -> &'static str {
        match self {
            SinkId::Kinesis => "kinesis",
            SinkId::IotCore => "iot-core",
            SinkId::Local => "local",
        }
    }

    /// The sink's place in [`SinkId::ALL`], for per-sink arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}
