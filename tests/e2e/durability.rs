//! No acknowledged message is lost: `kill -9` under load, a Kinesis server stopped and
//! started again, a full spool, SIGTERM with records still waiting. Every check reads
//! the stream back and compares message ids (the Kinesis sink's JSON envelope carries
//! them) with the ids the gateway acknowledged.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::cloud::{TestEnv, kinesis_client, read_records, unique};
use crate::harness::{Gateway, eventually};

/// Devices publishing as fast as the gateway answers, to whatever URL it has now.
struct Load {
    url: Arc<RwLock<String>>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    full: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Tally>>,
}

/// What one device saw.
#[derive(Default)]
struct Tally {
    /// Ids of messages answered `200`.
    acked: Vec<String>,
    /// `503 spool_full` answers, and how many of them carried `Retry-After`.
    full: usize,
    full_with_retry_after: usize,
}

impl Load {
    fn start(url: &str, devices: usize, payload_bytes: usize) -> Load {
        let url = Arc::new(RwLock::new(url.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let full = Arc::new(AtomicUsize::new(0));
        let threads = (0..devices)
            .map(|device| {
                let (url, stop, acked, full) =
                    (url.clone(), stop.clone(), acked.clone(), full.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let padding = "x".repeat(payload_bytes);
                    let mut tally = Tally::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let base = url.read().unwrap().clone();
                        let sent = client
                            .post(format!("{base}/topics/load"))
                            .header("x-device-id", format!("device-{device}"))
                            .body(format!(r#"{{"n":{n},"pad":"{padding}"}}"#))
                            .send();
                        // A refused connection or a reset: the gateway is down; not acked.
                        let Ok(response) = sent else { continue };
                        let status = response.status().as_u16();
                        let retry_after = response.headers().contains_key("retry-after");
                        let Ok(body) = response.json::<Value>() else {
                            continue;
                        };
                        match status {
                            200 => {
                                tally.acked.push(body["id"].as_str().unwrap().to_string());
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            503 if body["code"] == "spool_full" => {
                                tally.full += 1;
                                tally.full_with_retry_after += usize::from(retry_after);
                                full.fetch_add(1, Ordering::Relaxed);
                            }
                            503 => {}
                            other => panic!("unexpected answer {other}: {body}"),
                        }
                    }
                    tally
                })
            })
            .collect();
        Load {
            url,
            stop,
            acked,
            full,
            threads,
        }
    }

    fn retarget(&self, url: &str) {
        *self.url.write().unwrap() = url.to_string();
    }

    /// Waits until `more` messages beyond those acknowledged so far are acknowledged.
    fn wait_for_acks(&self, more: usize) {
        let target = self.acked.load(Ordering::Relaxed) + more;
        eventually(Duration::from_secs(120), "acknowledgements", || {
            (self.acked.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for thread in self.threads {
            let tally = thread.join().expect("load thread");
            total.acked.extend(tally.acked);
            total.full += tally.full;
            total.full_with_retry_after += tally.full_with_retry_after;
        }
        total
    }
}

/// Message ids found in the stream's envelopes.
fn ids_in_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> (HashSet<String>, usize) {
    let records = read_records(client, stream);
    let ids: HashSet<String> = records
        .iter()
        .map(|(_, _, _, data)| {
            let envelope: Value = serde_json::from_slice(data).expect("a JSON envelope");
            envelope["id"].as_str().expect("an id").to_string()
        })
        .collect();
    (ids, records.len())
}

fn assert_none_missing(acked: &[String], stored: &HashSet<String>) {
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages are not in the stream, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn acknowledged_messages_survive_kill_9_under_load() {
    let env = TestEnv::get();
    let stream = unique("crash");
    env.create_stream(&stream, 2);
    let config = env
        .kinesis_config(&stream, "")
        .replace("linger_ms = 5", "linger_ms = 5\nenvelope = true");
    let mut gateway = Gateway::start(&config);
    let load = Load::start(&gateway.url, 4, 100);
    for _ in 0..4 {
        load.wait_for_acks(300);
        gateway.crash_and_restart();
        load.retarget(&gateway.url);
    }
    load.wait_for_acks(300);
    let tally = load.finish();
    gateway.settle();
    let (stored, records) = ids_in_stream(&kinesis_client(&env.aws_endpoint()), &stream);
    assert_none_missing(&tally.acked, &stored);
    eprintln!(
        "kill -9 x4: {} acknowledged, {} records in the stream ({} duplicates), 0 missing",
        tally.acked.len(),
        records,
        records - stored.len()
    );
}

/// A kinesalite of the test's own, persisting to a directory, so it can be stopped and
/// started again with its streams and records.
struct OwnKinesalite {
    child: Option<Child>,
    port: u16,
    data: tempfile::TempDir,
}

impl OwnKinesalite {
    fn start() -> OwnKinesalite {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = OwnKinesalite {
            child: None,
            port,
            data: tempfile::tempdir().unwrap(),
        };
        server.resume();
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let var =
            |name: &str| {
                PathBuf::from(std::env::var(name).unwrap_or_else(|_| {
                    panic!("{name} is not set: run the tests with scripts/test")
                }))
            };
        let child = Command::new("node")
            .arg(var("SLUICE_TEST_KINESALITE_JS"))
            .arg(self.port.to_string())
            .arg(self.data.path())
            .env("NODE_PATH", var("SLUICE_TEST_NODE_PATH"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kinesalite");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(30), "kinesalite to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Stops the server the hard way (SIGKILL), as a crash or a network cut would.
    fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for OwnKinesalite {
    fn drop(&mut self) {
        self.halt();
    }
}

#[test]
fn an_outage_fills_the_spool_then_everything_accepted_is_delivered() {
    let _serial = TestEnv::get();
    let mut kinesis = OwnKinesalite::start();
    let stream = unique("outage");
    let client = kinesis_client(&kinesis.url());
    TestEnv::runtime().block_on(async {
        client
            .create_stream()
            .stream_name(&stream)
            .shard_count(1)
            .send()
            .await
            .unwrap();
    });
    let config = format!(
        r#"
        [server]
        shutdown_grace_ms = 1000
        [limits]
        max_batch_bytes = 16384
        [spool]
        max_bytes_per_sink = 65536
        [aws]
        region = "us-east-1"
        endpoint_url = "{}"
        [sinks.kinesis]
        linger_ms = 5
        delivery_timeout_ms = 1500
        envelope = true
        [routing]
        default_destination = "kinesis"
        kinesis_stream = "{stream}"
        "#,
        kinesis.url()
    );
    let mut gateway = Gateway::start(&config);
    let load = Load::start(&gateway.url, 3, 400);
    load.wait_for_acks(100);

    kinesis.halt();
    eventually(Duration::from_secs(60), "the spool to fill", || {
        (load.full.load(Ordering::Relaxed) >= 10).then_some(())
    });
    let stats = gateway.admin_get("/admin/spool");
    assert!(stats["refused_full"].as_u64().unwrap() >= 10, "{stats}");

    // SIGTERM while Kinesis is still down: the gateway exits cleanly within its grace
    // period and keeps what it could not deliver.
    let status = gateway.terminate();
    assert!(status.success(), "exit status {status}");
    gateway.restart();
    load.retarget(&gateway.url);
    assert!(
        gateway.spooled() > 0,
        "undelivered records kept over the restart"
    );

    kinesis.resume();
    assert!(kinesis.data_dir().exists());
    load.wait_for_acks(100);
    let tally = load.finish();
    gateway.settle();
    let (stored, records) = ids_in_stream(&client, &stream);
    assert_none_missing(&tally.acked, &stored);
    assert!(tally.full >= 10);
    assert_eq!(
        tally.full, tally.full_with_retry_after,
        "every 503 spool_full carried Retry-After"
    );
    eprintln!(
        "outage: {} acknowledged, {} refused with 503 spool_full, {} records in the stream, 0 missing",
        tally.acked.len(),
        tally.full,
        records
    );
}

#[test]
fn sigterm_under_load_answers_in_flight_requests_and_delivers_them_before_exiting() {
    let mut gateway = Gateway::start("");
    let load = Load::start(&gateway.url, 4, 100);
    load.wait_for_acks(500);
    let status = gateway.terminate();
    assert!(status.success(), "exit status {status}");
    let tally = load.finish();
    // The gateway is gone: read its files directly.
    let text = std::fs::read_to_string(gateway.dir.path().join("data").join("iot-core.jsonl"))
        .expect("the local sink's file");
    let stored: HashSet<String> = text
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_none_missing(&tally.acked, &stored);
    assert!(tally.acked.len() >= 500);
}
