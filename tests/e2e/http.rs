//! The batch endpoint, HTTPS, and graceful shutdown.

use std::time::Duration;

use crate::harness::{Gateway, eventually, plugin};
use crate::net::{finish_in_flight, refuses_connections, requests_in_flight};

#[test]
fn batch_reports_each_message() {
    let config = format!(
        "[limits]\nmax_batch_messages = 3\n[[plugins.transform]]\nname = \"enricher\"\npath = \"{}\"\n",
        plugin("json_enricher").display()
    );
    let gateway = Gateway::start(&config);
    let body = br#"{"messages": [
        {"topic": "a/1", "payload": {"x": 1}},
        {"topic": "a/2", "payload_base64": "bm90IGpzb24="},
        {"topic": "a/3", "payload": [1, 2], "qos": 1, "attributes": {"k": "v"}}
    ]}"#;
    let reply = gateway.post("/batch", "dev-b", body.to_vec(), None);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let results = reply.body["results"].as_array().unwrap();
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["accepted", "rejected", "accepted"]);
    assert_eq!(results[1]["error"]["code"], "plugin_refused");
    let third = gateway.find(results[2]["id"].as_str().unwrap()).unwrap();
    assert_eq!(third["attributes"]["k"], "v");
    assert_eq!(third["qos"], 1);
    assert_eq!(third["payload"]["value"], serde_json::json!([1, 2]));
    assert_eq!(gateway.all_sink_lines().len(), 2);

    let four = br#"{"messages": [{"topic": "a"}, {"topic": "a"}, {"topic": "a"}, {"topic": "a"}]}"#;
    let reply = gateway.post("/batch", "dev-b", four.to_vec(), None);
    assert_eq!(reply.status, 413);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("4 messages")
    );
    let bad = gateway.post(
        "/batch",
        "dev-b",
        br#"{"messages": [{"topic": "a/#"}]}"#.to_vec(),
        None,
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .contains("messages[0]")
    );
    let garbage = gateway.post("/batch", "dev-b", b"[".to_vec(), None);
    assert_eq!(garbage.status, 400);
    assert_eq!(
        gateway.all_sink_lines().len(),
        2,
        "refused batches store nothing"
    );
}

#[test]
fn serves_https_with_a_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let config = "[server.tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n";
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let gateway = Gateway::start_in(dir, config, client);
    assert!(
        gateway.url.starts_with("https://127.0.0.1:"),
        "{}",
        gateway.url
    );
    let reply = gateway.publish("secure/topic", "dev-tls", "{}");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert!(gateway.find(reply.body["id"].as_str().unwrap()).is_some());

    let plain = reqwest::blocking::Client::new()
        .post(gateway.url.replace("https://", "http://") + "/topics/x")
        .body("{}")
        .send();
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served on the TLS port"
    );
}

#[test]
fn sigterm_answers_the_requests_in_flight_then_stops_cleanly() {
    let mut gateway = Gateway::start("");
    let reply = gateway.publish("a", "dev-1", "{}");
    assert_eq!(reply.status, 200);
    let before = reply.body["id"].as_str().unwrap().to_string();
    // Three requests inside the handler, each waiting for its body.
    let in_flight = requests_in_flight(&gateway.url, 3, "a");
    let data = gateway.dir.path().join("data").join("iot-core.jsonl");
    gateway.send_sigterm();
    eventually(Duration::from_secs(20), "the listener to close", || {
        refuses_connections(&gateway.url).then_some(())
    });
    assert!(
        gateway.running(),
        "the gateway waits for the requests in flight"
    );
    let late = finish_in_flight(in_flight);
    let status = gateway.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let text = std::fs::read_to_string(data).unwrap();
    let stored: Vec<String> = text
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for id in std::iter::once(&before).chain(&late) {
        assert!(stored.contains(id), "{id} in the sink: {stored:?}");
    }
}
