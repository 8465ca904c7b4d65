//! JavaScript plugins (componentize-js) in the real gateway: the payload-router example
//! sends each message where its payload fields say (read back from the sink file of each
//! destination), and is the same through `sluice plugin run`; a JavaScript guest that
//! throws, loops or grows its memory without end fails only its own batch, under the
//! default limits, and the gateway keeps serving.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Gateway, eventually, plugin, sluice};

/// A plugin cache shared by these tests' gateways: a JavaScript component takes about
/// 20 s to compile, once; each gateway's own data directory would compile it again.
fn cache_dir() -> String {
    format!("{}/js-plugin-cache", env!("CARGO_TARGET_TMPDIR"))
}

/// The sink line of message `id` in the file of destination `kind`.
fn line_in(gateway: &Gateway, kind: &str, id: &Value) -> Value {
    gateway
        .sink(kind)
        .into_iter()
        .find(|line| line["id"] == *id)
        .unwrap_or_else(|| panic!("message {id} is in {kind}.jsonl"))
}

#[test]
fn the_javascript_router_routes_by_payload_fields_through_the_gateway() {
    let gateway = Gateway::start(&format!(
        r#"
        [plugins]
        cache_dir = "{}"
        [plugins.router]
        name = "payload-router"
        path = "{}"
        config = {{ stream = "uploads", bulk_readings = "3" }}
        "#,
        cache_dir(),
        plugin("payload_router_js").display()
    ));

    let alarm = gateway.publish(
        "sites/7/boiler?qos=1",
        "boiler-12",
        r#"{"alarm": true, "site_id": "s7"}"#,
    );
    assert_eq!(alarm.status, 200, "{:?}", alarm.body);
    let line = line_in(&gateway, "iot-core", &alarm.body["id"]);
    assert_eq!(
        line["destination"],
        json!({"type": "iot-core", "topic": "alarms/boiler-12", "qos": 1})
    );
    assert_eq!(line["rule"], "plugin:payload-router");
    assert_eq!(line["reason"], "alarm");
    assert_eq!(
        line["topic"], "sites/7/boiler",
        "the message keeps its own topic"
    );

    let many = gateway.publish(
        "sites/9/upload",
        "logger-4",
        r#"{"site_id": "north-9", "readings": [1, 2, 3]}"#,
    );
    let line = line_in(&gateway, "kinesis", &many.body["id"]);
    assert_eq!(
        line["destination"],
        json!({"type": "kinesis", "stream": "uploads", "partition_key": "north-9"})
    );
    assert_eq!(line["reason"], "bulk: 3 readings");

    let flagged = gateway.publish("sites/9/upload", "logger-5", r#"{"bulk": true}"#);
    let line = line_in(&gateway, "kinesis", &flagged.body["id"]);
    assert_eq!(
        line["destination"]["partition_key"], "logger-5",
        "no site_id in the payload: the device id"
    );
    assert_eq!(line["reason"], "bulk flag");

    // Two readings, a non-JSON payload: the built-in decision (IoT Core on the
    // message's topic), not the plugin's.
    let few = gateway.publish("sites/9/temp", "sensor-1", r#"{"readings": [1, 2]}"#);
    let text = gateway.publish("sites/9/raw", "sensor-1", "21.5 C");
    for (reply, topic) in [(&few, "sites/9/temp"), (&text, "sites/9/raw")] {
        let line = line_in(&gateway, "iot-core", &reply.body["id"]);
        assert_eq!(line["rule"], "builtin:default", "{line}");
        assert_eq!(line["destination"]["topic"], topic);
    }

    let status = gateway.plugin_status("payload-router");
    assert_eq!(
        status["counters"],
        json!({"alarms": 1, "bulk": 2, "not_json": 1}),
        "{status}"
    );
    assert_eq!(
        gateway.all_sink_lines().len(),
        5,
        "each message stored once"
    );
}

#[test]
fn the_javascript_router_checks_and_runs_offline_with_sluice_plugin_run() {
    let component = plugin("payload_router_js");
    let component = component.to_str().unwrap();
    let (code, out, stderr) = sluice(&["plugin", "check", component]);
    assert_eq!(code, 0, "{out}{stderr}");
    assert!(out.contains("world: sluice:plugin/router"), "{out}");
    assert!(!out.contains("wasi:http"), "no HTTP import: {out}");

    let samples = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/payload-router-js/samples.jsonl"
    );
    let (code, out, stderr) = sluice(&["plugin", "run", component, "--input", samples]);
    assert_eq!(code, 0, "{stderr}");
    let decisions: Vec<Value> = out
        .lines()
        .map(|line| {
            let result: Value = serde_json::from_str(line).expect("one JSON result per line");
            result["outputs"][0]["router"].clone()
        })
        .collect();
    assert_eq!(
        decisions,
        [
            json!({"destination": {"type": "iot-core", "topic": "alarms/boiler-12", "qos": 1}, "reason": "alarm"}),
            json!({"destination": {"type": "kinesis", "stream": "", "partition_key": "s7"}, "reason": "bulk flag"}),
            json!({"destination": {"type": "kinesis", "stream": "", "partition_key": "9"}, "reason": "bulk: 100 readings"}),
            json!({"destination": null, "reason": "no payload rule"}),
            json!({"destination": null, "reason": "payload is not a JSON object"}),
        ]
    );
    assert!(stderr.contains("counter alarms = 1"), "{stderr}");

    // A bad configuration refuses the plugin at init with the constructor's message.
    let (code, _, stderr) = sluice(&[
        "plugin", "run", component, "--input", samples, "--set", "qos=2",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("qos must be 0 or 1, not `2`"), "{stderr}");
}

/// Under the default limits (the same as for Rust plugins): a throw is a trap, a loop
/// runs into the time limit, unbounded allocation into the memory limit. Each fails its
/// own request with its code, the instance is rebuilt, and the next request is served.
#[test]
fn a_misbehaving_javascript_plugin_fails_only_its_batch() {
    let gateway = Gateway::start_with_json_log(&format!(
        r#"
        [routing]
        default_destination = "local"
        [plugins]
        cache_dir = "{}"
        workers = 1
        [[plugins.transform]]
        name = "misbehave-js"
        path = "{}"
        "#,
        cache_dir(),
        plugin("misbehave_js").display()
    ));
    for (command, code, text) in [
        ("throw", "plugin_trap", "trapped"),
        ("loop", "plugin_timeout", "time limit of 200 ms"),
        ("alloc", "plugin_memory_limit", "memory limit of 64 MiB"),
    ] {
        let reply = gateway.publish("t/x", "dev-1", command);
        assert_eq!(reply.status, 500, "{command}: {:?}", reply.body);
        assert_eq!(reply.body["code"], code, "{command}: {:?}", reply.body);
        assert_eq!(reply.body["plugin"], "misbehave-js");
        assert!(
            reply.body["message"].as_str().unwrap().contains(text),
            "{command}: {:?}",
            reply.body
        );
        let after = gateway.publish("t/x", "dev-1", format!("fine after {command}"));
        assert_eq!(after.status, 200, "after {command}: {:?}", after.body);
    }

    // A throw in one message fails its whole batch, and only that batch.
    let batch = |payloads: &[&str]| {
        let messages: Vec<Value> = payloads
            .iter()
            .map(|p| json!({"topic": "t/b", "payload_base64": p}))
            .collect();
        let body = json!({ "messages": messages }).to_string().into_bytes();
        gateway.post("/batch", "dev-2", body, None)
    };
    let (ok, throw) = ("b2s=", "dGhyb3c=");
    let failed = batch(&[ok, throw]);
    let results = failed.body["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{:?}", failed.body);
    for result in results {
        assert_eq!(result["status"], "rejected", "{result}");
        assert_eq!(result["error"]["code"], "plugin_trap");
    }
    let next = batch(&[ok]);
    assert_eq!(
        next.body["results"][0]["status"], "accepted",
        "{:?}",
        next.body
    );

    let stored: Vec<String> = gateway
        .sink("local")
        .iter()
        .map(|line| line["payload_text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        stored,
        [
            "fine after throw",
            "fine after loop",
            "fine after alloc",
            "ok"
        ]
    );
    // The runtime's report of the uncaught exception reaches the log, with the plugin's
    // name, through its stderr.
    eventually(Duration::from_secs(10), "the exception in the log", || {
        gateway
            .log_records()
            .iter()
            .any(|r| {
                r["fields"]["stream"] == "stderr"
                    && r["fields"]["plugin"] == "misbehave-js"
                    && r["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("asked to throw"))
            })
            .then_some(())
    });
}

/// A router scoped to `sites/#` decides only for those topics: the same alarm on another
/// topic keeps the built-in decision and is counted out of the router's scope.
#[test]
fn a_router_scoped_by_topic_decides_only_for_its_topics() {
    let gateway = Gateway::start(&format!(
        r#"
        [plugins]
        cache_dir = "{}"
        [plugins.router]
        name = "payload-router"
        path = "{}"
        topics = ["sites/#"]
        "#,
        cache_dir(),
        plugin("payload_router_js").display()
    ));
    let inside = gateway.publish("sites/1/boiler", "boiler-1", r#"{"alarm": true}"#);
    assert_eq!(inside.status, 200, "{:?}", inside.body);
    let line = line_in(&gateway, "iot-core", &inside.body["id"]);
    assert_eq!(line["rule"], "plugin:payload-router");
    let outside = gateway.publish("plant/1/boiler", "boiler-1", r#"{"alarm": true}"#);
    assert_eq!(outside.status, 200, "{:?}", outside.body);
    let line = line_in(&gateway, "iot-core", &outside.body["id"]);
    assert_eq!(
        line["rule"], "builtin:default",
        "outside its topics: {line}"
    );
    let status = gateway.plugin_status("payload-router");
    assert_eq!(status["messages"]["routed"], 1, "{status}");
    assert_eq!(status["messages"]["out_of_scope"], 1, "{status}");
    assert_eq!(status["counters"]["alarms"], 1, "{status}");
}
