//! What travels from routing to delivery: a message with its routing decision
//! ([`Record`]), and the sink that delivers it ([`SinkId`]). Shared by the spool, which
//! keeps records per sink ([`PerSink`]), and the sinks, which deliver them.

use std::ops::{Index, IndexMut};

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

    /// The sink's number in the spool's files (its place in [`SinkId::ALL`]).
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// One `T` per sink, looked up by [`SinkId`].
#[derive(Debug, Default, Clone)]
pub struct PerSink<T>([T; 3]);

impl<T> PerSink<T> {
    /// Each sink's value, made by `make`.
    pub fn from_fn(mut make: impl FnMut(SinkId) -> T) -> PerSink<T> {
        PerSink(SinkId::ALL.map(&mut make))
    }

    /// Each sink with its value, in [`SinkId::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (SinkId, &T)> {
        SinkId::ALL.into_iter().zip(&self.0)
    }

    /// A reference to each sink's value.
    pub fn each_ref(&self) -> PerSink<&T> {
        PerSink(self.0.each_ref())
    }

    /// Each sink's value through `f`.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerSink<U> {
        PerSink(self.0.map(f))
    }
}

impl<T> Index<SinkId> for PerSink<T> {
    type Output = T;

    fn index(&self, sink: SinkId) -> &T {
        &self.0[sink as usize]
    }
}

impl<T> IndexMut<SinkId> for PerSink<T> {
    fn index_mut(&mut self, sink: SinkId) -> &mut T {
        &mut self.0[sink as usize]
    }
}
