//! Delivery. A sink takes routed records and confirms them; a record leaves the spool
//! only after that confirmation. (The device was acknowledged earlier, once its message
//! was in the spool; on a best-effort route, once it was handed over.)
//!
//! - [`local`]: JSON Lines files under the data directory, one per destination: the
//!   embedded default, standing in for IoT Core and Kinesis when they are not
//!   configured.
//! - [`kinesis`]: Kinesis Data Streams (`PutRecords`).
//! - [`iot_core`]: AWS IoT Core over MQTT or HTTPS.
//!
//! [`Sinks`] names the sink for each destination and delivers through it; records reach
//! it from the [`crate::spool`] (its delivery tasks, and its best-effort hand-over), which
//! turns records a sink refuses for good into dead letters with the sink's reason, never
//! silently dropping them.

pub mod aws;
pub mod iot_core;
pub mod kinesis;
pub mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::{Config, IotTransport};
use crate::record::{PerSink, Record, SinkId};
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
    by_id: PerSink<Arc<dyn Sink>>,
    /// Which cloud sinks are configured (the others' destinations go to the local sink).
    configured: PerSink<bool>,
    /// The local sink itself, written to directly (see `spool::direct`).
    local: Arc<local::LocalSink>,
}

impl Sinks {
    /// The sinks `config` configures, each built from its own section, around the local
    /// sink (which stands in for the others); IoT Core's through the devices' own
    /// sessions at `upstream` first.
    pub async fn build(
        config: &Config,
        instance: &str,
        local: Arc<local::LocalSink>,
        upstream: Option<&Arc<crate::upstream::Upstream>>,
    ) -> anyhow::Result<Sinks> {
        let needs_aws = config.sinks.kinesis.is_some()
            || config
                .sinks
                .iot_core
                .as_ref()
                .is_some_and(|iot| iot.transport == IotTransport::Https);
        let shared = match needs_aws {
            true => Some(aws::sdk_config(&config.aws).await),
            false => None,
        };
        let kinesis = match (&config.sinks.kinesis, &shared) {
            (Some(settings), Some(shared)) => {
                let max_record_bytes = config.routing.kinesis_max_record_bytes;
                let sink = kinesis::KinesisSink::build(settings, max_record_bytes, shared);
                Some(Arc::new(sink) as Arc<dyn Sink>)
            }
            _ => None,
        };
        let iot_core = match &config.sinks.iot_core {
            Some(settings) => Some(iot_core::build(
                settings,
                config.iot_core_mqtt(),
                instance,
                shared.as_ref(),
                upstream,
            )?),
            None => None,
        };
        Ok(Sinks::new(local, kinesis, iot_core))
    }

    /// The local sink, and the cloud sinks that are configured.
    pub fn new(
        local: Arc<local::LocalSink>,
        kinesis: Option<Arc<dyn Sink>>,
        iot_core: Option<Arc<dyn Sink>>,
    ) -> Sinks {
        let as_sink: Arc<dyn Sink> = local.clone();
        let chosen = |sink| match sink {
            SinkId::Kinesis => kinesis.clone(),
            SinkId::IotCore => iot_core.clone(),
            SinkId::Local => Some(as_sink.clone()),
        };
        Sinks {
            configured: PerSink::from_fn(|sink| chosen(sink).is_some()),
            by_id: PerSink::from_fn(|sink| chosen(sink).unwrap_or_else(|| as_sink.clone())),
            local,
        }
    }

    /// The local sink, which [`SinkId::Local`] names.
    pub fn local(&self) -> &local::LocalSink {
        &self.local
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
        Some(if self.configured[wanted] {
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
        self.by_id[sink].deliver(records).await
    }
}
