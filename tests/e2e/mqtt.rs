//! MQTT devices, driven by paho-mqtt (a client nobody here wrote): 3.1.1 and 5.0 over
//! WebSocket on the embedded default's listener and over `[mqtt] listen` (TCP, and TLS
//! with a client certificate; mosquitto_pub by ALPN too), every publish
//! read back from the local sink; refusals with their MQTT 5 reason codes, or the
//! disconnect MQTT 3.1.1 gets.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Gateway, eventually};

/// Runs tests/clients/paho_publish.py with `spec`; its report.
pub fn paho(spec: Value) -> Value {
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

/// The reason code paho got for each publish, in order (`null` for none).
fn reasons(report: &Value) -> Vec<Value> {
    report["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["reason"].clone())
        .collect()
}

pub fn ws_url(gateway: &Gateway) -> String {
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
        assert_eq!(reasons(&report)[..2], [json!(0), json!(0)], "{report}");
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
    assert_eq!(reasons(&report), [json!(0x87), json!(0)], "{report}");
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
    // mosquitto_pub at QoS 0 sends PUBLISH and DISCONNECT back to back: the publish
    // read with the DISCONNECT is still delivered (with no PUBACK to wait for, it reaches
    // the sink after mosquitto_pub is gone).
    let port = gateway.mqtt.rsplit(':').next().unwrap();
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-q", "0", "-V", "mqttv5"])
        .args(["-i", "tcp-q0", "-t", "tcp/t", "-m", "q0"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let payloads = crate::harness::eventually(
        std::time::Duration::from_secs(10),
        "the QoS 0 publish in the sink",
        || {
            let lines = gateway.sink("local");
            let mut payloads: Vec<String> = lines
                .iter()
                .map(|l| l["payload_text"].as_str().unwrap().to_string())
                .collect();
            payloads.sort();
            (payloads.len() >= 3).then_some(payloads)
        },
    );
    assert_eq!(payloads, ["q0", "v4", "v5"]);
}

/// The test environment's certificates (scripts/test-env): a CA, a server certificate for
/// 127.0.0.1 and a client certificate with CN `test-subscriber`.
pub fn certs() -> std::path::PathBuf {
    std::env::var_os("SLUICE_TEST_CERTS")
        .map(std::path::PathBuf::from)
        .expect("SLUICE_TEST_CERTS: run scripts/test")
}

/// TLS with client certificates from `certs`, on the device listener and on
/// `[mqtt] listen` (loopback, a port of its own).
pub fn mtls_config(certs: &std::path::Path) -> String {
    format!(
        r#"
        [server.tls]
        cert = "{certs}/server.pem"
        key = "{certs}/server.key"
        [auth.mtls]
        ca = ["{certs}/ca.pem"]
        [mqtt]
        listen = "127.0.0.1:0"
        "#,
        certs = certs.display()
    )
}

/// `mosquitto_pub` (Debian's) over TLS with a client certificate: on `[mqtt] listen`
/// with MQTT 5 and 3.1.1, and on the HTTPS device listener by ALPN `x-amzn-mqtt-ca`, as
/// on IoT Core's port 443. The certificate names the device; a publish outside its
/// grant never arrives.
#[test]
fn mosquitto_pub_over_tls_with_a_client_certificate_and_by_alpn() {
    let certs = certs();
    let gateway = Gateway::start(&format!(
        r#"
        {}
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#,
        mtls_config(&certs)
    ));
    assert!(gateway.mqtt.starts_with("mqtts://"), "{}", gateway.mqtt);
    let mqtt_port = gateway.mqtt.rsplit(':').next().unwrap().to_string();
    let https_port = gateway.url.rsplit(':').next().unwrap().to_string();
    let publish = |port: &str, extra: &[&str], topic: &str, message: &str| {
        let mut command = std::process::Command::new("mosquitto_pub");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-q",
                "1",
                "-i",
                "test-subscriber",
            ])
            .args(["-t", topic, "-m", message])
            .arg("--cafile")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("test-subscriber.pem"))
            .arg("--key")
            .arg(certs.join("test-subscriber.key"))
            .args(extra);
        let output = command.output().expect("mosquitto_pub");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let topic = "devices/test-subscriber/t";
    let (code, stderr) = publish(&mqtt_port, &["-V", "mqttv5"], topic, "v5");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = publish(&mqtt_port, &["-V", "mqttv311"], topic, "v311");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = publish(
        &https_port,
        &["--tls-alpn", "x-amzn-mqtt-ca"],
        topic,
        "alpn",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let _ = publish(
        &mqtt_port,
        &["-V", "mqttv5"],
        "devices/someone-else/t",
        "denied",
    );
    let lines = gateway.sink("local");
    let mut got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["device"].as_str().unwrap(),
                l["payload_text"].as_str().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("test-subscriber", "alpn"),
            ("test-subscriber", "v311"),
            ("test-subscriber", "v5")
        ]
    );
}

/// A client offering only IoT Core's ALPN for HTTPS with a client certificate
/// (`x-amzn-http-ca`, port 443 at IoT Core) gets the HTTP API; the MQTT 5 parameters the
/// AWS SDKs send as headers become the message's `mqtt.*` attributes.
#[test]
fn iot_cores_https_alpn_gets_the_http_api_and_its_mqtt5_headers_are_kept() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let certs = certs();
    let gateway = Gateway::start(&format!(
        r#"
        {}
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#,
        mtls_config(&certs)
    ));
    let port: u16 = gateway.url.rsplit(':').next().unwrap().parse().unwrap();
    let mut tls = sluice_gateway::tls::client_config(
        &certs.join("ca.pem"),
        &certs.join("test-subscriber.pem"),
        &certs.join("test-subscriber.key"),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"x-amzn-http-ca".to_vec()];
    let body = r#"{"a":1}"#;
    let request = format!(
        "POST /topics/devices/test-subscriber/t?qos=1 HTTP/1.1\r\nHost: localhost\r\n\
         Content-Length: {}\r\nx-amz-mqtt5-correlation-data: Yy0x\r\n\
         x-amz-mqtt5-payload-format-indicator: UTF8_DATA\r\n\
         x-amz-mqtt5-user-properties: W3siYSI6ImIifV0=\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (alpn, response) = crate::wsclient::runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("the TLS handshake with x-amzn-http-ca");
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        (alpn, String::from_utf8_lossy(&response).into_owned())
    });
    assert_eq!(alpn.as_deref(), Some(&b"x-amzn-http-ca"[..]));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lines = gateway.sink("local");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        lines[0]["attributes"],
        serde_json::json!({
            "mqtt.correlation_data": "Yy0x",
            "mqtt.payload_format_indicator": "UTF8_DATA",
            "mqtt.user_properties": "W3siYSI6ImIifV0=",
        })
    );
}

/// The README's own example grant, `client_ids = ["${device.id}-*"]`, does not let device
/// `pump` take device `pump-3`'s client id: refused (0x85) while pump-3 is connected,
/// which stays connected, and after it left; its own id and unused ones work.
#[test]
fn a_device_cannot_take_another_devices_client_id() {
    let secret = "mqtt-secret-0123456789abcdef0123456789";
    let gateway = Gateway::start(&format!(
        r#"
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{secret}" }}]
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        client_ids = ["${{device.id}}-*"]
        [routing]
        default_destination = "local"
        "#
    ));
    let pump = gateway.issue_token("pump", "10m");
    let pump_3 = gateway.issue_token("pump-3", "10m");
    let owner = crate::mqtt_sessions::PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": "pump-3",
        "username": "pump-3", "password": pump_3, "expect": 1, "timeout": 30,
        "publishes": [{"topic": "devices/pump-3/t", "payload": "mine", "qos": 1}],
    }));
    assert_eq!(owner.next("connack")["reason"], 0);
    assert_eq!(owner.next("puback")["reason"], 0);
    let as_pump = |client_id: &str| {
        paho(json!({
            "url": ws_url(&gateway), "version": 5, "client_id": client_id,
            "username": "pump", "password": pump,
            "publishes": [{"topic": "devices/pump/t", "payload": client_id, "qos": 1}],
        }))
    };
    let taken = as_pump("pump-3");
    assert_eq!(taken["connack"], 0x85, "{taken}");
    // pump-3 still holds its connection.
    let devices = gateway.admin_get("/admin/devices");
    assert!(
        devices["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["device"] == "pump-3"),
        "{devices}"
    );
    drop(owner);
    eventually(Duration::from_secs(20), "pump-3 gone", || {
        let devices = gateway.admin_get("/admin/devices");
        devices["sessions"].as_array()?.is_empty().then_some(())
    });
    let later = as_pump("pump-3");
    assert_eq!(later["connack"], 0x85, "its owner is remembered: {later}");
    for client_id in ["pump", "pump-ui"] {
        let fine = as_pump(client_id);
        assert_eq!(fine["results"][0]["reason"], 0, "{fine}");
    }
}

/// With `[auth.tokens]`, an MQTT client over WebSocket authenticates with the token as
/// its password (the AWS SDKs' `?SDK=…` after the user name is ignored); the client id
/// must be the token's device.
#[test]
fn a_token_as_the_mqtt_password_names_the_device() {
    let secret = "mqtt-secret-0123456789abcdef0123456789";
    let gateway = Gateway::start(&format!(
        r#"
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{secret}" }}]
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        client_ids = ["${{device.id}}-ui-*"]
        [routing]
        default_destination = "local"
        "#
    ));
    let token = &gateway.issue_token("valve-7", "10m");
    // A grant's `client_ids` lets the device connect under another client id; the
    // message is still the device's.
    let other_client = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "valve-7-ui-1",
        "username": "valve-7",
        "password": token,
        "publishes": [{"topic": "devices/valve-7/t", "payload": "from-ui", "qos": 1}],
    }));
    assert_eq!(other_client["results"][0]["reason"], 0, "{other_client}");
    let good = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "valve-7",
        "username": "valve-7?SDK=Python&Version=1.0",
        "password": token,
        "publishes": [{"topic": "devices/valve-7/t", "payload": "ok", "qos": 1}],
    }));
    assert_eq!(good["results"][0]["reason"], 0, "{good}");
    let wrong_client = paho(json!({
        "url": ws_url(&gateway),
        "version": 5,
        "client_id": "valve-8",
        "username": "valve-7",
        "password": token,
        "publishes": [],
    }));
    assert_eq!(wrong_client["connack"], 0x87, "{wrong_client}");
    // paho sends no password without a user name: no credentials at all, also 0x87.
    let no_token = paho(json!({
        "url": ws_url(&gateway),
        "version": 4,
        "client_id": "valve-7",
        "publishes": [],
    }));
    // CONNACK return code 5, which paho's version-2 callbacks report as reason 135.
    assert_eq!(no_token["connack"], 135, "{no_token}");
    let lines = gateway.sink("local");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|line| line["device"] == "valve-7"),
        "{lines:?}"
    );
}

/// paho-mqtt over TLS with a client certificate on `[mqtt] listen`, MQTT 3.1.1 and 5.0:
/// the certificate names the device; each publish is read back; one outside the
/// device's grant is refused (5.0: PUBACK 0x87; 3.1.1: the connection closed).
#[test]
fn paho_over_tls_with_a_client_certificate() {
    let certs = certs();
    let gateway = Gateway::start(&format!(
        r#"
        {}
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#,
        mtls_config(&certs)
    ));
    assert!(gateway.mqtt.starts_with("mqtts://"), "{}", gateway.mqtt);
    for version in [4, 5] {
        let report = paho(json!({
            "url": gateway.mqtt,
            "version": version,
            "client_id": "test-subscriber",
            "ca": certs.join("ca.pem"),
            "cert": certs.join("test-subscriber.pem"),
            "key": certs.join("test-subscriber.key"),
            "publishes": [
                {"topic": "devices/test-subscriber/t", "payload": format!("tls-v{version}"), "qos": 1},
                {"topic": "devices/someone-else/t", "payload": "denied", "qos": 1},
            ],
        }));
        assert_eq!(report["connack"], 0, "{report}");
        assert_eq!(report["results"][0]["reason"], 0, "{report}");
        if version == 5 {
            assert_eq!(report["results"][1]["reason"], 0x87, "{report}");
        } else {
            assert!(report["results"][1]["reason"].is_null(), "{report}");
            assert_eq!(report["disconnected"], true, "{report}");
        }
    }
    let lines = gateway.sink("local");
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["device"].as_str().unwrap(),
                l["payload_text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("test-subscriber", "tls-v4"), ("test-subscriber", "tls-v5")]
    );
}
