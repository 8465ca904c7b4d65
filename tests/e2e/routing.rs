//! The built-in routing policy and the payload limits, over HTTP.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Gateway, eventually};

const RULES: &str = r#"
    [routing]
    kinesis_stream = "main-stream"
    [[routing.rules]]
    name = "bulk"
    topic = "bulk/#"
    destination = "kinesis"
    stream = "bulk-stream"
    [[routing.rules]]
    name = "alarms"
    topic = "sites/+/alarms"
    destination = "iot-core"
    iot_topic = "fleet/alarms"
    qos = 0
    [[routing.rules]]
    name = "noise"
    topic = "debug/#"
    destination = "drop"
    [[routing.rules]]
    name = "keep-here"
    topic = "archive/#"
    destination = "local"
"#;

#[test]
fn size_decides_between_iot_core_and_kinesis() {
    let gateway = Gateway::start(RULES);
    let small = gateway.publish("a/b", "dev-1", vec![b'x'; 1000]);
    assert_eq!(small.status, 200);
    let line = gateway.find(small.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(line["destination"]["type"], "iot-core");

    let large = gateway.publish("a/b", "dev-1", vec![b'y'; 300 * 1024]);
    assert_eq!(large.status, 200, "{:?}", large.body);
    let line = gateway.find(large.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["destination"],
        json!({"type": "kinesis", "stream": "main-stream", "partition_key": "dev-1"})
    );
    assert_eq!(line["rule"], "builtin:payload-over-iot-core-limit");
    assert_eq!(
        line["payload_text"].as_str().unwrap().len(),
        300 * 1024,
        "payload intact"
    );

    let at_limit = gateway.publish("a/b", "dev-1", vec![b'z'; 1024 * 1024]);
    assert_eq!(at_limit.status, 200);

    let before = gateway.all_sink_lines().len();
    let over = gateway.publish("a/b", "dev-1", vec![b'z'; 1024 * 1024 + 1]);
    assert_eq!(over.status, 413);
    assert_eq!(over.body["code"], "payload_too_large");
    assert!(
        over.body["message"].as_str().unwrap().contains("1048576"),
        "{:?}",
        over.body
    );
    assert_eq!(
        gateway.all_sink_lines().len(),
        before,
        "nothing of a refused payload is stored"
    );
}

#[test]
fn topic_rules_choose_destinations_and_name_themselves() {
    let gateway = Gateway::start(RULES);
    let cases = [
        (
            "bulk/data",
            json!({"type": "kinesis", "stream": "bulk-stream", "partition_key": "dev-5"}),
            "rule:bulk",
        ),
        (
            "sites/9/alarms",
            json!({"type": "iot-core", "topic": "fleet/alarms", "qos": 0}),
            "rule:alarms",
        ),
        ("archive/2026", json!({"type": "local"}), "rule:keep-here"),
    ];
    for (topic, destination, rule) in cases {
        let reply = gateway.publish(topic, "dev-5", "{}");
        assert_eq!(reply.status, 200);
        let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
        assert_eq!(line["destination"], destination, "{topic}");
        assert_eq!(line["rule"], rule, "{topic}");
    }
    let dropped = gateway.publish("debug/x", "dev-5", "{}");
    assert_eq!(dropped.status, 200);
    assert_eq!(dropped.body["status"], "dropped");
    assert_eq!(dropped.body["routes"][0]["rule"], "rule:noise");
    assert!(gateway.find(dropped.body["id"].as_str().unwrap()).is_none());
    assert!(gateway.dir.path().join("data/local.jsonl").is_file());
    assert!(!gateway.dir.path().join("data/drop.jsonl").exists());
}

#[test]
fn iot_core_publish_api_rules_are_enforced() {
    let gateway = Gateway::start("");
    let ok = gateway.post("/topics/a/b?qos=1", "dev-1", b"{}".to_vec(), None);
    assert_eq!(ok.status, 200);
    let line = gateway.find(ok.body["traceId"].as_str().unwrap()).unwrap();
    assert_eq!(line["qos"], 1);
    assert_eq!(
        line["destination"]["qos"], 1,
        "IoT Core gets the QoS the device asked for"
    );

    let encoded = gateway.post("/topics/a%2Fb%2Fc", "dev-1", b"{}".to_vec(), None);
    assert_eq!(encoded.status, 200);
    assert_eq!(
        gateway.find(encoded.body["id"].as_str().unwrap()).unwrap()["topic"],
        "a/b/c"
    );

    for (path, why) in [
        ("/topics/a/b?qos=2", "qos"),
        ("/topics/a/%23", "wildcards"),
        ("/topics/a/b/c/d/e/f/g/h/i", "slashes"),
        ("/topics/a?bogus=1", "bogus"),
    ] {
        let reply = gateway.post(path, "dev-1", b"{}".to_vec(), None);
        assert_eq!(reply.status, 400, "{path}: {:?}", reply.body);
        assert_eq!(reply.body["code"], "bad_request", "{path}");
        assert!(
            reply.body["message"].as_str().unwrap().contains(why),
            "{path}: {:?}",
            reply.body
        );
    }
    let bad_device = gateway.post("/topics/a", "a/b", b"{}".to_vec(), None);
    assert_eq!(bad_device.status, 400);
    assert_eq!(
        gateway.all_sink_lines().len(),
        2,
        "only the two good publishes are stored"
    );
}

/// A best-effort message is answered before it is on disk; a durable one for the local
/// sink only after its line was synced, and without the spool (the file is durable
/// itself): one sync, no spool commit.
#[test]
fn a_best_effort_rule_skips_the_sync_and_a_durable_one_is_synced_once() {
    let config = r#"
        [[routing.rules]]
        name = "fast"
        topic = "fast/#"
        destination = "local"
        durability = "best-effort"
        [[routing.rules]]
        name = "safe"
        topic = "safe/#"
        destination = "local"
    "#;
    let gateway = Gateway::start(config);
    let commits = || {
        gateway.admin_get("/admin/spool")["durable_commits"]
            .as_u64()
            .unwrap()
    };
    let syncs = || gateway.metric("sluice_local_sink_syncs_total") as u64;
    let (commits_before, syncs_before) = (commits(), syncs());
    let fast = gateway.publish("fast/1", "dev-1", "quick");
    assert_eq!(fast.status, 200, "{:?}", fast.body);
    let id = fast.body["id"].as_str().unwrap().to_string();
    let line = eventually(Duration::from_secs(10), "the best-effort message", || {
        gateway.find(&id)
    });
    assert_eq!(line["rule"], "rule:fast");
    // Its sink syncs it after the answer, in its own time.
    eventually(
        Duration::from_secs(10),
        "the best-effort line synced",
        || (syncs() == syncs_before + 1).then_some(()),
    );

    let safe = gateway.publish("safe/1", "dev-1", "kept");
    assert_eq!(safe.status, 200, "{:?}", safe.body);
    assert_eq!(
        syncs(),
        syncs_before + 2,
        "one sync of the local sink's file before the acknowledgement"
    );
    assert_eq!(commits(), commits_before, "no spool commit for either");
    assert!(gateway.find(safe.body["id"].as_str().unwrap()).is_some());
}

#[test]
fn metrics_count_messages_refusals_and_deliveries_and_readiness_reports_ok() {
    let gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    let ready = reqwest::blocking::get(format!("{}/readyz", gateway.url)).unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(gateway.publish("m/1", "dev-1", "{}").status, 200);
    assert_eq!(gateway.publish("m/2", "dev-1", "{}").status, 200);
    assert_eq!(gateway.publish("bad/+", "dev-1", "{}").status, 400);
    gateway.settle();
    let client = reqwest::blocking::Client::new();
    let unauthorized = client
        .get(format!("{}/metrics", gateway.admin))
        .send()
        .unwrap();
    assert_eq!(unauthorized.status(), 401, "metrics need the admin token");
    let text = client
        .get(format!("{}/metrics", gateway.admin))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .unwrap()
        .text()
        .unwrap();
    for line in [
        r#"sluice_messages_total{status="accepted"} 2"#,
        r#"sluice_refused_total{status="bad_request"} 1"#,
        r#"sluice_sink_records_total{sink="local",outcome="delivered"} 2"#,
        r#"sluice_delivery_latency_seconds_count{sink="local"} 2"#,
        r#"sluice_spool_records{sink="local"} 0"#,
        // The local sink's records go straight to its file: one sync each, no spool commit.
        "sluice_local_sink_syncs_total 2",
        "sluice_spool_fsyncs 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}
