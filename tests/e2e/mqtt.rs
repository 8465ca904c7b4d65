//! MQTT devices, driven by paho-mqtt (a client nobody here wrote): 3.1.1 and 5.0 over
//! WebSocket on the embedded default's listener and over `[mqtt] listen`, every publish
//! read back from the local sink; refusals with their MQTT 5 reason codes, or the
//! disconnect MQTT 3.1.1 gets.

use serde_json::{Value, json};

use crate::harness::Gateway;

/// Runs tests/clients/paho_publish.py with `spec`; its report.
fn paho(spec: Value) -> Value {
    let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON: run scripts/test");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/paho_publish.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(spec.to_string())
        .output()
        .expect("run paho");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "paho failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ws_url(gateway: &Gateway) -> String {
    format!("{}/mqtt", gateway.url.replace("http://", "ws://"))
}

const LOCAL: &str = "[routing]\ndefault_destination = \"local\"\n";

/// The embedded default takes MQTT over WebSocket with no configuration; the client id
/// names the device. Both versions, QoS 1 and 0, are acknowledged and delivered.
#[test]
fn paho_publishes_over_websocket_with_both_versions() {
    let gateway = Gateway::start(LOCAL);
    for version in [4, 5] {
        let device = format!("sensor-v{version}");
        let report = paho(json!({
            "url": ws_url(&gateway),
            "version": version,
            "client_id": device,
            "publishes": [
                {"topic": format!("sites/{version}/temp"), "payload": "{\"t\": 21.5}", "qos": 1},
                {"topic": format!("sites/{version}/temp"), "payload": "{\"t\": 22.5}", "qos": 1},
                {"topic": format!("sites/{version}/hum"), "payload": "{\"h\": 40}", "qos": 0},
            ],
        }));
        assert_eq!(report["connack"], 0, "{report}");
        let reasons: Vec<&Value> = report["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["reason"])
            .collect();
        assert_eq!(reasons[..2], [&json!(0), &json!(0)], "{report}");
    }
    let lines = gateway.sink("local");
    for version in [4, 5] {
        let device = format!("sensor-v{version}");
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["device"] == device.as_str())
            .collect();
        assert_eq!(mine.len(), 3, "{lines:?}");
        let temps: Vec<f64> = mine
            .iter()
            .filter(|l| l["topic"] == format!("sites/{version}/temp").as_str())
            .map(|l| l["payload"]["t"].as_f64().unwrap())
            .collect();
        assert_eq!(temps, [21.5, 22.5], "in order");
    }
}

/// MQTT 5 publish properties become the same `mqtt.*` attributes the HTTPS API makes.
#[test]
fn mqtt5_properties_become_attributes() {
    let gateway = Gateway::start(LOCAL);
    let report = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "props-1",
        "publishes": [{
            "topic": "t/p", "payload": "{}", "qos": 1,
            "properties": {"content_type": "application/json", "message_expiry": 600, "user": [["site", "north"]]},
        }],
    }));
    assert_eq!(report["results"][0]["reason"], 0, "{report}");
    let lines = gateway.sink("local");
    let line = lines
        .iter()
        .find(|l| l["device"] == "props-1")
        .expect("delivered");
    assert_eq!(line["content_type"], "application/json");
    assert_eq!(line["attributes"]["mqtt.message_expiry"], "600");
    assert!(
        line["attributes"]["mqtt.user_properties"].is_string(),
        "{line}"
    );
}

const POLICY: &str = r#"
[routing]
default_destination = "local"
[[policy.grants]]
name = "own"
devices = ["*"]
publish = ["devices/${device.id}/#"]
max_payload_bytes = 10
"#;

/// MQTT 5: a refusal is a PUBACK with its reason code, and the connection goes on; a
/// publish over the grant's size ends it with DISCONNECT 0x95 (not a PUBACK code).
#[test]
fn mqtt5_refusals_are_pubacks_with_reason_codes() {
    let gateway = Gateway::start(POLICY);
    let report = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "dev-5",
        "publishes": [
            {"topic": "elsewhere/t", "payload": "1", "qos": 1},
            {"topic": "devices/dev-5/t", "payload": "ok", "qos": 1},
        ],
    }));
    let reasons: Vec<&Value> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["reason"])
        .collect();
    assert_eq!(reasons, [&json!(0x87), &json!(0)], "{report}");
    assert_eq!(report["disconnected"], false, "{report}");
    let report = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "dev-5",
        "publishes": [{"topic": "devices/dev-5/t", "payload": "x".repeat(11), "qos": 1}],
    }));
    assert_eq!(report["disconnected"], true, "{report}");
    assert_eq!(report["disconnect_reason"], 0x95, "{report}");
    let lines = gateway.sink("local");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["payload_text"], "ok");
}

/// MQTT 3.1.1 has no negative PUBACK: a refused publish closes the connection, and
/// nothing of it is kept.
#[test]
fn mqtt311_refusals_close_the_connection() {
    let gateway = Gateway::start(POLICY);
    let report = paho(json!({
        "url": ws_url(&gateway),
        "version": 4,
        "client_id": "dev-4",
        "publishes": [
            {"topic": "devices/dev-4/t", "payload": "ok", "qos": 1},
            {"topic": "elsewhere/t", "payload": "no", "qos": 1},
        ],
    }));
    assert_eq!(report["results"][0]["reason"], 0, "{report}");
    assert_eq!(report["disconnected"], true, "{report}");
    let lines = gateway.sink("local");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["payload_text"], "ok");
}

/// QoS 2 is refused: MQTT 5 gets DISCONNECT 0x9B.
#[test]
fn qos2_is_refused() {
    let gateway = Gateway::start(LOCAL);
    let report = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "dev-q2",
        "publishes": [{"topic": "t", "payload": "x", "qos": 2}],
    }));
    assert_eq!(report["disconnected"], true, "{report}");
    assert_eq!(report["disconnect_reason"], 0x9b, "{report}");
    assert!(gateway.sink("local").is_empty());
}

/// `[mqtt] listen` on loopback: plain MQTT over TCP, both versions.
#[test]
fn mqtt_over_tcp_on_its_own_port() {
    let gateway = Gateway::start(&format!("{LOCAL}[mqtt]\nlisten = \"127.0.0.1:0\"\n"));
    assert!(gateway.mqtt.starts_with("mqtt://"), "{}", gateway.mqtt);
    for version in [4, 5] {
        let report = paho(json!({
            "url": gateway.mqtt,
            "version": version,
            "client_id": format!("tcp-{version}"),
            "publishes": [{"topic": "tcp/t", "payload": format!("v{version}"), "qos": 1}],
        }));
        assert_eq!(report["results"][0]["reason"], 0, "{report}");
    }
    let lines = gateway.sink("local");
    let mut payloads: Vec<&str> = lines
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["v4", "v5"]);
}
