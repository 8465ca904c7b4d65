//! The message record every step shares.
//!
//! It is the WIT `message` record itself, as generated for the host, so handing a batch
//! to a plugin costs no conversion on the gateway's side.

pub use crate::wit::sluice::plugin::types::Message;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new message id: a UUIDv7, so ids sort by receive time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
