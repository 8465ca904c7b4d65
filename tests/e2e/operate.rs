//! Operating a running gateway: plugin versions through the admin API, configuration
//! reloads (admin API and SIGHUP) that keep connections open, per-plugin metrics, and
//! request ids in the logs.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest as _;

use crate::harness::{Gateway, eventually, plugin};
use crate::net::RawHttp;
use crate::wsclient::{self, next_json};

fn sha256(path: &std::path::Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn plugin_entry(gateway: &Gateway, name: &str) -> Value {
    gateway.admin_get("/admin/plugins")["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("plugin {name} is listed"))
        .clone()
}

fn upload(gateway: &Gateway, name: &str, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .post(format!(
            "{}/admin/plugins/{name}/versions{query}",
            gateway.admin
        ))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .body(bytes)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap())
}

/// One value of a Prometheus sample line `name{labels} value`.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.trim().parse().ok()
    })
}

/// Opens a WebSocket session as `dev-ws` and reads its welcome.
async fn open_session(gateway: &Gateway) -> wsclient::Socket {
    let mut socket = wsclient::connect(gateway, "dev-ws", "sluice.v1")
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "welcome");
    socket
}

/// Sends one publish frame on a session and returns the gateway's answer frame.
async fn ws_publish(socket: &mut wsclient::Socket, id: &str, topic: &str) -> Value {
    use futures_util::SinkExt as _;
    let frame = json!({"type": "publish", "id": id, "topic": topic, "payload": {"n": 1}});
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            frame.to_string().into(),
        ))
        .await
        .unwrap();
    next_json(socket).await
}

#[test]
fn uploaded_plugin_versions_are_validated_then_activated_and_survive_restarts() {
    // `on_invalid = "explode"` is fine for passthrough (it reads no configuration) but
    // refused by json-enricher's init: uploads are validated with the plugin's own
    // configuration.
    let config = format!(
        "[[plugins.transform]]\nname = \"chain\"\npath = \"{}\"\nconfig = {{ on_invalid = \"explode\" }}\n",
        plugin("passthrough").display()
    );
    let mut gateway = Gateway::start(&config);
    let passthrough_hash = sha256(&plugin("passthrough"));
    let misbehave_hash = sha256(&plugin("misbehave"));
    let before = plugin_entry(&gateway, "chain");
    assert_eq!(before["hash"], passthrough_hash.as_str());
    assert_eq!(before["source"], "configured");
    assert_eq!(before["kind"], "transform");

    let rt = wsclient::runtime();
    let mut session = rt.block_on(open_session(&gateway));
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);

    // Refused uploads change nothing.
    let refusals = [
        (b"not a component".to_vec(), "garbage"),
        (std::fs::read(plugin("topic_router")).unwrap(), "a router"),
        (
            std::fs::read(plugin("json_enricher")).unwrap(),
            "an init that refuses the configuration",
        ),
    ];
    for (bytes, what) in refusals {
        let (status, body) = upload(&gateway, "chain", bytes, "");
        assert_eq!(status, 422, "{what}: {body}");
        assert_eq!(body["code"], "plugin_invalid", "{what}: {body}");
    }
    assert_eq!(
        upload(
            &gateway,
            "nope",
            std::fs::read(plugin("misbehave")).unwrap(),
            ""
        )
        .0,
        404
    );
    assert_eq!(
        plugin_entry(&gateway, "chain")["hash"],
        passthrough_hash.as_str()
    );
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);

    // Stored without activating, then activated.
    let (status, body) = upload(
        &gateway,
        "chain",
        std::fs::read(plugin("misbehave")).unwrap(),
        "?activate=false",
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hash"], misbehave_hash.as_str());
    assert_eq!(body["active"], false);
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);
    let activated = gateway.admin_post(
        "/admin/plugins/chain/activate",
        json!({"hash": misbehave_hash}).to_string(),
    );
    assert_eq!(activated.status, 200, "{:?}", activated.body);
    let refused = gateway.publish("t", "dev-1", "fail");
    assert_eq!(
        refused.status, 422,
        "misbehave serves now: {:?}",
        refused.body
    );
    assert_eq!(gateway.publish("t", "dev-1", "fine").status, 200);

    // The session opened before the swap goes on.
    let answer = rt.block_on(ws_publish(&mut session, "after-swap", "t"));
    assert_eq!(answer["type"], "ack", "{answer}");

    let listed = plugin_entry(&gateway, "chain");
    assert_eq!(listed["hash"], misbehave_hash.as_str());
    assert_eq!(listed["source"], "uploaded");
    assert_eq!(
        listed["configured_path"],
        plugin("passthrough").to_str().unwrap()
    );
    assert!(
        listed["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hash"] == misbehave_hash.as_str()),
        "{listed}"
    );
    assert!(listed["calls"].as_u64().unwrap() >= 5, "{listed}");
    assert_eq!(listed["messages"]["plugin_refused"], 1, "{listed}");

    let metrics = gateway.admin_text("/metrics");
    let calls = sample(&metrics, "sluice_plugin_calls_total{plugin=\"chain\"}").unwrap();
    assert!(calls >= 5.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "sluice_plugin_messages_total{plugin=\"chain\",outcome=\"plugin_refused\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "sluice_plugin_call_seconds_count{plugin=\"chain\"}"
        ),
        Some(calls)
    );
    assert!(
        sample(
            &metrics,
            "sluice_plugin_batch_messages_sum{plugin=\"chain\"}"
        )
        .unwrap()
            >= calls
    );

    // The activation outlives a restart.
    assert!(gateway.terminate().success());
    gateway.restart();
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 422);
    assert_eq!(plugin_entry(&gateway, "chain")["source"], "uploaded");

    // Back to the configured file, and forward again.
    let back = gateway.admin_post(
        "/admin/plugins/chain/activate",
        json!({"configured": true}).to_string(),
    );
    assert_eq!(back.status, 200, "{:?}", back.body);
    assert_eq!(back.body["hash"], passthrough_hash.as_str());
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);
    let unknown = gateway.admin_post(
        "/admin/plugins/chain/activate",
        json!({"hash": "00ff"}).to_string(),
    );
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);

    // Stored versions can be deleted, but not the one serving.
    let delete = |hash: &str| {
        reqwest::blocking::Client::new()
            .delete(format!(
                "{}/admin/plugins/chain/versions/{hash}",
                gateway.admin
            ))
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let activated = gateway.admin_post(
        "/admin/plugins/chain/activate",
        json!({"hash": misbehave_hash}).to_string(),
    );
    assert_eq!(activated.status, 200);
    assert_eq!(delete(&misbehave_hash), 409, "the serving version stays");
    let back = gateway.admin_post(
        "/admin/plugins/chain/activate",
        json!({"configured": true}).to_string(),
    );
    assert_eq!(back.status, 200);
    assert_eq!(delete(&misbehave_hash), 204);
    assert_eq!(delete(&misbehave_hash), 404);
    assert!(
        plugin_entry(&gateway, "chain")["versions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);

    // The same through the command line.
    let admin = |args: &[&str]| {
        let mut all = vec![
            "admin",
            "--admin-url",
            gateway.admin.as_str(),
            "--token",
            crate::harness::ADMIN_TOKEN,
        ];
        all.extend_from_slice(args);
        crate::harness::sluice(&all)
    };
    let misbehave = plugin("misbehave");
    let (code, out, err) = admin(&["upload", "chain", misbehave.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 422);
    let (code, out, err) = admin(&["plugins"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("chain") && out.contains(&misbehave_hash[..12]),
        "{out}"
    );
    let (code, _, err) = admin(&["activate", "chain", "--configured"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(gateway.publish("t", "dev-1", "fail").status, 200);
    let (code, _, err) = admin(&["delete-version", "chain", &misbehave_hash]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = admin(&["delete-version", "chain", &misbehave_hash]);
    assert_eq!(code, 1);
    assert!(err.contains("not_found"), "{err}");
    let (code, out, err) = admin(&["reload"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["applied"],
        json!([]),
        "nothing changed in the file: {out}"
    );
    let (code, _, err) = admin(&["upload", "chain", "/nonexistent.wasm"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.wasm"), "{err}");
}

#[test]
fn config_reload_applies_live_sections_without_dropping_connections() {
    let base = |grants: &str, extra: &str| {
        format!(
            "[server]\nshutdown_grace_ms = 10000\n{extra}\n[[plugins.transform]]\nname = \"pass\"\npath = \"{}\"\n[policy]\n{grants}",
            plugin("passthrough").display()
        )
    };
    let grant = |name: &str, filter: &str| {
        format!(
            "[[policy.grants]]\nname = \"{name}\"\ndevices = [\"*\"]\npublish = [\"{filter}\"]\n"
        )
    };
    let gateway = Gateway::start(&base(&grant("a", "a/#"), ""));
    let config_file = gateway.dir.path().join("sluice.toml");
    // The harness appends the admin section; keep it in every rewrite.
    let admin = format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{}\"\n",
        crate::harness::ADMIN_TOKEN
    );
    let write = |text: String| std::fs::write(&config_file, text + &admin).unwrap();

    // One raw keep-alive HTTP connection (no client that would reconnect quietly) and
    // one WebSocket session, both opened before the reloads and used after each.
    let raw = std::cell::RefCell::new(RawHttp::connect(&gateway.url));
    let send = |topic: &str, body: &str| {
        let mut raw = raw.borrow_mut();
        let reply = raw
            .request(
                "POST",
                &format!("/topics/{topic}"),
                &[("x-device-id", "dev-1")],
                body.as_bytes(),
            )
            .unwrap_or_else(|e| panic!("the connection opened before the reloads: {e}"));
        assert_ne!(
            reply.header("connection"),
            Some("close"),
            "the gateway keeps the connection: {reply:?}"
        );
        reply.status
    };
    let post = |topic: &str| send(topic, "{}");
    let rt = wsclient::runtime();
    let mut session = rt.block_on(open_session(&gateway));
    assert_eq!(post("a/1"), 200);
    assert_eq!(post("b/1"), 403);
    let denied = rt.block_on(ws_publish(&mut session, "b-before", "b/1"));
    assert_eq!(denied["code"], "topic_denied", "{denied}");

    // A grant and a plugin more.
    write(base(
        &(grant("a", "a/#") + &grant("b", "b/#")),
        &format!(
            "[[plugins.transform]]\nname = \"mis\"\npath = \"{}\"\n",
            plugin("misbehave").display()
        ),
    ));
    // (The plugin entry above sits before `[[plugins.transform]] pass`, so `mis` runs
    // first.)
    let reloaded = gateway.admin_post("/admin/reload", "");
    assert_eq!(reloaded.status, 200, "{:?}", reloaded.body);
    let applied: Vec<&str> = reloaded.body["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        applied.contains(&"policy") && applied.contains(&"plugins"),
        "{applied:?}"
    );
    assert_eq!(reloaded.body["plugins_loaded"], json!(["mis"]));
    assert_eq!(reloaded.body["restart_required"], json!([]));
    assert_eq!(
        post("b/1"),
        200,
        "the same connection, under the new policy"
    );
    let accepted = rt.block_on(ws_publish(&mut session, "b-after", "b/1"));
    assert_eq!(accepted["type"], "ack", "the same session: {accepted}");
    assert_eq!(send("a/2", "fail"), 422, "the new plugin runs");

    // Refused reloads change nothing.
    let current = std::fs::read_to_string(&config_file).unwrap();
    for (broken, what) in [
        ("[policy\n".to_string(), "a syntax error"),
        (
            base(
                &grant("a", "a/#"),
                "[[plugins.transform]]\nname = \"gone\"\npath = \"/nonexistent/gone.wasm\"\n",
            ),
            "a missing plugin file",
        ),
        (
            base(
                &grant("a", "a/#"),
                "[sinks.iot_core]\ntransport = \"mqtt\"\n",
            ),
            "an invalid section",
        ),
        (
            // Valid on paper, with a policy change too, but the plugin's init refuses
            // its configuration: found only when loading, after the device side is built.
            base(
                &grant("a", "a/#"),
                &format!(
                    "[[plugins.transform]]\nname = \"enrich\"\npath = \"{}\"\nconfig = {{ on_invalid = \"explode\" }}\n",
                    plugin("json_enricher").display()
                ),
            ),
            "a plugin whose init refuses",
        ),
    ] {
        write(broken);
        let refused = gateway.admin_post("/admin/reload", "");
        assert_eq!(refused.status, 422, "{what}: {:?}", refused.body);
        assert_eq!(refused.body["code"], "invalid_config", "{what}");
        assert_eq!(post("b/1"), 200, "{what}: the b grant still holds");
    }
    std::fs::write(&config_file, current).unwrap();

    // Restart-only settings are listed, the live ones applied.
    write(base(&grant("a", "a/#"), "[plugins]\nworkers = 7\n"));
    let partly = gateway.admin_post("/admin/reload", "");
    assert_eq!(partly.status, 200, "{:?}", partly.body);
    assert_eq!(partly.body["restart_required"], json!(["plugins.workers"]));
    assert_eq!(partly.body["plugins_removed"], json!(["mis"]));
    assert_eq!(post("b/1"), 403);

    // SIGHUP does the same.
    write(base(&(grant("a", "a/#") + &grant("c", "c/#")), ""));
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(Duration::from_secs(30), "the c grant after SIGHUP", || {
        (post("c/1") == 200).then_some(())
    });
    let after = rt.block_on(ws_publish(&mut session, "c-after", "c/1"));
    assert_eq!(
        after["type"], "ack",
        "the session survived every reload: {after}"
    );
}

#[test]
fn request_ids_reach_the_logs_of_plugins() {
    let config = format!(
        "[[plugins.transform]]\nname = \"mis\"\npath = \"{}\"\n",
        plugin("misbehave").display()
    );
    let gateway = Gateway::start_with_json_log(&config);
    let client = reqwest::blocking::Client::new();
    let response = client
        .post(format!("{}/topics/logs/here", gateway.url))
        .header("x-device-id", "dev-1")
        .header("x-request-id", "req-abc-123")
        .body("log")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let message_id = response.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let record = eventually(Duration::from_secs(10), "the plugin's log record", || {
        gateway
            .log_records()
            .into_iter()
            .find(|r| r["fields"]["message"] == "asked to log")
    });
    assert_eq!(record["fields"]["plugin"], "mis", "{record}");
    assert_eq!(record["span"]["request_id"], "req-abc-123", "{record}");
    assert_eq!(
        record["span"]["message_id"],
        message_id.as_str(),
        "{record}"
    );
    assert!(
        record["fields"]["fields"]
            .as_str()
            .unwrap()
            .contains("logs/here"),
        "{record}"
    );

    // Without the header, the gateway names the request.
    let generated = client
        .post(format!("{}/topics/t", gateway.url))
        .header("x-device-id", "dev-1")
        .body("{}")
        .send()
        .unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
}
