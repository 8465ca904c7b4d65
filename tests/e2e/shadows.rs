//! IoT Core's Device Shadow API over HTTPS through Sluice: boto3's `iot-data` client (a
//! client nobody here wrote) with a device certificate, against moto's IoT data plane
//! behind the gateway; every change read back from moto itself.

use serde_json::{Value, json};

use crate::cloud::{TestEnv, unique};
use crate::devices::{Ca, server_cert};
use crate::harness::{Gateway, python_client};

/// A gateway with mutual TLS whose devices may use their own thing's shadows, IoT Core
/// being moto (HTTPS transport); the device certificates' files for `devices`.
fn gateway(env: &TestEnv, devices: &[&str]) -> (Gateway, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    server_cert(dir.path());
    let ca = Ca::new("Shadow Fleet CA");
    std::fs::write(dir.path().join("devices-ca.pem"), &ca.pem).unwrap();
    let files = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let (pem, _) = ca.device(device, "fleet", i as u8 + 1, false);
            let file = dir.path().join(format!("{device}.pem"));
            std::fs::write(&file, pem).unwrap();
            file.display().to_string()
        })
        .collect();
    let config = format!(
        r#"
        [server.tls]
        cert = "{{dir}}/server.pem"
        key = "{{dir}}/server.key"
        [auth.mtls]
        ca = ["{{dir}}/devices-ca.pem"]
        [[policy.grants]]
        name = "own-shadows"
        devices = ["*"]
        publish = ["$aws/things/${{device.id}}/shadow/#"]
        [aws]
        region = "us-east-1"
        endpoint_url = "{}"
        [sinks.iot_core]
        transport = "https"
        [routing]
        default_destination = "local"
        "#,
        env.aws_endpoint()
    );
    let gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    (gateway, files)
}

/// `calls` made by boto3 as the device whose certificate is `cert`, after creating
/// `things` in moto's registry.
fn boto3(
    env: &TestEnv,
    gateway: &Gateway,
    cert: &str,
    things: &[&str],
    calls: Value,
) -> Vec<Value> {
    let port = gateway.url.rsplit(':').next().unwrap();
    let spec = json!({
        "endpoint": format!("https://localhost:{port}"),
        "ca": gateway.dir.path().join("server.pem"),
        "cert": cert,
        "registry": env.aws_endpoint(),
        "things": things,
        "calls": calls,
    });
    python_client("shadow_http.py", &[&spec.to_string()])
}

fn refused(answer: &Value) -> (u64, &str) {
    assert_eq!(answer["ok"], false, "{answer}");
    (
        answer["status"].as_u64().unwrap(),
        answer["code"].as_str().unwrap(),
    )
}

#[test]
fn boto3_iot_data_shadow_calls_go_through_sluice_to_iot_core() {
    let env = TestEnv::get();
    let me = unique("shadow-me");
    let other = unique("shadow-other");
    let (gateway, certs) = gateway(&env, &[&me, &other]);
    let answers = boto3(
        &env,
        &gateway,
        &certs[0],
        &[&me, &other],
        json!([
            {"op": "update", "thing": me, "document": {"state": {"reported": {"temp": 21}}}},
            {"op": "get", "thing": me},
            {"op": "get", "thing": me, "via": "registry"},
            {"op": "update", "thing": me, "shadow": "config",
             "document": {"state": {"desired": {"rate": 5}}}},
            {"op": "update", "thing": me, "shadow": "firmware",
             "document": {"state": {"reported": {"version": "1.2"}}}},
            {"op": "list", "thing": me},
            {"op": "get", "thing": me, "shadow": "config"},
            {"op": "update", "thing": me, "shadow": "config",
             "document": {"state": {"desired": {"rate": 6}}, "version": 99}},
            {"op": "delete", "thing": me, "shadow": "config"},
            {"op": "get", "thing": me, "shadow": "config"},
            {"op": "get", "thing": me, "shadow": "config", "via": "registry"},
            {"op": "get", "thing": me, "shadow": "firmware", "via": "registry"},
            // Another device's thing: Sluice's policy says no, before IoT Core is asked.
            {"op": "get", "thing": other},
            {"op": "update", "thing": other, "document": {"state": {"desired": {"x": 1}}}},
            {"op": "list", "thing": other},
            {"op": "update", "thing": other, "document": {"state": {"desired": {"x": 1}}},
             "via": "registry"},
            {"op": "get", "thing": other, "via": "registry"},
        ]),
    );
    assert_eq!(answers.len(), 17, "{answers:?}");
    // Update and get, as the SDK reads IoT Core's documents; moto has it.
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    assert_eq!(answers[0]["result"]["state"]["reported"]["temp"], 21);
    assert_eq!(answers[0]["result"]["version"], 1);
    for read in [&answers[1], &answers[2]] {
        assert_eq!(read["result"]["state"]["reported"]["temp"], 21, "{read}");
        assert_eq!(read["result"]["version"], 1);
    }
    // Named shadows, and their list.
    assert_eq!(answers[3]["result"]["state"]["desired"]["rate"], 5);
    assert_eq!(answers[4]["ok"], true);
    let mut listed: Vec<&str> = answers[5]["result"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ["config", "firmware"], "{}", answers[5]);
    assert!(answers[5]["result"]["timestamp"].is_i64());
    assert_eq!(answers[6]["result"]["state"]["desired"]["rate"], 5);
    // IoT Core's own refusal comes back as it sent it: a stale version is a conflict.
    assert_eq!(refused(&answers[7]), (409, "ConflictException"));
    // Deleted, through Sluice: gone at moto too.
    assert_eq!(answers[8]["ok"], true, "{}", answers[8]);
    assert!(answers[8]["result"]["version"].is_u64(), "{}", answers[8]);
    assert_eq!(refused(&answers[9]), (404, "ResourceNotFoundException"));
    assert_eq!(refused(&answers[10]), (404, "ResourceNotFoundException"));
    // (moto lists deleted named shadows still; its get says they are gone.)
    assert_eq!(answers[11]["result"]["state"]["reported"]["version"], "1.2");
    // Denied by the policy, with IoT Core's error type; nothing reached moto.
    for denied in &answers[12..15] {
        assert_eq!(refused(denied), (403, "ForbiddenException"));
    }
    assert!(
        answers[14]["message"]
            .as_str()
            .unwrap()
            .contains("/shadow/name/+/get")
    );
    assert_eq!(answers[15]["ok"], true, "the other thing's own update");
    assert_eq!(
        answers[16]["result"]["version"], 1,
        "the denied update never reached IoT Core: {}",
        answers[16]
    );
}

/// Names that would reach into another topic level are refused before anything else;
/// without `[sinks.iot_core]` the routes say that IoT Core answers them.
#[test]
fn shadow_routes_refuse_bad_names_and_need_an_iot_core_sink() {
    let gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    let client = reqwest::blocking::Client::new();
    let call = |method: reqwest::Method, path: &str| {
        let response = client
            .request(method, format!("{}{path}", gateway.url))
            .header("x-device-id", "dev-1")
            .body("{}")
            .send()
            .unwrap();
        let error_type = response
            .headers()
            .get("x-amzn-errortype")
            .map(|v| v.to_str().unwrap().to_string());
        let status = response.status().as_u16();
        (status, error_type, response.json::<Value>().unwrap())
    };
    for path in ["/things/a%2Bb/shadow", "/things/dev-1/shadow?name=a%2Fb"] {
        let (status, error_type, body) = call(reqwest::Method::GET, path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_type.as_deref(), Some("InvalidRequestException"));
    }
    for (method, path) in [
        (reqwest::Method::GET, "/things/dev-1/shadow"),
        (reqwest::Method::POST, "/things/dev-1/shadow?name=config"),
        (reqwest::Method::DELETE, "/things/dev-1/shadow"),
        (
            reqwest::Method::GET,
            "/api/things/shadow/ListNamedShadowsForThing/dev-1",
        ),
    ] {
        let (status, error_type, body) = call(method, path);
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["code"], "shadows_not_configured");
        assert_eq!(error_type.as_deref(), Some("ServiceUnavailableException"));
    }
}
