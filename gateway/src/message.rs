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
    // Encoded straight into a buffer: `to_string` goes through `fmt` (two ids a request).
    let mut text = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut text)
        .to_string()
}

/// The attributes that carry a message's MQTT 5 publish properties, under the names of
/// IoT Core's HTTPS publish parameters: every protocol fills them alike, and the routing
/// and the sinks read them.
pub mod attribute {
    /// MQTT's retain flag (`true`).
    pub const RETAIN: &str = "mqtt.retain";
    /// The response topic.
    pub const RESPONSE_TOPIC: &str = "mqtt.response_topic";
    /// The correlation data, in base64.
    pub const CORRELATION_DATA: &str = "mqtt.correlation_data";
    /// The message expiry, in seconds.
    pub const MESSAGE_EXPIRY: &str = "mqtt.message_expiry";
    /// `UNSPECIFIED_BYTES` or `UTF8_DATA`.
    pub const PAYLOAD_FORMAT_INDICATOR: &str = "mqtt.payload_format_indicator";
    /// The user properties: base64 of a JSON list of one-key objects.
    pub const USER_PROPERTIES: &str = "mqtt.user_properties";
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_id_is_a_lowercase_hyphenated_uuid_v7_later_ids_sorting_after() {
        let first = super::new_id();
        let second = super::new_id();
        let parsed = uuid::Uuid::parse_str(&first).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(first, parsed.hyphenated().to_string());
        assert_eq!(first, first.to_lowercase());
        assert!(second > first, "{first} then {second}");
    }
}
