//! Plugins that loop, allocate without bound or trap fail only their batch; the gateway
//! keeps serving.

use crate::harness::{Gateway, plugin};

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
    for (payload, code) in [
        ("loop", "plugin_timeout"),
        ("trap", "plugin_trap"),
        ("fail", "plugin_refused"),
    ] {
        let reply = gateway.publish("t", "dev-7", payload);
        assert_eq!(reply.status, 200, "{payload}: {:?}", reply.body);
        assert_eq!(reply.body["status"], "dead-lettered");
        let line = gateway
            .find(reply.body["id"].as_str().unwrap())
            .expect("dead-lettered");
        assert_eq!(line["destination"]["type"], "dead-letter");
        assert_eq!(line["rule"], format!("failure:{code}"));
        assert_eq!(line["payload_text"], payload);
        assert_eq!(line["device"], "dev-7");
    }
    assert_eq!(gateway.sink("dead-letter").len(), 3);
    let good = gateway.publish("t", "dev-7", "fine");
    assert_eq!(good.body["status"], "accepted");
}
