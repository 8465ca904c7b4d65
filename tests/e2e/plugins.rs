//! Each example plugin's effect, seen in what the sink recorded.

use serde_json::json;

use crate::harness::{Gateway, plugin, sensor_frame};

fn enricher_config(on_invalid: &str) -> String {
    format!(
        r#"
        [[plugins.transform]]
        name = "enricher"
        path = "{}"
        config = {{ on_invalid = "{on_invalid}" }}
        "#,
        plugin("json_enricher").display()
    )
}

#[test]
fn enricher_adds_device_id_and_receive_time() {
    let gateway = Gateway::start(&enricher_config("fail"));
    let reply = gateway.publish(
        "sites/7/temp?qos=1",
        "dev-42",
        r#"{"temp": 21.5, "site_id": "s7"}"#,
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["message"], "OK");
    let id = reply.body["traceId"].as_str().expect("traceId").to_string();
    assert_eq!(reply.body["id"], id);

    let line = gateway.find(&id).expect("the message is in the sink");
    assert_eq!(line["device"], "dev-42");
    assert_eq!(line["topic"], "sites/7/temp");
    assert_eq!(line["payload"]["temp"], 21.5);
    assert_eq!(line["payload"]["device_id"], "dev-42");
    assert_eq!(line["payload"]["received_at_ms"], line["received_at_ms"]);
    assert!(line["received_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(line["content_type"], "application/json");
    assert_eq!(
        line["destination"],
        json!({"type": "iot-core", "topic": "sites/7/temp", "qos": 1})
    );
    assert_eq!(line["rule"], "builtin:default");
    assert!(line["reason"].as_str().unwrap().contains("default"));
}

#[test]
fn enricher_refuses_or_drops_invalid_json_as_configured() {
    let failing = Gateway::start(&enricher_config("fail"));
    let reply = failing.publish("a/b", "dev-1", "{not json");
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    assert_eq!(reply.body["code"], "plugin_refused");
    assert_eq!(reply.body["plugin"], "enricher");
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(
        failing.all_sink_lines().is_empty(),
        "a refused message reaches no sink"
    );

    let dropping = Gateway::start(&enricher_config("drop"));
    let reply = dropping.publish("a/b", "dev-1", "{not json");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "dropped");
    let good = dropping.publish("a/b", "dev-1", "[1,2]");
    assert_eq!(good.status, 200);
    let lines = dropping.all_sink_lines();
    assert_eq!(
        lines.len(),
        1,
        "only the valid message is stored: {lines:?}"
    );
    assert_eq!(lines[0]["payload"]["value"], json!([1, 2]));
}

#[test]
fn decoder_turns_a_frame_into_one_message_per_reading() {
    let config = format!(
        r#"
        [[plugins.transform]]
        name = "decoder"
        path = "{}"
        "#,
        plugin("sensor_decoder").display()
    );
    let gateway = Gateway::start(&config);
    let frame = sensor_frame(&[
        (1_764_000_000_000, 2137, 0),
        (1_764_000_001_000, -450, 1),
        (1_764_000_002_000, 0, 2),
    ]);
    let reply = gateway.post(
        "/topics/sites/3/frames",
        "dev-9",
        frame,
        Some("application/octet-stream"),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_string();
    let routes = reply.body["routes"].as_array().unwrap();
    let part_ids: Vec<&str> = routes.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        part_ids,
        [format!("{id}-0"), format!("{id}-1"), format!("{id}-2")]
    );

    let temperatures: Vec<f64> = part_ids
        .iter()
        .map(|part| {
            gateway.find(part).expect("each reading is stored")["payload"]["temperature_c"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(temperatures, [21.37, -4.5, 0.0]);
    let first = gateway.find(part_ids[0]).unwrap();
    assert_eq!(first["payload"]["device_id"], "dev-9");
    assert_eq!(first["payload"]["sensor"], 0);
    assert_eq!(first["payload"]["measured_at_ms"], 1_764_000_000_000u64);

    let mut cut = sensor_frame(&[(1, 1, 1)]);
    cut.pop();
    let reply = gateway.post(
        "/topics/sites/3/frames",
        "dev-9",
        cut,
        Some("application/octet-stream"),
    );
    assert_eq!(reply.status, 422);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("announces 1 readings"),
        "{:?}",
        reply.body
    );
}

#[test]
fn router_routes_by_topic_prefix_and_size_with_a_partition_key_from_the_payload() {
    let config = format!(
        r#"
        [plugins.router]
        name = "router"
        path = "{}"
        config = {{ kinesis_prefixes = "telemetry/", iot_core_prefixes = "alerts/", large_payload_bytes = 1000, stream = "telemetry-stream" }}
        "#,
        plugin("topic_router").display()
    );
    let gateway = Gateway::start(&config);

    let reply = gateway.publish(
        "telemetry/engine",
        "dev-1",
        r#"{"site_id": "north-7", "rpm": 900}"#,
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["destination"],
        json!({"type": "kinesis", "stream": "telemetry-stream", "partition_key": "north-7"})
    );
    assert_eq!(line["rule"], "plugin:router");
    assert_eq!(line["reason"], "topic prefix `telemetry/`");

    let reply = gateway.publish("alerts/fire", "dev-1", "{}");
    let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["destination"],
        json!({"type": "iot-core", "topic": "alerts/fire", "qos": 1})
    );

    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(2000));
    let reply = gateway.publish("misc/big", "dev-2", big);
    let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(line["destination"]["type"], "kinesis");
    assert_eq!(
        line["destination"]["partition_key"], "dev-2",
        "no site_id: the device id"
    );
    assert!(
        line["reason"].as_str().unwrap().contains("over 1000 B"),
        "{line}"
    );

    let reply = gateway.publish("misc/small", "dev-2", "{}");
    let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["rule"], "builtin:default",
        "no plugin rule: the built-in decision stands"
    );
}

#[test]
fn plugins_chain_in_configured_order() {
    let config = format!(
        r#"
        [[plugins.transform]]
        name = "decoder"
        path = "{}"
        [[plugins.transform]]
        name = "enricher"
        path = "{}"
        "#,
        plugin("sensor_decoder").display(),
        plugin("json_enricher").display()
    );
    let gateway = Gateway::start(&config);
    let reply = gateway.post(
        "/topics/s/f",
        "dev-3",
        sensor_frame(&[(5, 100, 4)]),
        Some("application/octet-stream"),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let line = gateway
        .find(reply.body["id"].as_str().unwrap())
        .expect("one reading keeps the id");
    assert_eq!(line["payload"]["temperature_c"], 1.0);
    assert_eq!(
        line["payload"]["received_at_ms"], line["received_at_ms"],
        "the enricher ran after the decoder"
    );
}

#[test]
fn compiled_plugins_are_cached_by_content_hash_and_loaded_from_the_cache() {
    use sha2::Digest as _;
    let sha256 = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    let enricher = plugin("json_enricher");
    let passthrough = plugin("passthrough");
    let enricher_hash = sha256(&std::fs::read(&enricher).unwrap());
    let passthrough_hash = sha256(&std::fs::read(&passthrough).unwrap());
    let config = format!(
        "[[plugins.transform]]\nname = \"e\"\npath = \"{}\"\n[[plugins.transform]]\nname = \"p\"\npath = \"{}\"\n",
        enricher.display(),
        passthrough.display()
    );
    // Its data directory holds the cache (by default) the later gateways share.
    let gateway = Gateway::start(&config);
    let cache = gateway.dir.path().join("data").join("plugin-cache");
    let mut entries: Vec<String> = std::fs::read_dir(&cache)
        .expect("the cache directory exists")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let entry_of = |hash: &str| {
        entries
            .iter()
            .find(|e| e.starts_with(&format!("{hash}-")) && e.ends_with(".cwasm"))
            .unwrap_or_else(|| panic!("an entry named by the content hash {hash}: {entries:?}"))
            .clone()
    };
    let enricher_entry = cache.join(entry_of(&enricher_hash));
    let passthrough_entry = cache.join(entry_of(&passthrough_hash));

    // Put passthrough's compiled code under the enricher's name. A gateway that loads
    // the enricher from the cache runs what the cache holds (messages pass unchanged);
    // one that compiled the file again would enrich them, and one that wrote its own
    // compilation back would change the entry.
    std::fs::copy(&passthrough_entry, &enricher_entry).unwrap();
    let planted = sha256(&std::fs::read(&enricher_entry).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[plugins]\ncache_dir = \"{}\"\n[[plugins.transform]]\nname = \"e\"\npath = \"{}\"\n",
        cache.display(),
        enricher.display()
    );
    let again = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let reply = again.publish("a", "dev-c", r#"{"k": 1}"#);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let line = again.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["payload"],
        json!({"k": 1}),
        "the cached code ran, not a fresh compilation of the enricher"
    );
    assert_eq!(
        sha256(&std::fs::read(&enricher_entry).unwrap()),
        planted,
        "the cache entry was not rewritten"
    );
    drop(again);

    // An entry that cannot be loaded is ignored: the file is compiled again (the
    // enricher enriches) and the entry replaced by a good one.
    std::fs::write(&enricher_entry, b"not a compiled component").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let third = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let reply = third.publish("a", "dev-c", r#"{"k": 1}"#);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let line = third.find(reply.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["payload"]["device_id"], "dev-c",
        "compiled afresh: {line}"
    );
    let rewritten = std::fs::read(&enricher_entry).unwrap();
    assert_ne!(&rewritten[..], b"not a compiled component");
    drop(gateway);
}
