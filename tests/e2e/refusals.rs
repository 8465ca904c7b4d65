//! Refusals the README promises, each with its code and what it keeps: a grant's
//! payload and byte-rate limits, best-effort messages over the in-flight limit, and a
//! broken plugin file on hot reload (the old version keeps serving), and a full disk.

use std::time::{Duration, Instant};

use crate::cloud::{TestEnv, read_records, unique};
use crate::harness::{Gateway, eventually, plugin};

#[test]
fn a_grants_payload_and_byte_rate_limits_refuse_what_is_over_them() {
    let gateway = Gateway::start(
        "[[policy.grants]]\nname = \"capped\"\ndevices = [\"*\"]\npublish = [\"t/#\"]\n\
         max_payload_bytes = 100\nmax_bytes_per_sec = 1000\n\
         [routing]\ndefault_destination = \"local\"\n",
    );
    let payload = |len: usize| vec![b'x'; len];
    let at_limit = gateway.publish("t/a", "dev-1", payload(100));
    assert_eq!(at_limit.status, 200, "{:?}", at_limit.body);
    let over = gateway.publish("t/a", "dev-2", payload(101));
    assert_eq!(over.status, 413, "{:?}", over.body);
    assert_eq!(over.body["code"], "payload_too_large");
    assert!(
        over.body["message"].as_str().unwrap().contains("100"),
        "{:?}",
        over.body
    );

    // 1000 B/s with a burst of one second's worth: dev-3 sends 100-byte payloads as
    // fast as it can; what is accepted stays within the bucket.
    let started = Instant::now();
    let mut accepted = 0usize;
    let mut limited = None;
    for _ in 0..30 {
        let reply = gateway.publish("t/b", "dev-3", payload(100));
        match reply.status {
            200 => accepted += 100,
            429 => {
                limited.get_or_insert(reply);
            }
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let limited = limited.expect("a 429 within 3000 bytes sent at once");
    assert_eq!(limited.body["code"], "rate_limited", "{:?}", limited.body);
    assert_eq!(limited.body["rule"], "policy:capped", "{:?}", limited.body);
    let allowed = 1000.0 + 1000.0 * elapsed;
    assert!(
        accepted as f64 <= allowed + 100.0,
        "{accepted} B accepted in {elapsed:.2} s"
    );
    assert!(accepted >= 900, "the burst is allowed: {accepted} B");
    // Another device has its own bucket.
    assert_eq!(gateway.publish("t/b", "dev-4", payload(100)).status, 200);
    // And dev-3's refills.
    eventually(Duration::from_secs(5), "dev-3's bucket to refill", || {
        (gateway.publish("t/b", "dev-3", payload(100)).status == 200).then_some(())
    });
    let stored = gateway.all_sink_lines();
    assert!(
        stored
            .iter()
            .all(|l| l["payload_text"].as_str().unwrap().len() <= 100),
        "nothing over the payload limit was kept"
    );
    let stored_bytes_dev3: usize = stored
        .iter()
        .filter(|l| l["device"] == "dev-3")
        .map(|l| l["payload_text"].as_str().unwrap().len())
        .sum();
    assert_eq!(
        stored_bytes_dev3,
        accepted + 100,
        "what was refused was not kept"
    );
}

#[test]
fn a_broken_plugin_file_on_hot_reload_leaves_the_old_version_serving() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("plugins").join("hot.wasm");
    std::fs::create_dir_all(live.parent().unwrap()).unwrap();
    std::fs::copy(plugin("json_enricher"), &live).unwrap();
    std::fs::write(dir.path().join("sluice-log.jsonl"), "").unwrap();
    let config = format!(
        "[[plugins.transform]]\nname = \"hot\"\npath = \"{}\"\n",
        live.display()
    );
    let gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let hash = |gateway: &Gateway| {
        gateway.admin_get("/admin/plugins")["plugins"][0]["hash"]
            .as_str()
            .map(str::to_string)
    };
    // Whether the enricher (the version serving at first) ran on a message.
    let enriched = |n: u64| {
        let reply = gateway.publish("t", "dev-1", format!(r#"{{"n":{n}}}"#));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let line = gateway.find(reply.body["id"].as_str().unwrap()).unwrap();
        line["payload"].get("device_id").is_some()
    };
    let serving = hash(&gateway);
    assert!(enriched(1), "the enricher serves");

    let replace = |from: &[u8]| {
        let staged = live.with_extension("staged");
        std::fs::write(&staged, from).unwrap();
        std::fs::rename(&staged, &live).unwrap();
    };
    let log_says = |message: &str| {
        let message = message.to_string();
        eventually(Duration::from_secs(30), &message.clone(), || {
            gateway
                .log_records()
                .into_iter()
                .find(|r| r["fields"]["message"] == message.as_str())
        })
    };
    // Half a component: what a copy cut short leaves.
    let passthrough = std::fs::read(plugin("passthrough")).unwrap();
    replace(&passthrough[..passthrough.len() / 2]);
    log_says("hot reload failed; the previous version keeps serving");
    assert_eq!(hash(&gateway), serving, "the old version is listed");
    assert!(enriched(2), "the old version serves");

    // A good file after the broken one is picked up.
    replace(&passthrough);
    log_says("hot reload done");
    assert_ne!(hash(&gateway), serving);
    assert!(!enriched(3), "passthrough serves now");
}

#[test]
fn best_effort_messages_over_the_in_flight_limit_are_refused_busy_and_not_kept() {
    let env = TestEnv::get();
    let stream = unique("busy");
    env.create_stream(&stream, 1);
    let config = format!(
        "[spool]\ndurability = \"best-effort\"\nbest_effort_max_in_flight = 2\n{}",
        env.kinesis_config(&stream, "")
    );
    let gateway = Gateway::start(&config);
    // The sink is paused: best-effort messages stay in flight.
    env.hold_kinesis();
    let mut replies = Vec::new();
    for n in 0..2 {
        let reply = gateway.publish("t", "dev-1", format!(r#"{{"n":{n}}}"#));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        replies.push(reply);
    }
    eventually(Duration::from_secs(30), "a PutRecords call held", || {
        (env.kinesis_calls_held() >= 1).then_some(())
    });
    let busy = reqwest::blocking::Client::new()
        .post(format!("{}/topics/t", gateway.url))
        .header("x-device-id", "dev-1")
        .body(r#"{"n":99}"#)
        .send()
        .unwrap();
    assert_eq!(busy.status().as_u16(), 503);
    assert_eq!(
        busy.headers()["retry-after"],
        "1",
        "Retry-After: 1 for best_effort_busy"
    );
    let body: serde_json::Value = busy.json().unwrap();
    assert_eq!(body["code"], "best_effort_busy", "{body}");
    assert_eq!(gateway.spooled(), 0, "best effort goes around the spool");

    env.release_kinesis();
    eventually(Duration::from_secs(30), "room again", || {
        (gateway.publish("t", "dev-1", r#"{"n":2}"#).status == 200).then_some(())
    });
    let client = crate::cloud::kinesis_client(&env.aws_endpoint());
    let ns = eventually(
        Duration::from_secs(30),
        "three records in the stream",
        || {
            let ns: Vec<u64> = read_records(&client, &stream)
                .iter()
                .map(|(_, _, _, data)| {
                    serde_json::from_slice::<serde_json::Value>(data).unwrap()["n"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            (ns.len() >= 3).then_some(ns)
        },
    );
    // (Sorted: best-effort order is the subject of its own test.)
    let mut ns = ns;
    ns.sort_unstable();
    assert_eq!(ns, [0, 1, 2], "the refused message was not kept");
}

#[test]
fn best_effort_messages_of_one_key_keep_their_order() {
    let env = TestEnv::get();
    let stream = unique("be-order");
    env.create_stream(&stream, 1);
    let config = format!(
        "[spool]\ndurability = \"best-effort\"\n{}",
        env.kinesis_config(&stream, "")
    );
    let gateway = Gateway::start(&config);
    // A paused sink makes the hand-over's race visible: whichever record reaches the
    // stream's worker first is the one in the held call.
    let count = 40u64;
    for round in 0..4 {
        env.hold_kinesis();
        for n in round * 10..round * 10 + 10 {
            let reply = gateway.publish("t", "dev-1", format!(r#"{{"n":{n}}}"#));
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
        env.release_kinesis();
    }
    let client = crate::cloud::kinesis_client(&env.aws_endpoint());
    let ns = eventually(
        Duration::from_secs(30),
        "every record in the stream",
        || {
            let ns: Vec<u64> = read_records(&client, &stream)
                .iter()
                .map(|(_, _, _, data)| {
                    serde_json::from_slice::<serde_json::Value>(data).unwrap()["n"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            (ns.len() as u64 >= count).then_some(ns)
        },
    );
    assert_eq!(
        ns,
        (0..count).collect::<Vec<_>>(),
        "in the order acknowledged"
    );
}

/// A tmpfs mounted on the gateway's data directory, unmounted (lazily) on drop.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("mount");
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A full disk (a real one: a small tmpfs on the data directory) is answered `503
/// spool_unavailable`, and nothing acknowledged is lost: once there is room again the
/// gateway takes messages again and every acknowledged one reaches the local sink.
#[test]
fn a_full_disk_is_answered_spool_unavailable_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("data"), "6m");
    let gateway = Gateway::start_in(
        dir,
        "[routing]\ndefault_destination = \"local\"\n",
        reqwest::blocking::Client::new(),
    );
    let payload = |n: usize| format!("{{\"n\": {n}, \"pad\": \"{}\"}}", "x".repeat(60_000));
    let mut acked = Vec::new();
    let mut refused = None;
    for n in 0..400 {
        let reply = gateway.publish("disk/t", "filler", payload(n));
        match reply.status {
            200 => acked.push(reply.body["id"].as_str().unwrap().to_string()),
            _ => {
                refused = Some(reply);
                break;
            }
        }
    }
    let refused = refused.expect("6 MiB fill up before 400 × 60 KB");
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(
        refused.body["code"], "spool_unavailable",
        "{:?}",
        refused.body
    );
    assert!(!acked.is_empty());
    disk.resize("256m");
    eventually(Duration::from_secs(30), "a publish accepted again", || {
        let reply = gateway.publish("disk/t", "filler", "{\"after\": true}");
        (reply.status == 200).then(|| acked.push(reply.body["id"].as_str().unwrap().to_string()))
    });
    gateway.settle();
    // Over the high-throughput threshold, some went the local sink's `kinesis` file.
    let delivered: std::collections::HashSet<String> = gateway
        .all_sink_lines()
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged were lost",
        lost.len(),
        acked.len()
    );
    drop(gateway);
}
