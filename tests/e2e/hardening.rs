//! The fixes of issue 12, each against the real binary: a redrive refused again keeps its
//! dead letter, a damaged spool entry costs only itself, each message of a batch is held
//! to its own grant, the dead-letter store is bounded, attributes are bounded and
//! counted, slow and surplus connections are closed, the unauthenticated mode stays on
//! loopback unless allowed, `$` topics are not matched by wildcards, and a WebSocket
//! session ends with its token.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::harness::{Gateway, eventually, plugin, sluice};
use crate::raw_mqtt::{
    Packet5, RawMqtt, mqtt_connect, mqtt_packet, mqtt_string, raw_publish, raw_subscribe,
};
use crate::wsclient::runtime;

fn misbehave(on_failure: &str, extra: &str) -> String {
    format!(
        r#"
        [routing]
        default_destination = "local"
        [plugins]
        on_failure = "{on_failure}"
        hot_reload = false
        [[plugins.transform]]
        name = "misbehave"
        path = "{}"
        {extra}
        "#,
        plugin("misbehave").display()
    )
}

/// A letter whose message a plugin refuses again stays in the store, with the outcome
/// said; nothing reaches a sink.
#[test]
fn a_redrive_refused_again_keeps_its_dead_letter() {
    let gateway = Gateway::start(&misbehave("dead-letter", ""));
    let reply = gateway.publish("t", "dev-1", "fail");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "dead-lettered");
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1);
    let key = letters[0]["key"].as_u64().unwrap();

    let path = gateway.dir.path().join("sluice.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replace(r#"on_failure = "dead-letter""#, r#"on_failure = "reject""#),
    )
    .unwrap();
    let reload = gateway.admin_post("/admin/reload", "");
    assert_eq!(reload.status, 200, "{:?}", reload.body);

    let redrive = gateway.admin_post("/admin/dlq/redrive", json!({"keys": [key]}).to_string());
    assert_eq!(redrive.status, 200, "{:?}", redrive.body);
    assert_eq!(redrive.body["redriven"], json!([]), "{:?}", redrive.body);
    let kept = &redrive.body["kept"][0];
    assert_eq!(kept["key"], key);
    assert_eq!(kept["status"], "rejected");
    assert_eq!(kept["error"]["code"], "plugin_refused");
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "the letter is still there: {letters:?}");
    assert_eq!(letters[0]["key"], key);
    assert!(gateway.all_sink_lines().is_empty(), "and no sink has it");
}

/// Five records wait for an unreachable Kinesis; after `kill -9` one byte of the second
/// is flipped on disk: the restart keeps the other four and counts the damage.
#[test]
fn a_damaged_spool_entry_costs_only_itself() {
    let mut gateway = Gateway::start_with_json_log(crate::harness::KINESIS_UNREACHABLE);
    for n in 0..5 {
        let reply = gateway.publish("t", "dev-1", format!("{{\"n\": {n}}}"));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(gateway.spooled(), 5);
    let dir = gateway.dir.path().to_path_buf();
    gateway.crash_and_restart_after(|| {
        let queue = dir.as_path().join("data").join("queue");
        let marker = b"SLQ1";
        let mut damaged = false;
        for entry in std::fs::read_dir(&queue).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            let starts: Vec<usize> = bytes
                .windows(4)
                .enumerate()
                .filter(|(_, w)| w == marker)
                .map(|(at, _)| at)
                .collect();
            if starts.len() == 5 {
                bytes[starts[1] + 30] ^= 0x01;
                std::fs::write(&path, bytes).unwrap();
                damaged = true;
            }
        }
        assert!(damaged, "a segment with the five records");
    });
    assert_eq!(gateway.spooled(), 4, "only the damaged record is lost");
    assert_eq!(gateway.metric("sluice_spool_damaged_entries_total"), 1.0);
    let logged = gateway.log_records().into_iter().any(|record| {
        record["level"] == "ERROR"
            && record["fields"]["segment"].is_u64()
            && record["fields"]["offset"].is_u64()
    });
    assert!(
        logged,
        "the damage is logged at error level with segment and offset"
    );
}

/// A lenient grant and a strict one, by topic.
const GRANTS: &str = r#"
    [routing]
    default_destination = "local"
    [limits]
    max_attributes = 4
    [[policy.grants]]
    name = "status"
    devices = ["*"]
    publish = ["status/#"]
    [[policy.grants]]
    name = "telemetry"
    devices = ["*"]
    publish = ["telemetry/#"]
    max_payload_bytes = 10
    max_messages_per_sec = 1
"#;

#[test]
fn each_message_of_a_batch_is_held_to_its_own_grant() {
    let gateway = Gateway::start(GRANTS);
    let large = "x".repeat(40);
    let single = gateway.publish("telemetry/t", "dev-1", format!("\"{large}\""));
    assert_eq!(single.status, 413, "{:?}", single.body);
    let mut messages = vec![json!({"topic": "status/s", "payload": 1})];
    for _ in 0..5 {
        messages.push(json!({"topic": "telemetry/t", "payload": large}));
    }
    let batch = json!({ "messages": messages }).to_string();
    for _ in 0..3 {
        let reply = gateway.post("/batch", "dev-1", batch.clone().into_bytes(), None);
        assert_eq!(reply.status, 413, "{:?}", reply.body);
        assert!(
            reply.body["message"]
                .as_str()
                .unwrap()
                .contains("`telemetry`"),
            "{:?}",
            reply.body
        );
    }
    // Small telemetry messages are held to its rate.
    let two = json!({"messages": [
        {"topic": "status/s", "payload": 1},
        {"topic": "telemetry/t", "payload": 1},
        {"topic": "telemetry/t", "payload": 2},
    ]});
    let reply = gateway.post("/batch", "dev-2", two.to_string().into_bytes(), None);
    // More in one request than the grant takes in a second: refused for good, not 429.
    assert_eq!(reply.status, 413, "{:?}", reply.body);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("max_messages_per_sec"),
        "{:?}",
        reply.body
    );
    let one = json!({"messages": [{"topic": "telemetry/t", "payload": 1}]});
    let reply = gateway.post("/batch", "dev-2", one.to_string().into_bytes(), None);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let again = gateway.post("/batch", "dev-2", one.to_string().into_bytes(), None);
    assert_eq!(again.status, 429, "{:?}", again.body);
    assert_eq!(gateway.sink("local").len(), 1);
}

/// Attributes are bounded in number and counted with the payload against a grant's size.
#[test]
fn attributes_are_bounded_and_counted() {
    let gateway = Gateway::start(GRANTS);
    let many: serde_json::Map<String, Value> =
        (0..5).map(|n| (format!("k{n}"), json!("v"))).collect();
    let batch = json!({"messages": [{"topic": "status/s", "payload": 1, "attributes": many}]});
    let reply = gateway.post("/batch", "dev-1", batch.to_string().into_bytes(), None);
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("max_attributes"),
        "{:?}",
        reply.body
    );
    // 4 payload bytes and 8 attribute bytes are over the telemetry grant's 10.
    let batch = json!({"messages": [
        {"topic": "telemetry/t", "payload_base64": "MTIzNA==", "attributes": {"k": "1234567"}}
    ]});
    let reply = gateway.post("/batch", "dev-1", batch.to_string().into_bytes(), None);
    assert_eq!(reply.status, 413, "{:?}", reply.body);
    let batch = json!({"messages": [
        {"topic": "telemetry/t", "payload_base64": "MTIzNA==", "attributes": {"k": "1"}}
    ]});
    let reply = gateway.post("/batch", "dev-1", batch.to_string().into_bytes(), None);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(gateway.sink("local").len(), 1);
}

/// Over `spool.max_dead_letter_bytes`, a request that would add dead letters is refused
/// (nothing of it kept) and others go on; expired records are dropped and counted.
#[test]
fn the_dead_letter_store_is_bounded() {
    let gateway = Gateway::start(&misbehave(
        "dead-letter",
        "[spool]\nmax_dead_letter_bytes = 2000",
    ));
    let mut stored = 0;
    let refused = loop {
        let reply = gateway.publish("t", "dev-1", "fail");
        if reply.status != 200 {
            break reply;
        }
        stored += 1;
        assert!(stored < 100, "the store never filled");
    };
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(refused.body["code"], "dead_letters_full");
    assert!(stored >= 2, "{stored} letters fit in 2000 bytes");
    let spool = gateway.admin_get("/admin/spool");
    assert!(
        spool["dead_letter_bytes"].as_u64().unwrap() <= 2000,
        "{spool}"
    );
    assert_eq!(gateway.dead_letters().len(), stored);
    // Other traffic is not affected.
    let good = gateway.publish("t", "dev-2", "fine");
    assert_eq!(good.status, 200, "{:?}", good.body);
    // An expired message that no longer fits is dropped and counted, not stored.
    let expired = gateway.post("/topics/t?messageExpiry=0", "dev-3", b"fine".to_vec(), None);
    assert_eq!(expired.status, 200, "{:?}", expired.body);
    gateway.settle();
    assert_eq!(gateway.dead_letters().len(), stored);
    let dropped = r#"sluice_dead_letters_refused_total{status="store_full"}"#;
    assert!(gateway.metric(dropped) >= 2.0, "the refusals are counted");
}

#[test]
fn expired_messages_can_be_dropped_instead_of_kept() {
    let gateway =
        Gateway::start("[routing]\ndefault_destination = \"local\"\n[spool]\nexpired = \"drop\"\n");
    for _ in 0..3 {
        let reply = gateway.post("/topics/t?messageExpiry=0", "dev-1", b"x".to_vec(), None);
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert!(gateway.dead_letters().is_empty());
    assert!(gateway.sink("local").is_empty());
    let dropped = r#"sluice_dead_letters_refused_total{status="expired_dropped"}"#;
    assert_eq!(gateway.metric(dropped), 3.0);
}

/// 200 clients that send half a request line are cut off at the first-request timeout;
/// a whole request still works meanwhile and after.
#[test]
fn half_requests_are_cut_off_at_the_header_timeout() {
    let gateway = Gateway::start("[server]\nheader_timeout_secs = 2\n");
    let address = gateway.url.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut stream = TcpStream::connect(&address).unwrap();
            stream.write_all(b"GET /healthz HT").unwrap();
            stream
        })
        .collect();
    let ok = gateway.publish("t", "dev-1", "x");
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    for stream in &mut slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the connection was not closed: {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    let closed =
        r#"sluice_connections_closed_total{listener="http",reason="first_request_timeout"}"#;
    assert!(gateway.metric(closed) >= 200.0);
    let ok = gateway.publish("t", "dev-1", "x");
    assert_eq!(ok.status, 200, "{:?}", ok.body);
}

/// A kept-alive HTTP connection idle for longer than the first request's header timeout
/// (but within the idle timeout) serves its next request: it used to be closed at the
/// header timeout, so a device publishing every few seconds on one connection lost it
/// between publishes (and a request sent as it closed failed).
#[test]
fn a_kept_alive_connection_outlives_the_header_timeout_while_idle() {
    let gateway = Gateway::start("[server]\nheader_timeout_secs = 1\n");
    let mut connection = crate::net::RawHttp::connect(&gateway.url);
    let first = connection
        .request("POST", "/topics/t", &[("x-device-id", "dev-1")], b"{}")
        .unwrap();
    assert_eq!(first.status, 200);
    // Idle past the header timeout: what is tested is time passing.
    std::thread::sleep(Duration::from_millis(2500));
    let second = connection
        .request("POST", "/topics/t", &[("x-device-id", "dev-1")], b"{}")
        .expect("the same connection serves the next request");
    assert_eq!(second.status, 200);
}

/// Past `server.max_connections`, a new connection is closed at once, counted; when one
/// closes, there is room again.
#[test]
fn connections_past_the_limit_are_refused() {
    let gateway = Gateway::start("[server]\nmax_connections = 3\nheader_timeout_secs = 60\n");
    let address = gateway.url.trim_start_matches("http://").to_string();
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    // The gateway counts them as open before the fourth comes.
    eventually(Duration::from_secs(10), "three open connections", || {
        (gateway.metric(r#"sluice_connections{listener="http"}"#) == 3.0).then_some(())
    });
    let mut extra = TcpStream::connect(&address).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    match extra.read(&mut buf) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the fourth connection was served: {other:?}"),
    }
    let refused = r#"sluice_connections_closed_total{listener="http",reason="refused_full"}"#;
    assert!(gateway.metric(refused) >= 1.0);
    held.pop();
    eventually(Duration::from_secs(10), "room again", || {
        let mut stream = TcpStream::connect(&address).ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer.starts_with("HTTP/1.1 200").then_some(())
    });
}

/// Without `[auth]`, a non-loopback address is refused unless explicitly allowed.
#[test]
fn the_unauthenticated_mode_stays_on_loopback_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.toml");
    std::fs::write(&path, "[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let (code, _, stderr) = sluice(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("allow_unauthenticated"), "{stderr}");
    std::fs::write(
        &path,
        "[server]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n",
    )
    .unwrap();
    let (code, _, stderr) = sluice(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
}

/// A grant of `#` does not reach topics starting with `$` (MQTT's rule).
#[test]
fn wildcards_do_not_match_dollar_topics() {
    let gateway = Gateway::start(
        "[routing]\ndefault_destination = \"local\"\n[[policy.grants]]\nname = \"all\"\ndevices = [\"*\"]\npublish = [\"#\"]\n",
    );
    let reply = gateway.publish("$aws/things/t/shadow/update", "dev-1", "{}");
    assert_eq!(reply.status, 403, "{:?}", reply.body);
    assert_eq!(reply.body["code"], "topic_denied");
    let reply = gateway.publish("sites/1", "dev-1", "{}");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

const TOKEN_SECRET: &str = "hardening-secret-0123456789abcdef0123";

/// A WebSocket session opened with a token is closed (4001) once the token expires.
#[test]
fn a_websocket_session_ends_with_its_token() {
    let gateway = Gateway::start(&format!(
        r#"
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{TOKEN_SECRET}" }}]
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        "#
    ));
    let token = gateway.issue_token("valve-1", "1s");
    runtime().block_on(async {
        let url = format!("{}/ws", gateway.url.replace("http://", "ws://"));
        let mut request = url.into_client_request().unwrap();
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", "sluice.v1".parse().unwrap());
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let opened = Instant::now();
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                Ok(Some(Ok(Frame::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let close = close.expect("a close code");
        assert_eq!(u16::from(close.code), 4001, "{close:?}");
        // The token lived 1 s (plus the verifier's 5 s leeway); no earlier.
        assert!(
            opened.elapsed() >= Duration::from_secs(3),
            "{:?}",
            opened.elapsed()
        );
    });
}

/// A TLS client that never finishes its handshake is closed at
/// `server.handshake_timeout_secs`, and counted.
#[test]
fn a_stalled_tls_handshake_is_closed_at_its_timeout() {
    let certs = std::env::var("SLUICE_TEST_CERTS").expect("SLUICE_TEST_CERTS: run scripts/test");
    let gateway = Gateway::start(&format!(
        "[server]\nhandshake_timeout_secs = 1\n[server.tls]\ncert = \"{certs}/server.pem\"\nkey = \"{certs}/server.key\"\n"
    ));
    let address = gateway.url.trim_start_matches("https://").to_string();
    let started = Instant::now();
    let mut stalled = TcpStream::connect(&address).unwrap();
    // Half a TLS ClientHello record header, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 16];
    match stalled.read(&mut buf) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the stalled handshake was not closed: {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let closed = r#"sluice_connections_closed_total{listener="http",reason="handshake_timeout"}"#;
    assert_eq!(gateway.metric(closed), 1.0);
}

/// An MQTT 5 client that stops reading (its receive buffer small, then full) while it
/// makes the gateway write (each QoS 1 publish on a topic IoT Core owns is refused with a
/// PUBACK carrying a reason string): once a write has made no progress for
/// `write_timeout_secs`, the gateway closes the connection, counts it, and the session
/// is no longer listed. Before the write timeout, such a session stayed listed for as
/// long as the client held its socket.
#[test]
fn an_mqtt_client_that_stops_reading_is_closed_at_the_write_timeout() {
    let gateway = Gateway::start(
        "[server]\nwrite_timeout_secs = 2\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
    );
    let port: u16 = gateway.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let connect = mqtt_connect(5, "deaf", &[]);
    let topic = format!("$aws/things/{}/shadow/update/accepted", "t".repeat(100));
    let publish = |pkid: u16| {
        let mut body = mqtt_string(&topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"{}");
        mqtt_packet(0x32, &body)
    };
    let (stream, sent) = runtime().block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        stream.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack[0], 0x20, "{connack:?}");
        // Publishes until the gateway takes no more: it is stuck writing to us.
        let mut sent = 0u32;
        loop {
            let packet = publish((sent % 60_000 + 1) as u16);
            match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&packet)).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(error)) => panic!("closed before it stopped reading: {error}"),
                Err(_) => break,
            }
            assert!(sent < 2_000_000, "the gateway never stopped reading");
        }
        (stream, sent)
    });
    let closed = r#"sluice_connections_closed_total{listener="mqtt",reason="write_timeout"}"#;
    eventually(Duration::from_secs(15), "the write timeout", || {
        (gateway.metric(closed) == 1.0).then_some(())
    });
    eventually(Duration::from_secs(5), "the session gone", || {
        let devices = gateway.admin_get("/admin/devices");
        devices["sessions"].as_array()?.is_empty().then_some(())
    });
    // The socket was closed: reading drains the PUBACKs, then the end.
    runtime().block_on(async move {
        use tokio::io::AsyncReadExt as _;
        let mut stream = stream;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the gateway kept the connection open ({sent} publishes)"),
            }
        }
    });
}

/// MQTT 5 as the specification has it, where the gateway used to differ: an enhanced
/// authentication method is refused (CONNACK 0x8C, not accepted); an empty client id is
/// given one (Assigned Client Identifier, not refused); a topic that is not UTF-8 is a
/// malformed packet (DISCONNECT 0x81, not stored as `a/\u{fffd}`); a topic alias, where
/// the gateway announced a Topic Alias Maximum of 0, is DISCONNECT 0x94 at QoS 0 (not
/// dropped in silence) and at QoS 1 (not a PUBACK and on); a reason string that would
/// take a PUBACK or SUBACK past the client's Maximum Packet Size is left out. Nothing of
/// it is stored.
#[test]
fn mqtt5_edge_cases_get_the_specifications_answers() {
    use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, DisconnectReasonCode, PubAckReason, SubscribeReasonCode,
    };
    let gateway = Gateway::start(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
    );
    // Authentication Method (0x15) "SCRAM-SHA-1".
    let mut method = vec![0x15];
    method.extend(mqtt_string("SCRAM-SHA-1"));
    let (_, connack) = RawMqtt::connect(&gateway, "edge-auth", &method);
    let Packet5::ConnAck(connack) = connack else {
        panic!("{connack:?}")
    };
    assert_eq!(connack.code, ConnectReturnCode::BadAuthenticationMethod);

    let (mut raw, connack) = RawMqtt::connect(&gateway, "", &[]);
    let Packet5::ConnAck(connack) = connack else {
        panic!("{connack:?}")
    };
    assert_eq!(connack.code, ConnectReturnCode::Success);
    let assigned = connack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("an assigned client identifier");
    assert!(assigned.starts_with("sluice-"), "{assigned}");
    let devices = gateway.admin_get("/admin/devices");
    assert_eq!(
        devices["sessions"][0]["device"],
        assigned.as_str(),
        "{devices}"
    );
    raw.send(&raw_publish(b"edge/ok", 1, &[]));
    assert!(matches!(raw.next(), Some(Packet5::PubAck(ack)) if ack.pkid == 1));
    raw.send(&raw_publish(b"edge/\xff", 1, &[]));
    match raw.next() {
        Some(Packet5::Disconnect(disconnect)) => {
            assert_eq!(
                disconnect.reason_code,
                DisconnectReasonCode::MalformedPacket
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(raw.next().is_none(), "closed");

    // Topic Alias (0x23) 1.
    for qos in [0, 1] {
        let (mut raw, _) = RawMqtt::connect(&gateway, &format!("edge-alias-{qos}"), &[]);
        raw.send(&raw_publish(b"edge/alias", qos, &[0x23, 0, 1]));
        match raw.next() {
            Some(Packet5::Disconnect(disconnect)) => assert_eq!(
                disconnect.reason_code,
                DisconnectReasonCode::TopicAliasInvalid
            ),
            other => panic!("QoS {qos}: {other:?}"),
        }
    }

    // A refusal's reason string is left out where it would take the answer past the
    // client's Maximum Packet Size (0x27), 64 bytes here; the answer itself still comes.
    let deep = b"edge/1/2/3/4/5/6/7/8";
    let subscribe = raw_subscribe(2, "edge/#");
    for (client_id, limit) in [("edge-roomy", None), ("edge-tight", Some(64u32))] {
        let properties = limit.map_or(Vec::new(), |limit| {
            let mut property = vec![0x27];
            property.extend_from_slice(&limit.to_be_bytes());
            property
        });
        let (mut raw, _) = RawMqtt::connect(&gateway, client_id, &properties);
        raw.send(&raw_publish(deep, 1, &[]));
        let Some(Packet5::PubAck(ack)) = raw.next() else {
            panic!("{client_id}: no PUBACK")
        };
        assert_eq!(ack.reason, PubAckReason::TopicNameInvalid, "{client_id}");
        let reason = ack.properties.and_then(|p| p.reason_string);
        raw.send(&subscribe);
        let Some(Packet5::SubAck(suback)) = raw.next() else {
            panic!("{client_id}: no SUBACK")
        };
        assert_eq!(
            suback.return_codes,
            [SubscribeReasonCode::ImplementationSpecific],
            "{client_id}"
        );
        let sub_reason = suback.properties.and_then(|p| p.reason_string);
        if limit.is_some() {
            assert_eq!((reason, sub_reason), (None, None), "{client_id}");
        } else {
            assert!(reason.is_some_and(|r| r.len() > 64), "{client_id}");
            assert!(sub_reason.is_some_and(|r| r.len() > 64), "{client_id}");
        }
    }

    let topics: Vec<String> = gateway
        .sink("local")
        .iter()
        .map(|line| line["topic"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(topics, ["edge/ok"]);
}

/// MQTT 3.1.1 cannot be told that a plugin refused one publish. By default
/// (`mqtt.v311_plugin_failure = "dead-letter"`) the refused publish is dead-lettered with
/// the plugin's reason and PUBACKed, the connection goes on, so that a device does not
/// send it again for ever. With `"reject"` the connection is closed unacknowledged, and
/// the publish after it in the same batch, which was stored, is PUBACKed first (it used
/// to be stored unacknowledged: the client's resend was a duplicate).
#[test]
fn mqtt311_publishes_a_plugin_refuses_never_loop_and_never_duplicate() {
    let v311_publish = |pkid: u8, payload: &[u8]| {
        let mut body = mqtt_string("v311/t");
        body.extend_from_slice(&[0, pkid]);
        body.extend_from_slice(payload);
        mqtt_packet(0x32, &body)
    };
    for mode in ["dead-letter", "reject"] {
        let gateway = Gateway::start(&format!(
            "{}[mqtt]\nlisten = \"127.0.0.1:0\"\nv311_plugin_failure = \"{mode}\"\n",
            misbehave("reject", "")
        ));
        // All in one write: the three publishes are one batch.
        let mut bytes = mqtt_connect(4, &format!("v311-{mode}"), &[]);
        bytes.extend(v311_publish(1, b"one"));
        bytes.extend(v311_publish(2, b"fail"));
        bytes.extend(v311_publish(3, b"three"));
        let mut stream = TcpStream::connect(gateway.mqtt.trim_start_matches("mqtt://")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(&bytes).unwrap();
        let mut expected = b"\x20\x02\x00\x00\x40\x02\x00\x01".to_vec();
        if mode == "dead-letter" {
            expected.extend_from_slice(b"\x40\x02\x00\x02");
        }
        expected.extend_from_slice(b"\x40\x02\x00\x03");
        let mut answer = vec![0u8; expected.len()];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(answer, expected, "{mode}");
        if mode == "dead-letter" {
            stream.write_all(b"\xe0\x00").unwrap();
        }
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{mode}: {rest:?}");
        let mut stored: Vec<String> = gateway
            .sink("local")
            .iter()
            .map(|line| line["payload_text"].as_str().unwrap().to_string())
            .collect();
        stored.sort();
        assert_eq!(stored, ["one", "three"], "{mode}");
        let letters = gateway.dead_letters();
        if mode == "dead-letter" {
            assert_eq!(letters.len(), 1, "{letters:?}");
            assert_eq!(letters[0]["reason"], "asked to fail", "{letters:?}");
        } else {
            assert!(letters.is_empty(), "{letters:?}");
        }
    }
}

/// MQTT 3.1.1 cannot be told "later": while the spool is full, a batch waits for room, up
/// to 1.5 × the keep-alive (90 s here). The wait ends with the session: a connection with
/// the same client id takes over at once and the waiting one is closed, unacknowledged (it
/// used to wait out its keep-alive, listed beside the new session).
#[test]
fn a_v311_batch_waiting_for_a_full_spool_ends_with_its_session() {
    // Kinesis on a closed port: nothing is delivered, the small spool fills.
    let gateway = Gateway::start(
        r#"
        [mqtt]
        listen = "127.0.0.1:0"
        [limits]
        max_batch_bytes = 16384
        [spool]
        max_bytes_per_sink = 32768
        [aws]
        region = "us-east-1"
        endpoint_url = "http://127.0.0.1:9"
        [routing]
        default_destination = "kinesis"
        kinesis_stream = "nowhere"
        [sinks.kinesis]
        linger_ms = 5
        "#,
    );
    let connect = || {
        let mut stream = TcpStream::connect(gateway.mqtt.trim_start_matches("mqtt://")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(&mqtt_connect(4, "full-waiter", &[]))
            .unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).unwrap();
        assert_eq!(connack, *b"\x20\x02\x00\x00");
        stream
    };
    let mut waiting = connect();
    let payload = format!("{{\"fill\":\"{}\"}}", "x".repeat(4000));
    let mut pkid = 0u16;
    eventually(Duration::from_secs(30), "the spool to fill", || {
        if gateway.admin_get("/admin/spool")["refused_full"].as_u64() > Some(0) {
            return Some(());
        }
        pkid += 1;
        let mut body = mqtt_string("full/t");
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        waiting.write_all(&mqtt_packet(0x32, &body)).unwrap();
        None
    });
    let _taker = connect();
    let started = Instant::now();
    let mut rest = Vec::new();
    waiting
        .read_to_end(&mut rest)
        .expect("the waiting connection is closed once taken over");
    assert!(started.elapsed() < Duration::from_secs(10));
    let unanswered = u16::try_from(rest.len() / 4).unwrap();
    assert!(
        unanswered < pkid,
        "{unanswered} PUBACKs for {pkid} publishes"
    );
    eventually(Duration::from_secs(10), "one session listed", || {
        let devices = gateway.admin_get("/admin/devices");
        (devices["sessions"].as_array().unwrap().len() == 1).then_some(())
    });
}

/// Before its CONNECT, an MQTT-over-WebSocket client may send 64 KiB (the largest
/// CONNECT) and one read's worth more: a frame announcing 1 MiB is cut off once 256 KiB
/// of it are in, the connection closed and counted (`reason="read_allowance"`), long
/// before the CONNECT timeout. It used to be buffered whole (up to the packet limit,
/// ~1.1 MB) before the 64 KiB CONNECT limit applied, for each such connection.
#[test]
fn mqtt_over_websocket_buffers_little_before_the_connect() {
    let gateway = Gateway::start("[mqtt]\nconnect_timeout_secs = 60\n");
    let address = gateway.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(
            format!(
                "GET /mqtt HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A binary frame, masked (key 0: the payload as it is), of 1 MiB: a CONNECT's
    // fixed header claiming ~1 MiB, then zeros, 256 KiB of it sent.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&[0x10, 0xf8, 0xff, 0x3f]);
    frame.resize(frame.len() + 256 * 1024, 0);
    let started = Instant::now();
    let _ = stream.write_all(&frame);
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "not closed: {error}"
        ),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        gateway
            .metric("sluice_connections_closed_total{listener=\"http\",reason=\"read_allowance\"}")
            >= 1.0
    );
}
