//! Conveniences on the WIT `message` record.

use crate::Message;

impl Message {
    /// The value of attribute `key`, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets attribute `key` to `value`, replacing an earlier value.
    pub fn set_attribute(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.attributes.push((key, value)),
        }
    }

    /// The payload as UTF-8 text, if it is.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// A copy of this message's metadata with another payload, for building the parts of
    /// a split. The copy has an empty id, so the gateway numbers it `<id>-<index>`.
    pub fn derive(&self, payload: Vec<u8>) -> Message {
        Message {
            id: String::new(),
            device_id: self.device_id.clone(),
            topic: self.topic.clone(),
            content_type: self.content_type.clone(),
            qos: self.qos,
            attributes: self.attributes.clone(),
            received_at_ms: self.received_at_ms,
            payload,
        }
    }
}
