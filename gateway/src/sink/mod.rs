//! Delivery. A sink takes routed records and confirms them; the device is acknowledged
//! only after that confirmation.
//!
//! - [`local`]: JSON Lines files under the data directory, one per destination: the
//!   embedded default, standing in for IoT Core and Kinesis when they are not
//!   configured, and the dead-letter store.
//! - [`kinesis`]: Kinesis Data Streams (`PutRecords`).
//! - [`iot_core`]: AWS IoT Core over MQTT or HTTPS.
//!
//! [`Sinks`] sends each record to the sink for its destination. A record a cloud sink
//! refuses for good goes to the dead-letter store with the sink's reason, never
//! silently away.

pub mod iot_core;
pub mod kinesis;
pub mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::message::Message;
use crate::route::{Decision, Destination};

/// A message with its routing decision, ready for delivery.
pub struct Record {
    /// The message as the plugins left it.
    pub message: Message,
    /// Where it goes, and why.
    pub decision: Decision,
}

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

/// Somewhere routed records go.
pub trait Sink: Send + Sync {
    /// Delivers `records`; resolves once every one is confirmed or refused. The
    /// result lists where refused records ended up instead (message id, new decision).
    fn deliver(
        &self,
        records: Vec<Record>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Redirect>, SinkError>> + Send + '_>>;
}

/// A record that went somewhere else than routed: refused by its sink, dead-lettered.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// The message id.
    pub id: String,
    /// The decision that now applies.
    pub decision: Decision,
}

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
    /// Files: `local` destinations, the dead-letter store, and stand-ins.
    pub local: Arc<local::LocalSink>,
    /// Kinesis, when configured.
    pub kinesis: Option<kinesis::KinesisSink>,
    /// IoT Core, when configured.
    pub iot_core: Option<IotCoreSink>,
}

impl Sink for Sinks {
    fn deliver(
        &self,
        records: Vec<Record>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Redirect>, SinkError>> + Send + '_>> {
        Box::pin(async move {
            let mut to_kinesis = Vec::new();
            let mut to_iot_core = Vec::new();
            let mut to_files = Vec::new();
            for record in records {
                match (&record.decision.destination, &self.kinesis, &self.iot_core) {
                    (Destination::Kinesis { .. }, Some(_), _) => to_kinesis.push(record),
                    (Destination::IotCore { .. }, _, Some(_)) => to_iot_core.push(record),
                    _ => to_files.push(record),
                }
            }
            let kinesis = async {
                match &self.kinesis {
                    Some(sink) if !to_kinesis.is_empty() => sink.deliver(to_kinesis).await,
                    _ => Ok(Vec::new()),
                }
            };
            let iot_core = async {
                match &self.iot_core {
                    Some(sink) if !to_iot_core.is_empty() => sink.deliver(to_iot_core).await,
                    _ => Ok(Vec::new()),
                }
            };
            let (kinesis, iot_core) = tokio::join!(kinesis, iot_core);
            let mut redirects = Vec::new();
            for rejected in kinesis?.into_iter().chain(iot_core?) {
                let sink = rejected.record.decision.destination.kind();
                let decision = Decision {
                    destination: Destination::DeadLetter,
                    rule: format!("sink:{sink}"),
                    reason: rejected.reason,
                };
                redirects.push(Redirect {
                    id: rejected.record.message.id.clone(),
                    decision: decision.clone(),
                });
                to_files.push(Record {
                    message: rejected.record.message,
                    decision,
                });
            }
            if !to_files.is_empty() {
                self.local.write(to_files).await?;
            }
            Ok(redirects)
        })
    }
}
