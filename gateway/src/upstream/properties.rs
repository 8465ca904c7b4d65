//! A message's MQTT 5 properties as a publish at the endpoint carries them: its content
//! type, and the `mqtt.*` attributes its protocol wrote (an MQTT 5 PUBLISH's properties,
//! the HTTPS API's query parameters), in the forms IoT Core's HTTPS API takes them.

use base64::Engine as _;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::message::attribute;

/// The publish properties of a message with `content_type` (empty: none) and
/// `attributes`; `None` when it has none.
pub fn of(
    content_type: Option<&str>,
    attributes: &[(String, String)],
) -> Option<PublishProperties> {
    let decode = |text: &str| base64::engine::general_purpose::STANDARD.decode(text).ok();
    let mut out = PublishProperties {
        content_type: content_type.filter(|c| !c.is_empty()).map(str::to_string),
        ..Default::default()
    };
    for (key, value) in attributes {
        match key.as_str() {
            attribute::RESPONSE_TOPIC => out.response_topic = Some(value.clone()),
            attribute::CORRELATION_DATA => out.correlation_data = decode(value).map(Bytes::from),
            attribute::MESSAGE_EXPIRY => out.message_expiry_interval = value.parse().ok(),
            attribute::PAYLOAD_FORMAT_INDICATOR => {
                out.payload_format_indicator = Some(u8::from(value == "UTF8_DATA"));
            }
            attribute::USER_PROPERTIES => {
                let pairs: Vec<serde_json::Map<String, serde_json::Value>> = decode(value)
                    .and_then(|json| serde_json::from_slice(&json).ok())
                    .unwrap_or_default();
                out.user_properties = pairs
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                    .collect();
            }
            _ => {}
        }
    }
    (out != PublishProperties::default()).then_some(out)
}
