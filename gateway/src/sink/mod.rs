//! Delivery. A sink takes routed records and confirms them; the device is acknowledged
//! only after that confirmation.
//!
//! - [`local`]: JSON Lines files under the data directory, one per destination: the
//!   embedded default, standing in for IoT Core and Kinesis when they are not
//!   configured.
//! - [`kinesis`]: Kinesis Data Streams (`PutRecords`).
//! - [`iot_core`]: AWS IoT Core over MQTT or HTTPS.
//!
//! [`Sinks`] names the sink for each destination and delivers through it; records reach
//! it from the [`crate::spool`], which turns records a sink refuses for good into dead
//! letters with the sink's reason, never silently dropping them.

pub mod iot_core;
pub mod kinesis;
pub mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::record::{Record, SinkId};
use crate::route::Destination;

/// A record a sink refused for good.
pub struct Rejected {
    /// The record.
    pub record: Record,
    /// The sink's reason.
    pub reason: String,
}

/// Why a sink could not take records.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying later (disk full, sink stopping, network, throttling).
    #[error("sink unavailable: {0}")]
    Unavailable(String),
}

/// A sink's answer: the records it refused for good.
pub type SinkFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Rejected>, SinkError>> + Send + 'a>>;

/// The IoT Core sink, by transport.
pub enum IotCoreSink {
    /// MQTT with the gateway's certificate.
    Mqtt(Box<iot_core::mqtt::MqttSink>),
    /// HTTPS `Publish` calls.
    Https(iot_core::https::HttpsSink),
}

impl IotCoreSink {
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        match self {
            IotCoreSink::Mqtt(sink) => sink.deliver(records),
            IotCoreSink::Https(sink) => sink.deliver(records),
        }
    }
}

/// Every configured sink, with the local sink standing in for the missing ones.
pub struct Sinks {
    /// Files: `local` destinations and stand-ins.
    pub local: Arc<local::LocalSink>,
    /// Kinesis, when configured.
    pub kinesis: Option<kinesis::KinesisSink>,
    /// IoT Core, when configured.
    pub iot_core: Option<IotCoreSink>,
}

impl Sinks {
    /// The sink that delivers to `destination`; `None` for `drop` and `dead-letter`,
    /// which no sink delivers.
    pub fn sink_for(&self, destination: &Destination) -> Option<SinkId> {
        match destination {
            Destination::Kinesis { .. } if self.kinesis.is_some() => Some(SinkId::Kinesis),
            Destination::IotCore { .. } if self.iot_core.is_some() => Some(SinkId::IotCore),
            Destination::Kinesis { .. } | Destination::IotCore { .. } | Destination::Local => {
                Some(SinkId::Local)
            }
            Destination::Drop | Destination::DeadLetter => None,
        }
    }

    /// Delivers `records` through `sink`; resolves once every one is confirmed or
    /// refused for good, with the refused ones.
    pub async fn deliver_to(
        &self,
        sink: SinkId,
        records: Vec<Record>,
    ) -> Result<Vec<Rejected>, SinkError> {
        match (sink, &self.kinesis, &self.iot_core) {
            (SinkId::Kinesis, Some(kinesis), _) => kinesis.deliver(records).await,
            (SinkId::IotCore, _, Some(iot_core)) => iot_core.deliver(records).await,
            _ => self.local.write(records).await.map(|()| Vec::new()),
        }
    }
}
