//! Certificates registered at AWS IoT (`[auth.registry]`) against moto's IoT control
//! plane: certificates made there as AWS makes them (`CreateKeysAndCertificate`: subject
//! "AWS IoT Certificate", a CA the gateway was never told about), attached to things with
//! boto3 (`tests/clients/iot_registry.py`), used by paho-mqtt and reqwest over real TLS.

use serde_json::{Value, json};

use crate::cloud::{TestEnv, unique};
use crate::devices::{Ca, server_cert};
use crate::harness::{Gateway, python_client};
use crate::mqtt_sessions::PahoSession;

/// Runs `op` against moto's registry (see `iot_registry.py`).
fn registry(env: &TestEnv, op: Value) -> Value {
    python_client("iot_registry.py", &[&env.aws_endpoint(), &op.to_string()]).remove(0)
}

/// An HTTPS publish with the client certificate in `pem` (certificate and key): the status
/// and body, or the TLS failure.
fn publish(gateway: &Gateway, pem: &str, topic: &str) -> Result<(u16, Value), String> {
    let response = client(gateway, pem)
        .post(format!("{}/topics/{topic}?qos=1", gateway.url))
        .body(r#"{"t":1}"#)
        .send()
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    Ok((status, response.json().unwrap_or(Value::Null)))
}

/// A client of `gateway` with the client certificate in `pem` (certificate and key).
fn client(gateway: &Gateway, pem: &str) -> reqwest::blocking::Client {
    let server = std::fs::read_to_string(gateway.dir.path().join("server.pem")).unwrap();
    let identity = std::fs::read_to_string(pem).unwrap();
    crate::devices::client(&server, Some(&identity))
}

#[test]
fn certificates_registered_at_aws_iot_name_their_thing_until_made_inactive() {
    let env = TestEnv::get();
    let dir = tempfile::tempdir().unwrap();
    server_cert(dir.path());
    let certs = dir.path().display().to_string();
    let thing = unique("reg-thing");
    let device = |name: &str, things: &[&str]| {
        registry(
            &env,
            json!({"op": "device", "dir": certs, "name": name, "things": things}),
        )
    };
    let one = device("one", &[&thing]);
    // Beside them, a certificate of the operator's own CA (`[auth.mtls]`), named by its CN.
    let ca = Ca::new("Own Fleet CA");
    std::fs::write(dir.path().join("own-ca.pem"), &ca.pem).unwrap();
    let (own_pem, _) = ca.device("own-device", "fleet", 1, false);
    let own = dir.path().join("own-device.pem").display().to_string();
    std::fs::write(&own, own_pem).unwrap();
    let two = device("two", &[&unique("reg-a"), &unique("reg-b")]);
    let none = device("none", &[]);
    let config = format!(
        r#"
        [server.tls]
        cert = "{{dir}}/server.pem"
        key = "{{dir}}/server.key"
        [mqtt]
        listen = "127.0.0.1:0"
        [auth.registry]
        refresh_secs = 3600
        [auth.mtls]
        ca = ["{{dir}}/own-ca.pem"]
        [aws]
        region = "us-east-1"
        endpoint_url = "{}"
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#,
        env.aws_endpoint()
    );
    let mut gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let pem = |answer: &Value| answer["pem"].as_str().unwrap().to_string();
    let readyz: Value = client(&gateway, &pem(&one))
        .get(format!("{}/readyz", gateway.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        readyz["ready"], true,
        "the first snapshot is read before the listener opens: {readyz}"
    );
    assert!(gateway.metric("sluice_registry_snapshot_age_seconds") < 60.0);

    // HTTPS: the certificate's thing is the device, although its CN says otherwise and
    // its CA was never configured.
    let topic = format!("devices/{thing}/t");
    let (status, body) = publish(&gateway, &pem(&one), &topic).unwrap();
    assert_eq!(status, 200, "{body}");
    let line = gateway.find(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(line["device"], thing.as_str());
    let (status, body) = publish(&gateway, &own, "devices/own-device/t").unwrap();
    assert_eq!(status, 200, "{body}");
    let line = gateway.find(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["device"], "own-device",
        "the CA bundle's certificate, by its CN"
    );
    // Attached to two things, or to none: refused with the reason.
    for (answer, count) in [(&two, 2), (&none, 0)] {
        let (status, body) = publish(&gateway, &pem(answer), "devices/x/t").unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("certificate_not_one_thing")),
            "{body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(&format!("{count} things")),
            "{body}"
        );
    }

    // MQTT: a live session as the thing.
    let session = PahoSession::start(json!({
        "url": gateway.mqtt.replace("127.0.0.1", "localhost"),
        "tls": {"ca": format!("{certs}/server.pem"), "cert": pem(&one), "key": pem(&one)},
        "version": 5, "client_id": thing, "expect": 1, "timeout": 60,
        "publishes": [{"topic": format!("devices/{thing}/mqtt"), "payload": "live", "qos": 1}],
    }));
    assert_eq!(session.next("connack")["reason"], 0);
    assert_eq!(session.next("puback")["reason"], 0);
    let stored = gateway
        .all_sink_lines()
        .into_iter()
        .find(|line| line["topic"] == format!("devices/{thing}/mqtt").as_str())
        .expect("the MQTT publish in the sink");
    assert_eq!(stored["device"], thing.as_str());

    // Made INACTIVE at AWS IoT: after a refresh, the live session is closed and the
    // next connection fails the handshake.
    let certificate_id = one["certificate_id"].as_str().unwrap();
    let changed = registry(
        &env,
        json!({"op": "status", "certificate_id": certificate_id, "status": "INACTIVE"}),
    );
    assert_eq!(changed["status"], "INACTIVE");
    let refreshed = gateway.admin_post("/admin/registry/refresh", "");
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.body);
    assert_eq!(refreshed.body["changed"], true);
    let end = session.next("end");
    assert_eq!(end["disconnect_reason"], 0x87, "not authorized: {end}");
    let refused = publish(&gateway, &pem(&one), &topic);
    assert!(refused.is_err(), "the handshake fails: {refused:?}");

    // ACTIVE again; then restarted with the control plane unreachable: the snapshot kept
    // on disk still admits it.
    registry(
        &env,
        json!({"op": "status", "certificate_id": certificate_id, "status": "ACTIVE"}),
    );
    assert_eq!(
        gateway.admin_post("/admin/registry/refresh", "").status,
        200
    );
    let (status, body) = publish(&gateway, &pem(&one), &topic).unwrap();
    assert_eq!(status, 200, "{body}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let file = gateway.dir.path().join("sluice.toml");
    gateway.crash_and_restart_after(|| {
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace(&env.aws_endpoint(), &unreachable)).unwrap();
    });
    let (status, body) = publish(&gateway, &pem(&one), &topic).unwrap();
    assert_eq!(status, 200, "admitted from the snapshot: {body}");
    let line = gateway.find(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(line["device"], thing.as_str());
    let failed = gateway.admin_post("/admin/registry/refresh", "");
    assert_eq!(failed.status, 502, "{:?}", failed.body);
    assert_eq!(failed.body["code"], "registry_unavailable");
}
