//! The operator's console in a real headless Chromium (selenium, tests/clients/browser.py):
//! signing in, counters and charts following traffic published over HTTP, a dead letter
//! redriven from the page and read back at the sink, a refused plugin upload with its
//! validation error. Each test saves a screenshot under target/e2e-artifacts/console/.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Gateway, eventually, plugin};

/// A headless Chromium driven over selenium, one JSON command per line.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
}

impl Browser {
    fn start() -> Browser {
        let python =
            std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON: run scripts/test");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/browser.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the browser driver");
        let commands = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap());
        let mut browser = Browser {
            child,
            commands,
            answers,
        };
        let started = browser.read();
        assert_eq!(started["value"], "started", "{started}");
        browser
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.answers.read_line(&mut line).expect("driver answer");
        assert!(!line.is_empty(), "the browser driver exited");
        serde_json::from_str(&line).expect("driver JSON")
    }

    /// Runs `command`; its value, or the test fails with the driver's error.
    fn run(&mut self, command: Value) -> Value {
        writeln!(self.commands, "{command}").unwrap();
        let answer = self.read();
        assert_eq!(answer["ok"], true, "{command}: {answer}");
        answer["value"].clone()
    }

    fn open(&mut self, url: &str) {
        self.run(json!({"op": "open", "url": url}));
    }

    fn type_into(&mut self, css: &str, text: &str) {
        self.run(json!({"op": "type", "css": css, "text": text}));
    }

    fn click(&mut self, css: &str) {
        self.run(json!({"op": "click", "css": css}));
    }

    fn text(&mut self, css: &str) -> String {
        self.run(json!({"op": "text", "css": css}))
            .as_str()
            .unwrap()
            .to_string()
    }

    fn visible(&mut self, css: &str) -> bool {
        self.run(json!({"op": "visible", "css": css})) == true
    }

    fn wait_text(&mut self, css: &str, contains: &str) -> String {
        self.run(json!({"op": "wait_text", "css": css, "contains": contains, "timeout": 15}))
            .as_str()
            .unwrap()
            .to_string()
    }

    fn js(&mut self, script: &str) -> Value {
        self.run(json!({"op": "js", "script": script}))
    }

    /// Saves a screenshot as target/e2e-artifacts/console/NAME.png.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/e2e-artifacts/console")
            .join(format!("{name}.png"));
        self.run(json!({"op": "screenshot", "path": path}));
        let bytes = std::fs::read(&path).expect("screenshot file");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        path
    }

    /// Opens the console and signs in with the admin token.
    fn sign_in(&mut self, gateway: &Gateway) {
        self.open(&format!("{}/", gateway.admin));
        self.type_into("#token", ADMIN_TOKEN);
        self.click("#signin-button");
        self.wait_text("#readiness", "ready");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.commands, r#"{{"op": "quit"}}"#);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A transform that dead-letters `fail` payloads (tests/guests/misbehave).
fn misbehave_config() -> String {
    format!(
        r#"
        [plugins]
        on_failure = "dead-letter"
        workers = 1
        [[plugins.transform]]
        name = "misbehave"
        path = "{}"
        "#,
        plugin("misbehave").display()
    )
}

#[test]
fn a_wrong_token_is_refused_and_the_counters_and_charts_follow_traffic() {
    let gateway = Gateway::start("");
    let mut browser = Browser::start();
    browser.open(&format!("{}/", gateway.admin));
    assert!(browser.visible("#signin"));
    assert!(
        !browser.visible("#tabs"),
        "nothing but the form before signing in"
    );

    browser.type_into("#token", "not-the-admin-token");
    browser.click("#signin-button");
    browser.wait_text("#signin-error", "Wrong token");
    assert!(!browser.visible("#overview"));
    assert_eq!(browser.js("return sessionStorage.length"), 0);
    browser.screenshot("refused-token");

    browser.type_into("#token", ADMIN_TOKEN);
    browser.click("#signin-button");
    browser.wait_text("#readiness", "ready");
    assert!(browser.visible("#overview"));
    assert_eq!(browser.text("#total-accepted"), "0");
    // The token is kept for the tab only.
    assert_eq!(browser.js("return localStorage.length"), 0);
    assert_eq!(
        browser.js("return sessionStorage.getItem('sluice-admin-token')"),
        ADMIN_TOKEN
    );

    for n in 0..25 {
        let reply = gateway.publish("sites/1/temp", "console-dev", format!(r#"{{"n": {n}}}"#));
        assert_eq!(reply.body["status"], "accepted", "{:?}", reply.body);
    }
    browser.wait_text("#total-accepted", "25");
    // The chart was given the traffic: the accepted line and a destination line rose.
    let peak = |browser: &mut Browser, chart: &str, series: usize| {
        browser
            .js(&format!(
                "const d = window.sluiceConsole.charts.{chart}.data[{series}];
                 return Math.max(0, ...d.filter((v) => v !== null));"
            ))
            .as_f64()
            .unwrap()
    };
    eventually(
        Duration::from_secs(10),
        "the chart to show the messages",
        || (peak(&mut browser, "messages", 1) > 0.0).then_some(()),
    );
    let routed: f64 = (1..=4)
        .map(|series| peak(&mut browser, "destinations", series))
        .sum();
    assert!(routed > 0.0, "a destination line rose");
    let points = browser.js("return window.sluiceConsole.charts.messages.data[0].length");
    assert!(points.as_u64().unwrap() >= 2, "{points}");

    browser.click("#tabs button[data-tab=routes]");
    browser.wait_text("#routes-table", "builtin:");
    let shot = browser.screenshot("counters-and-charts");
    browser.click("#tabs button[data-tab=overview]");
    browser.screenshot("overview");

    // Signing out forgets the token; the page shows nothing again.
    browser.click("#signout");
    assert!(browser.visible("#signin"));
    assert_eq!(browser.js("return sessionStorage.length"), 0);
    eprintln!("screenshots in {}", shot.parent().unwrap().display());
}

#[test]
fn a_dead_letter_is_redriven_from_the_page_and_read_back_at_the_sink() {
    let gateway = Gateway::start(&misbehave_config());
    let poison = gateway.publish("t/1", "console-dev", "fail");
    assert_eq!(poison.body["status"], "dead-lettered", "{:?}", poison.body);
    let id = poison.body["id"].as_str().unwrap().to_string();

    let mut browser = Browser::start();
    browser.sign_in(&gateway);
    browser.wait_text("#dead-letters", "1");
    browser.click("#tabs button[data-tab=dlq]");
    let listed = browser.wait_text("#dlq-table", "asked to fail");
    assert!(
        listed.contains("console-dev") && listed.contains("t/1"),
        "{listed}"
    );
    browser.click("#dlq-table tbody tr button");
    let shown = browser.wait_text("#dlq-payload", "text:");
    assert!(shown.contains(&id) && shown.contains("fail"), "{shown}");

    // While the plugin still fails, a redrive from the page dead-letters it again.
    browser.click("#dlq-redrive-all");
    let result = browser.wait_text("#dlq-result", "Redriven 1");
    assert!(result.contains("dead-lettered"), "{result}");
    assert!(gateway.find(&id).is_none());

    // Fix the plugin from the page: upload a version that passes everything.
    browser.click("#tabs button[data-tab=plugins]");
    browser.wait_text("#plugins-table", "misbehave");
    browser.run(json!({"op": "file", "css": "#upload-file", "path": plugin("passthrough")}));
    browser.click("#upload-button");
    browser.wait_text("#upload-result", "it serves now");

    // Redrive the one letter, by its own button this time.
    browser.click("#tabs button[data-tab=dlq]");
    browser.wait_text("#dlq-table", "asked to fail");
    browser.js("document.querySelectorAll('#dlq-table tbody tr button')
             .forEach((b) => { if (b.textContent === 'Redrive') b.click(); });");
    let result = browser.wait_text("#dlq-result", &format!("{id}: accepted"));
    assert!(result.contains("Redriven 1"), "{result}");
    let delivered = eventually(
        Duration::from_secs(10),
        "the redriven message at the sink",
        || gateway.find(&id),
    );
    assert_eq!(delivered["payload_text"], "fail", "{delivered}");
    assert!(gateway.dead_letters().is_empty());
    browser.screenshot("dead-letter-redriven");
}

#[test]
fn a_plugin_upload_that_fails_validation_shows_why_and_changes_nothing() {
    let gateway = Gateway::start(&misbehave_config());
    let before = gateway.admin_get("/admin/plugins")["plugins"][0]["hash"].clone();
    let mut browser = Browser::start();
    browser.sign_in(&gateway);
    browser.click("#tabs button[data-tab=plugins]");
    browser.wait_text("#plugins-table", "misbehave");

    // A router offered as a version of a transform: it compiles, but is the wrong kind.
    browser.run(json!({"op": "file", "css": "#upload-file", "path": plugin("topic_router")}));
    browser.click("#upload-button");
    let refused = browser.wait_text("#upload-result", "Refused (plugin_invalid)");
    assert!(
        refused.contains("transform"),
        "the validation error is shown: {refused}"
    );

    // Not a component at all.
    let junk = gateway.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is not WebAssembly").unwrap();
    browser.run(json!({"op": "file", "css": "#upload-file", "path": junk}));
    browser.click("#upload-button");
    let refused = browser.wait_text("#upload-result", "Refused (plugin_invalid)");
    assert!(
        refused.len() > "Refused (plugin_invalid): ".len(),
        "{refused}"
    );
    browser.screenshot("upload-refused");

    let after = gateway.admin_get("/admin/plugins")["plugins"][0]["hash"].clone();
    assert_eq!(before, after, "the running version is unchanged");
    let reply = gateway.publish("t/1", "console-dev", "fine");
    assert_eq!(reply.body["status"], "accepted");
}

/// The Devices tab lists an open WebSocket session with its protocol, its address and
/// its messages, as the admin API counts them.
#[test]
fn the_devices_tab_shows_a_connected_session() {
    let gateway = Gateway::start("");
    let runtime = crate::wsclient::runtime();
    let mut socket = runtime
        .block_on(crate::wsclient::connect(&gateway, "panel-7", "sluice.v1"))
        .unwrap();
    assert_eq!(
        runtime.block_on(crate::wsclient::next_json(&mut socket))["type"],
        "welcome"
    );
    let mut browser = Browser::start();
    browser.sign_in(&gateway);
    browser.click("#tabs button[data-tab=devices]");
    let row = browser.wait_text("#sessions-table tbody", "panel-7");
    assert!(row.contains("websocket"), "{row}");
    assert!(row.contains("127.0.0.1:"), "the session's address: {row}");
    browser.screenshot("devices");
    drop(socket);
}
