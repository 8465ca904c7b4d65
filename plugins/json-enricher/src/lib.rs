//! Validates JSON payloads and adds the sending device's id and the receive time.
//!
//! Configuration (all optional):
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `on_invalid` | `fail` | what to do with a payload that is not valid JSON: `fail` (refuse it, with the parse error as reason) or `drop` (discard it silently) |
//! | `device_field` | `device_id` | name of the field that receives the device id |
//! | `time_field` | `received_at_ms` | name of the field that receives the receive time (ms since the Unix epoch) |
//!
//! An object payload gets the two fields added (replacing fields of the same name); any
//! other JSON value is wrapped as `{"value": …}` with the two fields beside it.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sluice_sdk::{Config, Message, Outcome, Transform};

/// What to do with a payload that is not valid JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnInvalid {
    Fail,
    Drop,
}

struct Enricher {
    on_invalid: OnInvalid,
    device_field: String,
    time_field: String,
    /// `"<device_field>":` and `"<time_field>":`, JSON-escaped once at init.
    device_key: String,
    time_key: String,
}

impl Transform for Enricher {
    fn init(config: &Config) -> Result<Self, String> {
        let on_invalid = match config.get_or("on_invalid", "fail") {
            "fail" => OnInvalid::Fail,
            "drop" => OnInvalid::Drop,
            other => {
                return Err(format!(
                    "config `on_invalid` must be `fail` or `drop`, not `{other}`"
                ));
            }
        };
        let device_field = config.get_or("device_field", "device_id").to_string();
        let time_field = config.get_or("time_field", "received_at_ms").to_string();
        if device_field == time_field {
            return Err("config `device_field` and `time_field` must differ".to_string());
        }
        Ok(Enricher {
            on_invalid,
            device_key: format!("{}:", json_string(&device_field)),
            time_key: format!("{}:", json_string(&time_field)),
            device_field,
            time_field,
        })
    }

    fn transform(&mut self, mut message: Message) -> Outcome {
        let probe = Probe {
            device_field: &self.device_field,
            time_field: &self.time_field,
        };
        let mut parser = serde_json::Deserializer::from_slice(&message.payload);
        let shape = probe
            .deserialize(&mut parser)
            .and_then(|shape| parser.end().map(|()| shape));
        let enriched = match shape {
            Ok(Shape::Object {
                empty,
                collides: false,
            }) => self.splice(&message, empty),
            Ok(_) => self.rebuild(&message),
            Err(error) => {
                sluice_sdk::counter_add("invalid_json", 1);
                return match self.on_invalid {
                    OnInvalid::Fail => Outcome::Fail(format!("payload is not valid JSON: {error}")),
                    OnInvalid::Drop => Outcome::Drop,
                };
            }
        };
        message.payload = enriched;
        message.content_type = "application/json".to_string();
        Outcome::Keep(message)
    }
}

impl Enricher {
    /// The fast path: inserts the two fields right after the object's opening brace,
    /// without building a tree of the payload.
    fn splice(&self, message: &Message, empty: bool) -> Vec<u8> {
        let payload = &message.payload;
        let brace = payload.iter().position(|&b| b == b'{').unwrap_or(0);
        let device = json_string(&message.device_id);
        let time = message.received_at_ms.to_string();
        let mut out = Vec::with_capacity(
            payload.len()
                + self.device_key.len()
                + self.time_key.len()
                + device.len()
                + time.len()
                + 3,
        );
        out.extend_from_slice(&payload[..=brace]);
        out.extend_from_slice(self.device_key.as_bytes());
        out.extend_from_slice(device.as_bytes());
        out.push(b',');
        out.extend_from_slice(self.time_key.as_bytes());
        out.extend_from_slice(time.as_bytes());
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(&payload[brace + 1..]);
        out
    }

    /// The general path: parses the payload, then replaces or wraps.
    fn rebuild(&self, message: &Message) -> Vec<u8> {
        let value: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        let mut object = match value {
            Value::Object(object) => object,
            other => {
                let mut object = serde_json::Map::new();
                object.insert("value".to_string(), other);
                object
            }
        };
        object.insert(
            self.device_field.clone(),
            Value::from(message.device_id.clone()),
        );
        object.insert(self.time_field.clone(), Value::from(message.received_at_ms));
        serde_json::to_vec(&object).unwrap_or_default()
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// The top-level shape of a payload, learnt in one validating pass.
enum Shape {
    /// A JSON object; `collides` when it already has one of the fields we add.
    Object { empty: bool, collides: bool },
    /// Any other JSON value.
    Other,
}

/// Validates a whole JSON document while looking only at its top-level keys.
struct Probe<'a> {
    device_field: &'a str,
    time_field: &'a str,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Shape, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut empty = true;
        let mut collides = false;
        while let Some(is_ours) =
            map.next_key_seed(KeyIsOneOf(self.device_field, self.time_field))?
        {
            map.next_value::<IgnoredAny>()?;
            empty = false;
            collides |= is_ours;
        }
        Ok(Shape::Object { empty, collides })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
}

/// Reads an object key and tells whether it is one of two names, without allocating.
struct KeyIsOneOf<'a>(&'a str, &'a str);

impl<'de> DeserializeSeed<'de> for KeyIsOneOf<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIsOneOf<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0 || key == self.1)
    }
}

sluice_sdk::export_transform!(Enricher);
