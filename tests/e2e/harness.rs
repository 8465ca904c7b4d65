//! Starts the real `sluice` binary on a port chosen at run time and talks to it over
//! real sockets. Every delivery claim is checked by reading the sink's files back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `sluice` binary cargo built for these tests.
pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// How long a gateway may take to start listening (compiling plugins included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A plugin component built by `scripts/build-plugins`.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins (or scripts/test) first",
        path.display()
    );
    path
}

/// The file in a gateway's directory that receives its JSON log, when asked for.
const JSON_LOG: &str = "sluice-log.jsonl";

/// The admin token the harness gives every gateway it configures.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Configuration that routes every message to Kinesis on a closed port: nothing is
/// delivered, so every message stays in the spool's queue log.
pub const KINESIS_UNREACHABLE: &str = r#"
[aws]
region = "us-east-1"
[routing]
default_destination = "kinesis"
[sinks.kinesis]
endpoint_url = "http://127.0.0.1:9"
"#;

/// A running gateway with its own data directory; killed on drop.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT` (or https).
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin: String,
    /// `mqtt://127.0.0.1:PORT` (or `mqtts://`) of `[mqtt] listen`; empty without it.
    pub mqtt: String,
    /// Holds the config, the data directory and anything else the test puts there.
    pub dir: tempfile::TempDir,
    client: reqwest::blocking::Client,
}

/// A response: status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Gateway {
    /// Starts a gateway with `config` (TOML); `{dir}` in it stands for the gateway's
    /// temporary directory.
    pub fn start(config: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        Gateway::start_in(dir, config, reqwest::blocking::Client::new())
    }

    /// Like [`Gateway::start`], in a directory the test prepared, with its own client.
    pub fn start_in(
        dir: tempfile::TempDir,
        config: &str,
        client: reqwest::blocking::Client,
    ) -> Gateway {
        Gateway::launch(dir, config, client, Command::new(SLUICE))
    }

    /// Like [`Gateway::start`], the gateway run by `tracer` (a program and its options,
    /// e.g. `strace -f -o FILE`), with `sluice run` and its arguments after them.
    pub fn start_traced(config: &str, tracer: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(tracer[0]);
        command.args(&tracer[1..]).arg(SLUICE);
        Gateway::launch(dir, config, reqwest::blocking::Client::new(), command)
    }

    /// Writes `config` into `dir` and starts `command` (`sluice`, or a tracer running it)
    /// with `sluice run`'s arguments.
    fn launch(
        dir: tempfile::TempDir,
        config: &str,
        client: reqwest::blocking::Client,
        command: Command,
    ) -> Gateway {
        let config = with_admin(&config.replace("{dir}", &dir.path().display().to_string()));
        std::fs::write(dir.path().join("sluice.toml"), config).expect("write config");
        let (child, url, admin, mqtt) = spawn_with(dir.path(), command);
        Gateway {
            child,
            url,
            admin,
            mqtt,
            dir,
            client,
        }
    }

    /// For a gateway started with [`Gateway::start_traced`]: SIGTERM to the gateway (the
    /// tracer's child), and the tracer's exit status once the gateway is gone and the
    /// tracer has written all of its output.
    pub fn terminate_traced(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("the tracer's children");
        for child in children.split_whitespace() {
            let sent = Command::new("kill").args(["-TERM", child]).status();
            assert!(sent.expect("kill").success());
        }
        self.wait_exit(Duration::from_secs(30))
    }

    /// Like [`Gateway::start`], with info-level JSON logs written to a file in its
    /// directory (see [`Gateway::log_records`]).
    pub fn start_with_json_log(config: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(JSON_LOG), "").expect("log file");
        Gateway::start_in(dir, config, reqwest::blocking::Client::new())
    }

    /// Kills the gateway with SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the gateway with SIGKILL (no chance to clean up) and starts it again on
    /// the same configuration and data directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        let (child, url, admin, mqtt) = spawn(self.dir.path());
        self.child = child;
        self.url = url;
        self.admin = admin;
        self.mqtt = mqtt;
    }

    /// Kills the gateway with SIGKILL, runs `meanwhile` while it is down, and starts it
    /// again on the same configuration and data directory.
    pub fn crash_and_restart_after(&mut self, meanwhile: impl FnOnce()) {
        self.kill();
        meanwhile();
        let (child, url, admin, mqtt) = spawn(self.dir.path());
        self.child = child;
        self.url = url;
        self.admin = admin;
        self.mqtt = mqtt;
    }

    /// Starts the gateway again after [`Gateway::terminate`].
    pub fn restart(&mut self) {
        let (child, url, admin, mqtt) = spawn(self.dir.path());
        self.child = child;
        self.url = url;
        self.admin = admin;
        self.mqtt = mqtt;
    }

    /// Plugin `name` as `GET /admin/plugins` lists it.
    pub fn plugin_status(&self, name: &str) -> Value {
        self.admin_get("/admin/plugins")["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("plugin {name} listed"))
    }

    /// `GET` on the admin API.
    pub fn admin_get(&self, path: &str) -> Value {
        serde_json::from_str(&self.admin_text(path)).expect("admin JSON")
    }

    /// A Prometheus sample's value (`name{labels}`, exactly as exposed), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.admin_text("/metrics")
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `GET` on the admin API, as text (for `/metrics`).
    pub fn admin_text(&self, path: &str) -> String {
        let response = self
            .client
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("admin request");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.text().expect("admin text")
    }

    /// `POST` on the admin API with a body (JSON if `content_type` is none).
    pub fn admin_post(&self, path: &str, body: impl Into<Vec<u8>>) -> Reply {
        let response = self
            .client
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.into())
            .send()
            .expect("admin request");
        let status = response.status().as_u16();
        let text = response.text().expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    /// A token for `device` from `sluice token issue` on this gateway's configuration,
    /// valid for `ttl` (`1s`, `10m`, `1h`, …).
    pub fn issue_token(&self, device: &str, ttl: &str) -> String {
        let config = self.dir.path().join("sluice.toml");
        let (code, token, stderr) = sluice(&[
            "token",
            "issue",
            "--config",
            config.to_str().expect("a UTF-8 path"),
            "--device",
            device,
            "--ttl",
            ttl,
        ]);
        assert_eq!(code, 0, "sluice token issue: {stderr}");
        token.trim().to_string()
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's log records (JSON lines), when it was started by
    /// [`Gateway::start_with_json_log`].
    pub fn log_records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join(JSON_LOG)).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Records waiting in the spool, all sinks together.
    pub fn spooled(&self) -> u64 {
        self.admin_get("/admin/spool")["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .map(|q| q["records"].as_u64().unwrap())
            .sum()
    }

    /// Waits until every record acknowledged before this call has left the spool
    /// (delivered, or dead-lettered by its sink); later traffic does not hold it up.
    pub fn settle(&self) {
        let last = self.admin_get("/admin/spool")["last_seq"].as_u64().unwrap();
        eventually(Duration::from_secs(60), "the spool to drain", || {
            let stats = self.admin_get("/admin/spool");
            let queues = stats["queues"].as_array().unwrap();
            queues
                .iter()
                .all(|q| q["oldest"].as_u64().is_none_or(|oldest| oldest > last))
                .then_some(())
        });
    }

    /// Every dead letter (after the spool drained), oldest first.
    pub fn dead_letters(&self) -> Vec<Value> {
        self.settle();
        self.admin_get("/admin/dlq?limit=1000")["dead_letters"]
            .as_array()
            .expect("dead letters")
            .clone()
    }

    /// `POST /topics/{topic}` as `device`.
    pub fn publish(&self, topic: &str, device: &str, payload: impl Into<Vec<u8>>) -> Reply {
        self.post(&format!("/topics/{topic}"), device, payload.into(), None)
    }

    /// `POST path` with a body, as `device`.
    pub fn post(
        &self,
        path: &str,
        device: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> Reply {
        let mut request = self
            .client
            .post(format!("{}{path}", self.url))
            .header("x-device-id", device)
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().expect("request");
        let status = response.status().as_u16();
        let text = response.text().expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    /// The lines of the local sink's file for a destination kind, once the spool has
    /// drained.
    pub fn sink(&self, kind: &str) -> Vec<Value> {
        self.settle();
        let path = self.dir.path().join("data").join(format!("{kind}.jsonl"));
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        // With traffic still flowing, the writer may be in the middle of a line: a line
        // is complete once its newline is written (a reader can catch a flush half done).
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|line| serde_json::from_str(line).expect("sink line is JSON"))
            .collect()
    }

    /// Every sink line of every destination kind.
    pub fn all_sink_lines(&self) -> Vec<Value> {
        ["iot-core", "kinesis", "local"]
            .iter()
            .flat_map(|kind| self.sink(kind))
            .collect()
    }

    /// The sink line with message id `id`, in any destination file.
    pub fn find(&self, id: &str) -> Option<Value> {
        self.all_sink_lines()
            .into_iter()
            .find(|line| line["id"] == id)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(30))
    }

    /// Sends SIGTERM without waiting (see [`Gateway::wait_exit`]).
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A gateway run under a tracer is the tracer's child: killed first, or it would
        // go on once the tracer is gone.
        let pid = self.child.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for child in children.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", child]).status();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` with an admin listener on a free port, unless it has one.
fn with_admin(config: &str) -> String {
    let mut config = config.to_string();
    if !config.contains("[admin]") {
        config.push_str(&format!(
            "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
        ));
    }
    config
}

/// Starts `sluice run` on `dir`'s `sluice.toml` and data directory; returns the child,
/// the device URL, the admin URL and the MQTT URL (empty when not configured).
fn spawn(dir: &Path) -> (Child, String, String, String) {
    spawn_with(dir, Command::new(SLUICE))
}

/// [`spawn`] with `command` (`sluice`, or a tracer with `sluice` as its last argument),
/// to which `sluice run`'s arguments are added.
fn spawn_with(dir: &Path, mut command: Command) -> (Child, String, String, String) {
    command
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("sluice.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        // SLUICE_TEST_LOG (e.g. `debug`) shows more of the gateways' logs when a test
        // is looked into.
        .env(
            "SLUICE_LOG",
            std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".to_string()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // A gateway started with a JSON log keeps writing it across restarts.
    let log = dir.join(JSON_LOG);
    if log.is_file() {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("log file");
        command
            .env("SLUICE_LOG", "info")
            .env("SLUICE_LOG_FORMAT", "json")
            .stderr(file);
    }
    let mut child = command.spawn().expect("start sluice");
    let (url, admin, mqtt) = read_listening_lines(&mut child);
    (child, url, admin, mqtt)
}

/// Waits for `sluice: listening on URL` on the child's stdout (after `sluice: admin on
/// URL` and `sluice: mqtt on URL`, when configured) and returns the three URLs.
fn read_listening_lines(child: &mut Child) -> (String, String, String) {
    let stdout = child.stdout.take().expect("stdout");
    let (found, url) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut admin = String::new();
        let mut mqtt = String::new();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("sluice: admin on ") {
                admin = url.to_string();
            }
            if let Some(url) = line.strip_prefix("sluice: mqtt on ") {
                mqtt = url.to_string();
            }
            if let Some(url) = line.strip_prefix("sluice: listening on ") {
                let _ = found.send((url.to_string(), admin, mqtt));
                break;
            }
        }
        // Keep draining so the gateway never blocks on a full pipe.
        for _ in lines {}
    });
    match url.recv_timeout(START_TIMEOUT) {
        Ok(urls) => urls,
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            panic!("sluice did not start listening (exit status: {status:?})");
        }
    }
}

/// Runs `sluice` with `args` to completion: (exit code, stdout, stderr).
pub fn sluice(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(SLUICE)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run sluice");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls `check` until it returns `Some`, or fails after `timeout`. For effects that
/// happen asynchronously (a hot reload); never a stand-in for readiness.
/// Runs the Python client `script` (under `tests/clients`) with `args`; what it printed,
/// one JSON value per line.
pub fn python_client(script: &str, args: &[&str]) -> Vec<Value> {
    let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON: run scripts/test");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/clients")
        .join(script);
    let output = Command::new(python)
        .arg(path)
        .args(args)
        .output()
        .expect("run a Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A sensor frame (see plugins/sensor-decoder) with readings (time, centi-°C, sensor).
pub fn sensor_frame(readings: &[(u64, i16, u8)]) -> Vec<u8> {
    let mut frame = vec![b'S', b'F', 1, readings.len() as u8];
    for (time, centi, sensor) in readings {
        frame.extend_from_slice(&time.to_le_bytes());
        frame.extend_from_slice(&centi.to_le_bytes());
        frame.extend_from_slice(&5000u16.to_le_bytes());
        frame.extend_from_slice(&3300u16.to_le_bytes());
        frame.push(*sensor);
        frame.push(0);
    }
    frame
}
