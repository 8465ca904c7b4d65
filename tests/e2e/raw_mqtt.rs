//! MQTT packets written byte by byte, for the tests that need what no client library
//! sends (or must see exactly what the gateway answers).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

pub use rumqttc::v5::mqttbytes::v5::Packet as Packet5;

use crate::harness::Gateway;

/// An MQTT packet: `header` byte, the remaining length, `body`.
pub fn mqtt_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![header];
    let mut length = body.len();
    loop {
        let byte = (length % 128) as u8;
        length /= 128;
        packet.push(if length > 0 { byte | 0x80 } else { byte });
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(body);
    packet
}

/// A clean-session CONNECT with a 60 s keep-alive, MQTT `version` 4 (3.1.1) or 5 (with
/// `properties`).
pub fn mqtt_connect(version: u8, client_id: &str, properties: &[u8]) -> Vec<u8> {
    let mut body = mqtt_string("MQTT");
    body.extend_from_slice(&[version, 0x02, 0, 60]);
    if version == 5 {
        body.push(properties.len() as u8);
        body.extend_from_slice(properties);
    }
    body.extend(mqtt_string(client_id));
    mqtt_packet(0x10, &body)
}

/// An MQTT string: its length, then its bytes.
pub fn mqtt_string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// An MQTT 5 SUBSCRIBE, packet id `pkid`, of `filter` at QoS 1, without properties.
pub fn raw_subscribe(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    body.extend(mqtt_string(filter));
    body.push(1);
    mqtt_packet(0x82, &body)
}

/// A QoS `qos` PUBLISH of `{}` on `topic` (raw bytes), with `properties`.
pub fn raw_publish(topic: &[u8], qos: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend_from_slice(&1u16.to_be_bytes());
    }
    body.push(properties.len() as u8);
    body.extend_from_slice(properties);
    body.extend_from_slice(b"{}");
    mqtt_packet(0x30 | (qos << 1), &body)
}

/// A raw MQTT 5 connection over `[mqtt] listen`, reading packets with rumqttc's reader.
pub struct RawMqtt {
    stream: TcpStream,
    buffer: bytes::BytesMut,
}

impl RawMqtt {
    pub fn connect(gateway: &Gateway, client_id: &str, properties: &[u8]) -> (RawMqtt, Packet5) {
        let address = gateway.mqtt.trim_start_matches("mqtt://");
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = RawMqtt {
            stream,
            buffer: bytes::BytesMut::new(),
        };
        raw.send(&mqtt_connect(5, client_id, properties));
        let connack = raw.next().expect("a CONNACK");
        (raw, connack)
    }

    pub fn send(&mut self, packet: &[u8]) {
        self.stream.write_all(packet).unwrap();
    }

    /// The next packet, `None` once the gateway closed the connection.
    pub fn next(&mut self) -> Option<Packet5> {
        loop {
            if let Ok(packet) = Packet5::read(&mut self.buffer, None) {
                return Some(packet);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(error) => panic!("no answer: {error}"),
            }
        }
    }

    /// Whether nothing came (no packet, no close) for `wait`.
    pub fn quiet_for(&mut self, wait: Duration) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 4096];
        let quiet = match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                false
            }
            Err(error) => matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        quiet
    }
}
