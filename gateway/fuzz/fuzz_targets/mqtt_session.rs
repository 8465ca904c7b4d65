//! Arbitrary bytes through the MQTT path a socket's bytes take: the transport's reads
//! (cut into chunks of a size the input's first byte chooses, so that packets split
//! across reads), the codec, the CONNECT and admission, the session with its batches
//! through the real pipeline and spool (an in-process gateway, no `[auth]`, its data in a
//! temporary directory). Beyond "no panic, no hang": every byte the gateway sends back
//! must read as whole MQTT packets of the version the CONNECT named (rumqttc's reader).

#![no_main]

use std::sync::LazyLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice_gateway::testing::{self, Fixture};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

/// One gateway for the whole run (a fresh one per input would be most of the time
/// spent). Best-effort durability: the session is what is fuzzed, not `fsync`.
static GATEWAY: LazyLock<Fixture> = LazyLock::new(|| {
    let _entered = RUNTIME.enter();
    testing::gateway(
        "[routing]\ndefault_destination = \"local\"\n[spool]\ndurability = \"best-effort\"\n",
    )
});

/// The protocol level a CONNECT at the start of `bytes` names (4: 3.1.1, 5: 5.0) with
/// the protocol name `MQTT`, read here independently of the gateway's codec. (Another
/// name gets a 3.1.1 CONNACK "unacceptable protocol version", whatever the level.)
fn connect_level(bytes: &[u8]) -> Option<u8> {
    if bytes.first()? & 0xf0 != 0x10 {
        return None;
    }
    let mut at = 1;
    while bytes.get(at)? & 0x80 != 0 {
        at += 1;
    }
    let name = u16::from_be_bytes([*bytes.get(at + 1)?, *bytes.get(at + 2)?]) as usize;
    if bytes.get(at + 3..at + 3 + name)? != b"MQTT" {
        return None;
    }
    bytes.get(at + 3 + name).copied()
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let sent = RUNTIME.block_on(GATEWAY.mqtt_connection(input, usize::from(chunk)));
    let all = sent.clone();
    let mut sent = BytesMut::from(&sent[..]);
    match connect_level(input) {
        Some(5) => {
            while !sent.is_empty() {
                if let Err(error) = rumqttc::v5::mqttbytes::v5::Packet::read(&mut sent, None) {
                    panic!("sent a malformed MQTT 5 packet: {error:?} in {all:02x?}");
                }
            }
        }
        Some(4) => {
            while !sent.is_empty() {
                if let Err(error) = rumqttc::mqttbytes::v4::Packet::read(&mut sent, usize::MAX) {
                    panic!("sent a malformed MQTT 3.1.1 packet: {error:?} in {all:02x?}");
                }
            }
        }
        _ => {}
    }
});
