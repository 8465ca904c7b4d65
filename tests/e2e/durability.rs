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
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cloud::{TestEnv, kinesis_client, read_records, unique};
use crate::harness::{Gateway, eventually};
use crate::net::{finish_in_flight, refuses_connections, requests_in_flight};

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
    /// Requests that got no answer (refused, reset, cut short): when each was started,
    /// and the error.
    failed: Vec<(Instant, String)>,
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
                        let started = Instant::now();
                        let sent = client
                            .post(format!("{base}/topics/load"))
                            .header("x-device-id", format!("device-{device}"))
                            .body(format!(r#"{{"n":{n},"pad":"{padding}"}}"#))
                            .send();
                        // A refused connection or a reset: the gateway is down; not acked.
                        let response = match sent {
                            Ok(response) => response,
                            Err(error) => {
                                tally.failed.push((started, format!("{error:?}")));
                                // The gateway is down: do not spin.
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        };
                        let status = response.status().as_u16();
                        let retry_after = response.headers().contains_key("retry-after");
                        let body = match response.json::<Value>() {
                            Ok(body) => body,
                            Err(error) => {
                                tally.failed.push((started, format!("{error:?}")));
                                continue;
                            }
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
            total.failed.extend(tally.failed);
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
fn sigterm_while_the_sink_is_paused_answers_every_request_and_drains_the_backlog() {
    let env = TestEnv::get();
    let stream = unique("drain");
    env.create_stream(&stream, 2);
    let config = format!(
        "[server]\nshutdown_grace_ms = 60000\n{}",
        env.kinesis_config(&stream, "")
            .replace("linger_ms = 5", "linger_ms = 5\nenvelope = true")
    );
    let mut gateway = Gateway::start(&config);
    let load = Load::start(&gateway.url, 4, 100);
    load.wait_for_acks(200);

    // Pause the sink: every PutRecords call waits, unanswered, until released. Once one
    // waits, nothing can leave the spool, so what is acknowledged from now on is a
    // backlog the shutdown has to drain.
    env.hold_kinesis();
    eventually(Duration::from_secs(30), "a PutRecords call held", || {
        (env.kinesis_calls_held() >= 1).then_some(())
    });
    load.wait_for_acks(300);
    let backlog = gateway.spooled();
    assert!(
        backlog >= 100,
        "a backlog while the sink is paused: {backlog}"
    );
    let in_flight = requests_in_flight(&gateway.url, 4, "late");

    let sigterm_at = Instant::now();
    gateway.send_sigterm();
    // The listener closes first (the real event that the shutdown began); the requests
    // caught in flight are still waiting for their bodies.
    eventually(Duration::from_secs(20), "the listener to close", || {
        refuses_connections(&gateway.url).then_some(())
    });
    assert!(gateway.running(), "still finishing in-flight requests");
    let late_ids = finish_in_flight(in_flight);

    // Still paused: the gateway must be waiting for the sink, not gone.
    assert!(
        gateway.running(),
        "draining, not exited, while the sink is paused"
    );
    env.release_kinesis();
    let status = gateway.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    let tally = load.finish();

    // Every request started before SIGTERM was answered; the ones that failed were
    // started after it (refused, or racing the listener's close).
    let unanswered: Vec<&(Instant, String)> = tally
        .failed
        .iter()
        .filter(|(started, _)| *started < sigterm_at)
        .collect();
    assert!(
        unanswered.is_empty(),
        "{} requests started before SIGTERM got no answer: {:?}",
        unanswered.len(),
        &unanswered[..unanswered.len().min(5)]
    );

    // The gateway is gone: the stream itself shows the drain.
    let (stored, records) = ids_in_stream(&kinesis_client(&env.aws_endpoint()), &stream);
    assert_none_missing(&tally.acked, &stored);
    assert_none_missing(&late_ids, &stored);
    eprintln!(
        "sigterm with a paused sink: backlog of {backlog} at SIGTERM, {} acknowledged, \
         {} answered after SIGTERM, {records} records in the stream, 0 missing",
        tally.acked.len(),
        late_ids.len()
    );
}

#[test]
fn a_backlog_over_several_segments_is_replayed_in_order_after_kill_9() {
    let env = TestEnv::get();
    let stream = unique("replay");
    env.create_stream(&stream, 1);
    let mut gateway = Gateway::start_with_json_log(&env.kinesis_config(&stream, ""));
    // The sink is paused, so everything stays spooled: 150 records of 960 KiB from one
    // device (one partition key), about 141 MiB, over three 64 MiB segments.
    env.hold_kinesis();
    let count = 150u64;
    let payload = |n: u64| {
        let mut payload = format!(r#"{{"n":{n},"pad":""#).into_bytes();
        payload.resize(960 * 1024 - 2, b'x');
        payload.extend_from_slice(b"\"}");
        payload
    };
    for n in 0..count {
        let reply = gateway.publish("big/t", "dev-r", payload(n));
        assert_eq!(reply.status, 200, "{n}: {:?}", reply.body);
    }
    assert_eq!(gateway.spooled(), count);
    let queue = gateway.dir.path().join("data").join("queue");
    let segments = std::fs::read_dir(&queue).unwrap().count();
    assert!(segments >= 3, "{segments} files in {}", queue.display());

    // kill -9 while the sink holds the calls made so far; they are let through once the
    // gateway is gone (so they may be in the stream twice), then the gateway starts
    // again on the same data directory and replays everything it has not seen
    // confirmed.
    gateway.crash_and_restart_after(|| {
        env.release_kinesis();
        eventually(Duration::from_secs(60), "the held calls to finish", || {
            (env.kinesis_calls_held() == 0).then_some(())
        });
    });
    gateway.settle();
    // The replay of several segments was announced, and its end (stderr is no terminal:
    // log lines, not a bar).
    let said = |start: &str| {
        gateway.log_records().iter().any(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(start))
        })
    };
    assert!(said("replaying the spool: "), "the replay announced");
    assert!(said("spool replayed: "), "and its end");
    let records = read_records(&kinesis_client(&env.aws_endpoint()), &stream);
    let ns: Vec<u64> = records
        .iter()
        .map(|(_, key, _, data)| {
            assert_eq!(key, "dev-r");
            let head = &data[..data.len().min(64)];
            let text = String::from_utf8_lossy(head);
            text.trim_start_matches(r#"{"n":"#)
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        ns.len() as u64 >= count,
        "{} records for {count} messages",
        ns.len()
    );
    // What the first run got through is followed by the whole replay, in order.
    let replay = &ns[ns.len() - count as usize..];
    assert_eq!(
        replay,
        (0..count).collect::<Vec<_>>(),
        "the replay, in order, after {} records of the first run",
        ns.len() as u64 - count
    );
}

/// A second gateway started on the data directory a running one holds (a replacement
/// pointed at a live instance's volume) refuses to start, saying why, and the first goes
/// on serving: two processes never share a spool.
#[test]
fn a_second_gateway_on_a_held_data_directory_refuses_to_start() {
    let gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    let dir = gateway.dir.path();
    let mut second = Command::new(crate::harness::SLUICE)
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("sluice.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually(
        Duration::from_secs(20),
        "the second gateway to exit",
        || second.try_wait().unwrap(),
    );
    let mut error = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut error).unwrap();
    assert_eq!(status.code(), Some(1), "{error}");
    assert!(
        error.contains(
            "is in use by another process (is another sluice running on this data directory?)"
        ),
        "{error}"
    );
    let reply = gateway.publish("held/t?qos=1", "dev-1", "{}".to_string());
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let topics: Vec<Value> = gateway
        .sink("local")
        .iter()
        .map(|l| l["topic"].clone())
        .collect();
    assert_eq!(topics, [Value::from("held/t")]);
}
