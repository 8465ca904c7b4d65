//! The promise under every acknowledgement, checked on the real gateway's system calls:
//! a durable message is acknowledged (HTTP 200, MQTT PUBACK, the WebSocket dialect's
//! `ack`) only after an `fdatasync` (or `fsync`) of the file that holds it has returned:
//! the spool's (a cloud sink's records) or the local sink's (its records are written
//! straight to its file). The gateway runs under `strace` (Debian's); the clients send one message at
//! a time, each with a payload of its own, so that the trace says which write held it,
//! which sync covered that write, and when its acknowledgement was sent.
//!
//! A spool that skips its sync (a planted `Ok(())` in place of the segment's
//! `sync_data`) passes every other test; this one fails on it, and so does a local sink
//! that skips its own.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use futures_util::SinkExt as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::harness::Gateway;
use crate::wsclient::{connect, next_json, runtime};

/// The system calls the check reads: writes (to files and sockets) and syncs.
const TRACED: &str = "trace=pwrite64,pwritev,pwritev2,write,writev,sendto,sendmsg,fdatasync,fsync";

/// One line of `strace -f -yy` output: the thread, the call, its first argument's
/// descriptor annotation (`/path` or `TCP:[…]`), and the rest of the line.
struct Call<'a> {
    pid: &'a str,
    name: &'a str,
    target: &'a str,
    rest: &'a str,
}

/// Parses a call's opening (`PID name(FD<target>, …`); `None` for a resumed call or a
/// line about signals and exits.
fn call(line: &str) -> Option<Call<'_>> {
    let (pid, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (name, rest) = rest.split_once('(')?;
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let open = rest.find('<')?;
    // The annotation ends at a `>` followed by what ends an argument (`,`, `)`, or the
    // space before `<unfinished ...>`): a socket's `->` is inside it.
    let bytes = rest.as_bytes();
    let close = (open..bytes.len())
        .find(|&i| bytes[i] == b'>' && matches!(bytes.get(i + 1), Some(b',' | b')' | b' ')))?;
    Some(Call {
        pid,
        name,
        target: &rest[open + 1..close],
        rest: &rest[close..],
    })
}

/// What the trace shows, in order: for each acknowledgement sent to a device, whether
/// the message it acknowledged (by position: the clients send one at a time) had been
/// synced to the file holding it (the spool's or the local sink's).
fn acknowledgements(
    trace: &str,
    probes: &[String],
    is_ack: impl Fn(&Call) -> bool,
) -> Vec<(String, bool)> {
    // Per durable file: the probes written to it and not yet covered by a finished sync.
    let mut unsynced: HashMap<String, HashSet<usize>> = HashMap::new();
    // Per thread: a sync in progress, and the probes its file had unsynced when it began.
    let mut syncing: HashMap<String, (String, HashSet<usize>)> = HashMap::new();
    let mut synced: HashSet<usize> = HashSet::new();
    let mut written: HashSet<usize> = HashSet::new();
    let mut acks = Vec::new();
    for line in trace.lines() {
        if let Some((pid, resumed)) = line.split_once(char::is_whitespace)
            && let Some(resumed) = resumed.trim_start().strip_prefix("<... ")
        {
            if (resumed.starts_with("fdatasync resumed") || resumed.starts_with("fsync resumed"))
                && resumed.trim_end().ends_with("= 0")
                && let Some((file, covered)) = syncing.remove(pid)
            {
                for probe in &covered {
                    unsynced.get_mut(&file).map(|set| set.remove(probe));
                }
                synced.extend(covered);
            }
            continue;
        }
        let Some(call) = call(line) else { continue };
        let spool_file = call.target.contains("/data/queue/")
            || call.target.ends_with("/data/spool.redb")
            || (call.target.contains("/data/") && call.target.ends_with(".jsonl"));
        match call.name {
            "fdatasync" | "fsync" if spool_file => {
                let covered = unsynced.get(call.target).cloned().unwrap_or_default();
                if call.rest.trim_end().ends_with("= 0") {
                    for probe in &covered {
                        unsynced.get_mut(call.target).map(|set| set.remove(probe));
                    }
                    synced.extend(covered);
                } else if call.rest.contains("<unfinished ...>") {
                    syncing.insert(call.pid.to_string(), (call.target.to_string(), covered));
                }
            }
            _ if spool_file => {
                for (n, probe) in probes.iter().enumerate() {
                    if call.rest.contains(probe.as_str()) {
                        written.insert(n);
                        unsynced
                            .entry(call.target.to_string())
                            .or_default()
                            .insert(n);
                    }
                }
            }
            _ if call.target.starts_with("TCP:[") && is_ack(&call) => {
                let n = acks.len();
                let probe = probes.get(n).cloned().unwrap_or_default();
                acks.push((probe, written.contains(&n) && synced.contains(&n)));
            }
            _ => {}
        }
    }
    acks
}

/// The gateway under strace, and its trace file.
fn traced_gateway(config: &str) -> (Gateway, std::path::PathBuf) {
    let trace = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    let trace_arg = trace.display().to_string();
    let strace = std::env::var("SLUICE_TEST_STRACE").expect("SLUICE_TEST_STRACE: run scripts/test");
    let gateway = Gateway::start_traced(
        config,
        &[
            &strace,
            "-f",
            "-yy",
            "-s",
            "4096",
            "-e",
            TRACED,
            "-e",
            "signal=none",
            "-o",
            &trace_arg,
        ],
    );
    (gateway, trace)
}

/// Every HTTP 200, MQTT PUBACK (3.1.1 and 5.0, mosquitto_pub) and WebSocket `ack` of a
/// durable message is sent after the sync of the local sink's file its message was
/// written to.
#[test]
fn every_acknowledgement_follows_the_sync_of_its_message_in_the_local_sink() {
    acknowledged_after_sync(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
        "the local sink's file",
    );
}

/// The same for messages that wait in the spool: Kinesis on a closed port, so every
/// message stays in the queue log.
#[test]
fn every_acknowledgement_follows_the_sync_of_its_message_in_the_spool() {
    acknowledged_after_sync(
        &format!(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n{}",
            crate::harness::KINESIS_UNREACHABLE
        ),
        "the spool file",
    );
}

/// Sends one message at a time over each protocol to a traced gateway running `config`,
/// and checks each acknowledgement against the trace; `file` names where they are kept.
fn acknowledged_after_sync(config: &str, file: &str) {
    let (mut gateway, trace) = traced_gateway(config);
    let run = crate::cloud::unique("synced");
    let http: Vec<String> = (0..5).map(|n| format!("{run}-http-{n}")).collect();
    let mqtt: Vec<String> = (0..4).map(|n| format!("{run}-mqtt-{n}")).collect();
    let ws: Vec<String> = (0..5).map(|n| format!("{run}-ws-{n}")).collect();

    for probe in &http {
        let reply = gateway.publish("synced/http?qos=1", "dev-http", probe.clone());
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let address = gateway.mqtt.trim_start_matches("mqtt://");
    let (host, port) = address.rsplit_once(':').unwrap();
    for (n, probe) in mqtt.iter().enumerate() {
        let version = if n % 2 == 0 { "mqttv311" } else { "mqttv5" };
        let status = Command::new("mosquitto_pub")
            .args([
                "-h", host, "-p", port, "-V", version, "-q", "1", "-i", "dev-mqtt",
            ])
            .args(["-t", "synced/mqtt", "-m", probe])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub got its PUBACK");
    }
    runtime().block_on(async {
        let mut socket = connect(&gateway, "dev-ws", "sluice.v1").await.unwrap();
        assert_eq!(next_json(&mut socket).await["type"], "welcome");
        for (n, probe) in ws.iter().enumerate() {
            let frame = json!({"type": "publish", "id": format!("m{n}"), "topic": "synced/ws", "payload": probe});
            socket.send(Frame::Text(frame.to_string().into())).await.unwrap();
            let ack = next_json(&mut socket).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
    });
    let port_of = |url: &str| url.rsplit(':').next().unwrap().to_string();
    let (http_port, mqtt_port) = (port_of(&gateway.url), port_of(&gateway.mqtt));
    assert!(gateway.terminate_traced().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    let on = |port: &str, call: &Call| call.target.starts_with(&format!("TCP:[127.0.0.1:{port}->"));
    let checks = [
        (
            "HTTP",
            acknowledgements(&text, &http, |c| {
                on(&http_port, c) && c.rest.contains("HTTP/1.1 200")
            }),
            http.len(),
        ),
        (
            // A PUBACK's first byte is 0x40: `@` as strace prints it.
            "MQTT",
            acknowledgements(&text, &mqtt, |c| {
                on(&mqtt_port, c)
                    && (c.rest.starts_with(">, \"@") || c.rest.starts_with(">, [{iov_base=\"@"))
            }),
            mqtt.len(),
        ),
        (
            "WebSocket",
            acknowledgements(&text, &ws, |c| {
                on(&http_port, c) && c.rest.contains(r#"\"type\":\"ack\""#)
            }),
            ws.len(),
        ),
    ];
    for (protocol, acks, sent) in checks {
        assert_eq!(
            acks.len(),
            sent,
            "{protocol}: one acknowledgement per message in the trace"
        );
        let early: Vec<&String> = acks.iter().filter(|(_, ok)| !ok).map(|(p, _)| p).collect();
        assert!(
            early.is_empty(),
            "{protocol}: acknowledged before {file} holding them was synced: {early:?} (the trace: {})",
            trace.display()
        );
    }
    let _ = std::fs::remove_file(&trace);
}
