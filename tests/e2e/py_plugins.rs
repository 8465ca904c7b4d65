//! Python plugins (componentize-py) in the real gateway: the vendor-csv example decodes
//! and converts, scoped to its topics (its own counters prove what it was sent); a
//! Python guest that traps, loops, blows its memory up or sleeps fails only its own
//! batch, and the gateway keeps serving; its `print` lands in the log.

use std::time::Duration;

use crate::harness::{Gateway, eventually, plugin};

/// vendor-csv, scoped to `raw/#`: CSV on a raw topic is converted (a two-line payload
/// split in two); the same bad CSV on another topic passes untouched, and the plugin
/// never saw it (its `bad_lines` counter stays at the raw topic's one).
#[test]
fn the_python_vendor_csv_plugin_converts_only_the_topics_it_is_for() {
    let gateway = Gateway::start(&format!(
        r#"
        [routing]
        default_destination = "local"
        [[plugins.transform]]
        name = "vendor-csv"
        path = "{}"
        topics = ["raw/#"]
        config = {{ columns = "ts,temp_f,pressure_psi" }}
        "#,
        plugin("vendor_csv_py").display()
    ));
    let one = gateway.publish("raw/probe/1", "probe-1", "1700000000,212,14.7");
    assert_eq!(one.status, 200, "{:?}", one.body);
    let two = gateway.publish("raw/probe/1", "probe-1", "1,32,0\n2,50,0");
    assert_eq!(two.status, 200, "{:?}", two.body);
    let bad = gateway.publish("raw/probe/1", "probe-1", "1,hot,0");
    assert_eq!(bad.status, 422, "{:?}", bad.body);
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .contains("`temp_f` is not a number"),
        "{:?}",
        bad.body
    );
    let elsewhere = gateway.publish("other/probe/1", "probe-1", "1,hot,0");
    assert_eq!(
        elsewhere.status, 200,
        "outside its topics: {:?}",
        elsewhere.body
    );
    let lines = gateway.sink("local");
    let payloads: Vec<String> = lines
        .iter()
        .map(|l| {
            l.get("payload")
                .map(|p| p.to_string())
                .unwrap_or_else(|| l["payload_text"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        payloads,
        [
            r#"{"ts":1700000000,"temp_c":100.0,"pressure_kpa":101.35}"#,
            r#"{"ts":1,"temp_c":0.0,"pressure_kpa":0.0}"#,
            r#"{"ts":2,"temp_c":10.0,"pressure_kpa":0.0}"#,
            "1,hot,0",
        ]
    );
    let status = gateway.plugin_status("vendor-csv");
    assert_eq!(status["counters"]["readings"], 3, "{status}");
    assert_eq!(
        status["counters"]["bad_lines"], 1,
        "never sent the other topic: {status}"
    );
    assert_eq!(status["messages"]["out_of_scope"], 1, "{status}");
    assert_eq!(status["topics"], serde_json::json!(["raw/#"]));
}

/// A Python guest that traps, loops, runs out of memory or sleeps past the time limit:
/// each fails its own request with the precise code, and the next request is served.
#[test]
fn a_misbehaving_python_plugin_fails_only_its_batch() {
    let gateway = Gateway::start_with_json_log(&format!(
        r#"
        [routing]
        default_destination = "local"
        [[plugins.transform]]
        name = "misbehave-py"
        path = "{}"
        "#,
        plugin("misbehave_py").display()
    ));
    for (command, code) in [
        ("trap", "plugin_trap"),
        ("loop", "plugin_timeout"),
        ("grow", "plugin_memory_limit"),
        ("sleep", "plugin_timeout"),
    ] {
        let reply = gateway.publish("t/x", "dev-1", command);
        assert_eq!(reply.body["code"], code, "{command}: {:?}", reply.body);
        let after = gateway.publish("t/x", "dev-1", format!("fine after {command}"));
        assert_eq!(after.status, 200, "after {command}: {:?}", after.body);
    }
    let printed = gateway.publish("t/x", "dev-1", "print");
    assert_eq!(printed.status, 200);
    let stored: Vec<String> = gateway
        .sink("local")
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        stored,
        [
            "fine after trap",
            "fine after loop",
            "fine after grow",
            "fine after sleep",
            "print"
        ]
    );
    // `print` and stderr land in the gateway's log with the plugin's name.
    eventually(
        Duration::from_secs(10),
        "the plugin's print in the log",
        || {
            let records = gateway.log_records();
            let line = |stream: &str, text: &str| {
                records.iter().any(|r| {
                    r["fields"]["stream"] == stream
                        && r["fields"]["plugin"] == "misbehave-py"
                        && r["fields"]["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(text))
                })
            };
            (line("stdout", "hello from python") && line("stderr", "a warning")).then_some(())
        },
    );
}

/// A large component's first compile is announced (log lines when stderr is not a
/// terminal) with the time it took; the next load comes from the cache and compiles
/// nothing.
#[test]
fn a_large_plugins_first_compile_is_announced_and_then_cached() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    std::fs::write(
        &samples,
        "{\"topic\": \"raw/1\", \"payload_text\": \"1,32,0,1\"}\n",
    )
    .unwrap();
    let run = || {
        let output = std::process::Command::new(crate::harness::SLUICE)
            .args(["plugin", "run"])
            .arg(plugin("vendor_csv_py"))
            .arg("--input")
            .arg(&samples)
            .env("SLUICE_LOG", "info")
            .current_dir(dir.path())
            .output()
            .expect("sluice plugin run");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let first = run();
    assert!(first.contains("compiling plugin"), "{first}");
    assert!(first.contains("for the first time"), "{first}");
    assert!(
        first.contains("compiled plugin") && first.contains("seconds"),
        "{first}"
    );
    let second = run();
    assert!(
        !second.contains("compiling plugin"),
        "from the cache: {second}"
    );
}
