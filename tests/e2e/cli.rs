//! `sluice plugin check`, `sluice plugin run` and `sluice config check`.

use crate::harness::{plugin, sluice};

#[test]
fn plugin_check_lists_imports_and_exports() {
    let path = plugin("topic_router");
    let (code, out, _) = sluice(&["plugin", "check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("world: sluice:plugin/router"), "{out}");
    assert!(
        out.contains("sluice:plugin/routing@0.1.0 (interface)"),
        "{out}"
    );
    assert!(out.contains("ok      sluice:plugin/types@0.1.0"), "{out}");
    assert!(out.contains("OK: the gateway accepts this plugin"), "{out}");
}

#[test]
fn components_with_forbidden_imports_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let component = wat::parse_str(
        r#"(component
            (import "wasi:sockets/tcp@0.2.0" (instance))
            (import "wasi:http/outgoing-handler@0.2.0" (instance))
        )"#,
    )
    .unwrap();
    let path = dir.path().join("sneaky.wasm");
    std::fs::write(&path, component).unwrap();

    let (code, out, _) = sluice(&["plugin", "check", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    // Sockets are linked without a network (CPython imports them in every component);
    // HTTP is refused, named, with why.
    assert!(
        out.contains("ok      wasi:sockets/tcp@0.2.0: linked without a network"),
        "{out}"
    );
    assert!(
        out.contains("REFUSED wasi:http/outgoing-handler@0.2.0: refused"),
        "{out}"
    );

    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[plugins.transform]]\nname = \"sneaky\"\npath = \"{}\"\n",
            path.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (code, _, err) = sluice(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("imports wasi:http/outgoing-handler@0.2.0, which plugins may not use"),
        "{err}"
    );
}

#[test]
fn a_router_configured_as_a_transform_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    let text = format!(
        "[[plugins.transform]]\nname = \"r\"\npath = \"{}\"\n",
        plugin("topic_router").display()
    );
    std::fs::write(&config, text).unwrap();
    let (code, _, err) = sluice(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is a router plugin but is configured as a transform"),
        "{err}"
    );
}

#[test]
fn plugin_run_prints_outcomes_for_sample_messages() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"topic": "a", "device_id": "d1", "payload": {"t": 1}, "received_at_ms": 5}"#,
            "\n",
            r#"{"topic": "a", "payload_text": "oops"}"#,
            "\n",
        ),
    )
    .unwrap();
    let path = plugin("json_enricher");
    let (code, out, err) = sluice(&[
        "plugin",
        "run",
        path.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--set",
        "time_field=ts",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[0]["outputs"][0]["payload"],
        serde_json::json!({"device_id": "d1", "ts": 5, "t": 1})
    );
    assert_eq!(lines[1]["failures"][0]["code"], "plugin_refused");
    assert!(err.contains("counter invalid_json = 1"), "{err}");
}

#[test]
fn config_check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[plugins]\nworkers = 0\n[routing]\nkinesis_stream = \"\"\n[[routing.rules]]\nname = \"r\"\ntopic = \"#/x\"\ndestination = \"kinesis\"\n",
    )
    .unwrap();
    let (code, _, err) = sluice(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("3 problem(s)"), "{err}");
    for expected in ["plugins.workers", "routing.kinesis_stream", "topic filter"] {
        assert!(err.contains(expected), "{expected} missing: {err}");
    }
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\nlisten_on = \"x\"\n").unwrap();
    let (code, _, err) = sluice(&["config", "check", "--config", unknown.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("listen_on"), "{err}");
}
