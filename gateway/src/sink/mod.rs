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

/// A sink: takes records and answers once each is confirmed or refused for good (with
/// the refused ones), or fails the whole call (the spool sends them again).
pub trait Sink: Send + Sync {
    /// Delivers `records`.
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_>;
}

/// Every configured sink, with the local sink standing in for the missing ones: the one
/// place that knows which sink delivers what.
pub struct Sinks {
    /// Per [`SinkId`] (by [`SinkId::index`]), the sink that delivers its queue.
    by_id: [Arc<dyn Sink>; 3],
    /// Which cloud sinks are configured (the others' destinations go to the local sink).
    configured: [bool; 3],
}

impl Sinks {
    /// The local sink, and the cloud sinks that are configured.
    pub fn new(
        local: Arc<local::LocalSink>,
        kinesis: Option<Arc<dyn Sink>>,
        iot_core: Option<Arc<dyn Sink>>,
    ) -> Sinks {
        let configured = [kinesis.is_some(), iot_core.is_some(), true];
        let local: Arc<dyn Sink> = local;
        Sinks {
            by_id: [
                kinesis.unwrap_or_else(|| local.clone()),
                iot_core.unwrap_or_else(|| local.clone()),
                local,
            ],
            configured,
        }
    }

    /// The sink that delivers to `destination`; `None` for `drop` and `dead-letter`,
    /// which no sink delivers.
    pub fn sink_for(&self, destination: &Destination) -> Option<SinkId> {
        let wanted = match destination {
            Destination::Kinesis { .. } => SinkId::Kinesis,
            Destination::IotCore { .. } => SinkId::IotCore,
            Destination::Local => SinkId::Local,
            Destination::Drop | Destination::DeadLetter => return None,
        };
        Some(if self.configured[wanted.index()] {
            wanted
        } else {
            SinkId::Local
        })
    }

    /// Delivers `records` through `sink`; resolves once every one is confirmed or
    /// refused for good, with the refused ones.
    pub async fn deliver_to(
        &self,
        sink: SinkId,
        records: Vec<Record>,
    ) -> Result<Vec<Rejected>, SinkError> {
        self.by_id[sink.index()].deliver(records).await
    }
}
