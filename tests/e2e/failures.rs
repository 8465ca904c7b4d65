//! Plugins that loop, allocate without bound or trap fail only their batch; the gateway
//! keeps serving.

use std::time::Duration;

use crate::harness::{Gateway, eventually, plugin, sluice};

fn misbehave_config(on_failure: &str) -> String {
    format!(
        r#"
        [plugins]
        call_timeout_ms = 100
        memory_limit_mib = 16
        on_failure = "{on_failure}"
        workers = 1
        [[plugins.transform]]
        name = "misbehave"
        path = "{}"
        "#,
        plugin("misbehave").display()
    )
}

#[test]
fn each_failure_gets_its_documented_response_and_the_next_request_succeeds() {
    let gateway = Gateway::start(&misbehave_config("reject"));
    let cases = [
        ("loop", 500, "plugin_timeout", "time limit of 100 ms"),
        (
            "alloc",
            500,
            "plugin_memory_limit",
            "memory limit of 16 MiB",
        ),
        ("trap", 500, "plugin_trap", "trapped"),
        ("fail", 422, "plugin_refused", "asked to fail"),
    ];
    for (payload, status, code, text) in cases {
        let reply = gateway.publish("t", "dev-1", payload);
        assert_eq!(reply.status, status, "{payload}: {:?}", reply.body);
        assert_eq!(reply.body["code"], code, "{payload}");
        assert_eq!(reply.body["plugin"], "misbehave");
        assert!(
            reply.body["message"].as_str().unwrap().contains(text),
            "{payload}: {:?}",
            reply.body
        );

        let good = gateway.publish("t", "dev-1", "fine");
        assert_eq!(good.status, 200, "after {payload}: {:?}", good.body);
        assert!(gateway.find(good.body["id"].as_str().unwrap()).is_some());
    }
    let stored = gateway.all_sink_lines();
    assert_eq!(stored.len(), 4, "only the good messages are stored");
    assert!(stored.iter().all(|line| line["payload_text"] == "fine"));
}

#[test]
fn a_crash_fails_its_whole_batch_and_nothing_else() {
    let gateway = Gateway::start(&misbehave_config("reject"));
    let batch = br#"{"messages": [
        {"topic": "t", "payload_base64": "b2s="},
        {"topic": "t", "payload_base64": "dHJhcA=="}
    ]}"#;
    let reply = gateway.post("/batch", "dev-1", batch.to_vec(), None);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let results = reply.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for result in results {
        assert_eq!(result["status"], "rejected", "{result}");
        assert_eq!(result["error"]["code"], "plugin_trap");
    }
    assert!(gateway.all_sink_lines().is_empty());
    let next = gateway.post(
        "/batch",
        "dev-1",
        br#"{"messages": [{"topic": "t", "payload_base64": "b2s="}]}"#.to_vec(),
        None,
    );
    assert_eq!(
        next.body["results"][0]["status"], "accepted",
        "{:?}",
        next.body
    );
}

#[test]
fn dead_letter_path_keeps_failed_messages_with_their_reason() {
    let gateway = Gateway::start(&misbehave_config("dead-letter"));
    let mut expected = Vec::new();
    for (payload, code) in [
        ("loop", "plugin_timeout"),
        ("trap", "plugin_trap"),
        ("fail", "plugin_refused"),
    ] {
        let reply = gateway.publish("t", "dev-7", payload);
        assert_eq!(reply.status, 200, "{payload}: {:?}", reply.body);
        assert_eq!(reply.body["status"], "dead-lettered");
        expected.push((
            reply.body["id"].as_str().unwrap().to_string(),
            payload,
            code,
        ));
    }
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 3, "{letters:?}");
    for (letter, (id, payload, code)) in letters.iter().zip(&expected) {
        assert_eq!(letter["id"], *id);
        assert_eq!(letter["device"], "dev-7");
        assert_eq!(letter["origin"]["stage"], "plugin");
        assert_eq!(letter["origin"]["plugin"], "misbehave");
        assert_eq!(letter["origin"]["code"], *code);
        let shown = gateway.admin_get(&format!("/admin/dlq/{}", letter["key"]));
        assert_eq!(shown["payload_text"], *payload);
    }
    assert!(gateway.all_sink_lines().is_empty(), "no sink got them");
    let good = gateway.publish("t", "dev-7", "fine");
    assert_eq!(good.body["status"], "accepted");
}

#[test]
fn a_poison_message_is_redriven_with_the_cli_after_the_plugin_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    std::fs::copy(plugin("misbehave"), &live).unwrap();
    let config = misbehave_config("dead-letter").replace(
        &plugin("misbehave").display().to_string(),
        &live.display().to_string(),
    );
    let gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let poison = gateway.publish("t", "dev-9", "trap");
    assert_eq!(poison.body["status"], "dead-lettered", "{:?}", poison.body);
    let id = poison.body["id"].as_str().unwrap().to_string();
    let config_path = gateway.dir.path().join("sluice.toml");
    let config_path = config_path.to_str().unwrap();
    // The token comes from the config file; the address from the running gateway (the
    // config asks for any free port).
    let target = ["--config", config_path, "--admin-url", &gateway.admin];

    let (code, listing, stderr) = sluice(&[&["dlq", "list"], &target[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        listing.contains(&id) && listing.contains("plugin:misbehave"),
        "{listing}"
    );
    // While the plugin is still broken, a redrive dead-letters it again, under a new key.
    let first_key = gateway.dead_letters()[0]["key"].as_u64().unwrap();
    let (code, out, stderr) =
        sluice(&[&["dlq", "redrive", &first_key.to_string()], &target[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("dead-lettered"), "{out}");
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_ne!(letters[0]["key"].as_u64().unwrap(), first_key);
    assert!(gateway.find(&id).is_none());

    // Fix the plugin: deploy a version that passes everything (same name, new file).
    let staged = live.with_extension("staged");
    std::fs::copy(plugin("passthrough"), &staged).unwrap();
    std::fs::rename(&staged, &live).unwrap();
    eventually(Duration::from_secs(30), "the fixed plugin", || {
        let probe = gateway.publish("probe", "dev-9", "trap");
        (probe.body["status"] == "accepted").then_some(())
    });

    let (code, out, stderr) = sluice(&[&["dlq", "redrive", "--all"], &target[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    // Probes sent while the reload was pending were dead-lettered too; all go through now.
    assert!(out.contains(&format!("{id} accepted")), "{out}");
    assert!(out.contains("not found: 0"), "{out}");
    let line = eventually(Duration::from_secs(30), "the redriven message", || {
        gateway.find(&id)
    });
    assert_eq!(line["payload_text"], "trap", "the message as it was sent");
    assert_eq!(line["device"], "dev-9");
    assert!(gateway.dead_letters().is_empty());
}
