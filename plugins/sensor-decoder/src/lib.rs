//! Decodes compact binary sensor frames into JSON readings, one message per reading.
//!
//! # Frame layout (all integers little-endian)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 2 | magic, ASCII `SF` |
//! | 2 | 1 | version, `1` |
//! | 3 | 1 | number of readings `n`, 1 to 255 |
//! | 4 | 16 × n | the readings |
//!
//! Each 16-byte reading:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | `u64` time of measurement, ms since the Unix epoch (device clock) |
//! | 8 | 2 | `i16` temperature, hundredths of a degree Celsius |
//! | 10 | 2 | `u16` relative humidity, hundredths of a percent |
//! | 12 | 2 | `u16` battery voltage, millivolts |
//! | 14 | 1 | `u8` sensor index on the device |
//! | 15 | 1 | `u8` flags; bit 0 = battery low |
//!
//! A frame is decoded when the message's content type is one of `content_types`
//! (config, comma-separated; default `application/octet-stream` and
//! `application/vnd.sluice.sensor-frame`) or when its payload starts with the magic and
//! version. Other messages pass unchanged. A frame that is cut short, too long or of an
//! unknown version fails with a reason naming the problem.

use sluice_sdk::{Config, Message, Outcome, Transform};

/// `SF`: the first two bytes of every frame.
const MAGIC: [u8; 2] = *b"SF";
/// The only frame version this decoder knows.
const VERSION: u8 = 1;
/// Bytes before the first reading.
const HEADER_LEN: usize = 4;
/// Bytes per reading.
const READING_LEN: usize = 16;

struct Decoder {
    content_types: Vec<String>,
}

/// One decoded reading.
#[derive(Debug, PartialEq)]
struct Reading {
    time_ms: u64,
    centi_celsius: i16,
    centi_percent: u16,
    battery_mv: u16,
    sensor: u8,
    flags: u8,
}

impl Transform for Decoder {
    fn init(config: &Config) -> Result<Self, String> {
        let mut content_types: Vec<String> = config
            .get_list("content_types")
            .into_iter()
            .map(str::to_string)
            .collect();
        if content_types.is_empty() {
            content_types = vec![
                "application/octet-stream".to_string(),
                "application/vnd.sluice.sensor-frame".to_string(),
            ];
        }
        Ok(Decoder { content_types })
    }

    fn transform(&mut self, message: Message) -> Outcome {
        let declared = self.content_types.contains(&message.content_type);
        let looks_like_frame = message.payload.starts_with(&[MAGIC[0], MAGIC[1], VERSION]);
        if !declared && !looks_like_frame {
            return Outcome::Pass;
        }
        let readings = match decode(&message.payload) {
            Ok(readings) => readings,
            Err(reason) => {
                sluice_sdk::counter_add("bad_frames", 1);
                return Outcome::Fail(reason);
            }
        };
        sluice_sdk::counter_add("readings", readings.len() as u64);
        let mut parts: Vec<Message> = readings
            .iter()
            .enumerate()
            .map(|(index, reading)| {
                let mut part = message.derive(reading.to_json(&message.device_id).into_bytes());
                part.content_type = "application/json".to_string();
                part.set_attribute("sensor_frame_index", index.to_string());
                part
            })
            .collect();
        if parts.len() == 1 {
            let mut only = parts.remove(0);
            only.id = message.id;
            Outcome::Keep(only)
        } else {
            Outcome::Split(parts)
        }
    }
}

/// Decodes a whole frame, or says exactly what is wrong with it.
fn decode(frame: &[u8]) -> Result<Vec<Reading>, String> {
    if frame.len() < HEADER_LEN {
        return Err(format!(
            "sensor frame too short: {} bytes, the header alone is {HEADER_LEN}",
            frame.len()
        ));
    }
    if frame[..2] != MAGIC {
        return Err("sensor frame does not start with the magic bytes `SF`".to_string());
    }
    if frame[2] != VERSION {
        return Err(format!(
            "sensor frame version {} is not supported (only {VERSION})",
            frame[2]
        ));
    }
    let count = usize::from(frame[3]);
    if count == 0 {
        return Err("sensor frame holds no readings".to_string());
    }
    let expected = HEADER_LEN + count * READING_LEN;
    if frame.len() != expected {
        return Err(format!(
            "sensor frame announces {count} readings ({expected} bytes) but is {} bytes",
            frame.len()
        ));
    }
    Ok(frame[HEADER_LEN..]
        .chunks_exact(READING_LEN)
        .map(Reading::parse)
        .collect())
}

impl Reading {
    fn parse(bytes: &[u8]) -> Reading {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let mut time = [0u8; 8];
        time.copy_from_slice(&bytes[0..8]);
        Reading {
            time_ms: u64::from_le_bytes(time),
            centi_celsius: i16::from_le_bytes([bytes[8], bytes[9]]),
            centi_percent: u16_at(10),
            battery_mv: u16_at(12),
            sensor: bytes[14],
            flags: bytes[15],
        }
    }

    fn to_json(&self, device_id: &str) -> String {
        serde_json::json!({
            "device_id": device_id,
            "sensor": self.sensor,
            "measured_at_ms": self.time_ms,
            "temperature_c": f64::from(self.centi_celsius) / 100.0,
            "humidity_pct": f64::from(self.centi_percent) / 100.0,
            "battery_mv": self.battery_mv,
            "battery_low": self.flags & 1 == 1,
        })
        .to_string()
    }
}

sluice_sdk::export_transform!(Decoder);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(readings: &[[u8; READING_LEN]]) -> Vec<u8> {
        let mut out = vec![b'S', b'F', VERSION, readings.len() as u8];
        for reading in readings {
            out.extend_from_slice(reading);
        }
        out
    }

    fn reading(time_ms: u64, centi_celsius: i16, sensor: u8) -> [u8; READING_LEN] {
        let mut out = [0u8; READING_LEN];
        out[0..8].copy_from_slice(&time_ms.to_le_bytes());
        out[8..10].copy_from_slice(&centi_celsius.to_le_bytes());
        out[10..12].copy_from_slice(&4550u16.to_le_bytes());
        out[12..14].copy_from_slice(&3600u16.to_le_bytes());
        out[14] = sensor;
        out[15] = 1;
        out
    }

    #[test]
    fn decodes_every_reading() {
        let readings = decode(&frame(&[reading(1, -250, 0), reading(2, 2137, 1)])).unwrap();
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].centi_celsius, -250);
        assert_eq!(readings[1].time_ms, 2);
        assert_eq!(readings[1].sensor, 1);
        assert!(readings[1].to_json("d").contains("\"temperature_c\":21.37"));
    }

    #[test]
    fn refuses_bad_frames_with_a_reason() {
        let mut cut = frame(&[reading(1, 0, 0)]);
        cut.pop();
        assert!(decode(&cut).unwrap_err().contains("announces 1 readings"));
        assert!(decode(b"SF").unwrap_err().contains("too short"));
        assert!(decode(b"XX\x01\x01").unwrap_err().contains("magic"));
        assert!(decode(b"SF\x02\x01").unwrap_err().contains("version 2"));
        assert!(decode(b"SF\x01\x00").unwrap_err().contains("no readings"));
    }
}
