//! `sluice plugin new` for each language and kind, from an empty directory: the project
//! builds with its language's tools (installed by scripts/build-plugins), its own unit
//! test passes, and `sluice plugin run` runs the component over the project's samples.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::sluice;

fn tools() -> PathBuf {
    std::env::var_os("SLUICE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice-tools")
        })
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes the project, builds it, runs its test; the component file.
fn new_and_build(dir: &Path, name: &str, lang: &str, kind: &str) -> PathBuf {
    let project = dir.join(name);
    let (code, stdout, stderr) = sluice(&[
        "plugin",
        "new",
        project.to_str().unwrap(),
        "--lang",
        lang,
        "--kind",
        kind,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let world = if kind == "router" {
        "router"
    } else {
        "transform"
    };
    let crate_name = name.replace('-', "_");
    match lang {
        "rust" => {
            // One target directory across runs, so that only the first compiles
            // wit-bindgen.
            let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-new");
            run(
                Command::new("cargo")
                    .args(["build", "--release", "--target", "wasm32-wasip2"])
                    .env("CARGO_TARGET_DIR", &target)
                    .current_dir(&project),
                "cargo build",
            );
            run(
                Command::new("cargo")
                    .args(["test", "--release"])
                    .env("CARGO_TARGET_DIR", &target)
                    .current_dir(&project),
                "cargo test",
            );
            target.join(format!("wasm32-wasip2/release/{crate_name}.wasm"))
        }
        "python" => {
            let componentize = tools().join("py-tools/bin/componentize-py");
            let wasm = project.join(format!("{crate_name}.wasm"));
            run(
                Command::new(&componentize)
                    .args(["-d", "wit", "-w", world, "componentize", "app", "-o"])
                    .arg(&wasm)
                    .current_dir(&project),
                "componentize-py",
            );
            run(
                Command::new(&componentize)
                    .args(["-d", "wit", "-w", world, "bindings", "bindings"])
                    .current_dir(&project),
                "componentize-py bindings",
            );
            run(
                Command::new(tools().join("py-tools/bin/python"))
                    .args(["-m", "unittest", "test_app"])
                    .env("PYTHONPATH", "bindings:.")
                    .current_dir(&project),
                "the Python unit test",
            );
            wasm
        }
        "js" => {
            let wasm = project.join(format!("{crate_name}.wasm"));
            run(
                Command::new(tools().join("js-tools/node_modules/.bin/componentize-js"))
                    .args(["--wit", "wit/plugin.wit", "--world-name", world])
                    .args(["-d", "http", "-d", "fetch-event", "-o"])
                    .arg(&wasm)
                    .arg("app.js")
                    .current_dir(&project),
                "componentize-js",
            );
            run(
                Command::new("node")
                    .args(["--import", "./testing/register.js", "--test"])
                    .current_dir(&project),
                "the Node unit test",
            );
            wasm
        }
        other => panic!("{other}"),
    }
}

fn outputs(wasm: &Path, samples: &Path) -> Vec<Value> {
    let (code, stdout, stderr) = sluice(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--input",
        samples.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_new_transform_in_each_language_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "python", "js"] {
        let name = format!("tag-{lang}");
        let wasm = new_and_build(dir.path(), &name, lang, "transform");
        let lines = outputs(&wasm, &dir.path().join(&name).join("samples.jsonl"));
        assert_eq!(lines.len(), 2, "{lang}: {lines:?}");
        for line in lines {
            assert_eq!(
                line["outputs"][0]["attributes"][format!("{name}.seen")],
                "true",
                "{lang}: {line}"
            );
        }
    }
}

#[test]
fn a_new_router_in_each_language_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "python", "js"] {
        let name = format!("route-{lang}");
        let wasm = new_and_build(dir.path(), &name, lang, "router");
        let lines = outputs(&wasm, &dir.path().join(&name).join("samples.jsonl"));
        let destinations: Vec<Value> = lines
            .iter()
            .map(|line| line["outputs"][0]["router"]["destination"]["type"].clone())
            .collect();
        assert_eq!(
            destinations,
            [Value::Null, Value::from("kinesis")],
            "{lang}: {lines:?}"
        );
    }
}
