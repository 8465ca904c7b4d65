//! Delivery. A sink takes routed records and confirms them; the device is acknowledged
//! only after that confirmation.
//!
//! - [`local`]: JSON Lines files under the data directory, one per destination: the
//!   embedded default, standing in for IoT Core and Kinesis when no cloud is configured.

pub mod local;

use std::future::Future;
use std::pin::Pin;

use crate::message::Message;
use crate::route::Decision;

/// A message with its routing decision, ready for delivery.
pub struct Record {
    /// The message as the plugins left it.
    pub message: Message,
    /// Where it goes, and why.
    pub decision: Decision,
}

/// Why a sink could not take records.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying later (disk full, sink stopping, network).
    #[error("sink unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so sinks stay object-safe.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// Somewhere routed records go.
pub trait Sink: Send + Sync {
    /// Delivers `records`; resolves once they are safely taken.
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_>;
}
