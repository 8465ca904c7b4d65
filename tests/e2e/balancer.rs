//! Instances behind a real load balancer (issue 23): HAProxy (Debian's package, installed
//! by `scripts/test-env`) in TCP mode in front of three `sluice` processes from one
//! configuration, its health check on each one's `/readyz`, and a fleet of paho-mqtt
//! devices (`tests/clients/fleet.py`) publishing QoS 1 through it while an instance dies
//! or leaves. What the devices were acknowledged is read back from the instances' sinks;
//! commands sent at the broker (mosquitto, IoT Core's part) are counted at the devices.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::mqtt_sessions::PahoSession;

/// HAProxy in TCP mode, round robin over servers checked on their gateway's `/readyz`
/// every 200 ms (down after 2 failures).
struct Balancer {
    child: Child,
    /// `127.0.0.1:PORT`: the balancer's front.
    address: String,
    /// The stats socket (`show stat`).
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Fields of HAProxy's `show stat` CSV (from 0): a server's status and its last check's
/// result.
const STATUS: usize = 17;
const CHECK_STATUS: usize = 36;

/// Which of a gateway's listeners the balancer sends to.
#[derive(Clone, Copy)]
enum Front {
    Mqtt,
    Http,
}

impl Balancer {
    /// In front of `front` of each of `gateways`.
    fn start(gateways: &[Gateway], front: Front) -> Balancer {
        Balancer::start_checking(gateways, front, "")
    }

    /// Like [`Balancer::start`], with `check` added to each server's health check (TLS
    /// options for gateways that serve HTTPS).
    fn start_checking(gateways: &[Gateway], front: Front, check: &str) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = dir.path().join("haproxy.sock");
        let servers: String = gateways
            .iter()
            .enumerate()
            .map(|(n, gateway)| {
                let http = gateway.url.split("://").nth(1).unwrap();
                let address = match front {
                    Front::Mqtt => gateway.mqtt.split("://").nth(1).unwrap(),
                    Front::Http => http,
                };
                let port = http.rsplit(':').next().unwrap();
                format!("    server s{n} {address} check port {port} {check}\n")
            })
            .collect();
        let config = format!(
            "global\n    stats socket {socket} mode 600 level admin\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1300s\n    timeout server 1300s\n\
             frontend devices\n    bind 127.0.0.1:{port}\n    default_backend sluice\n\
             backend sluice\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n\
             \x20   default-server inter 200ms fall 2 rise 2\n{servers}",
            socket = socket.display()
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let haproxy =
            std::env::var("SLUICE_TEST_HAPROXY").expect("SLUICE_TEST_HAPROXY: run scripts/test");
        let child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let balancer = Balancer {
            child,
            address: format!("127.0.0.1:{port}"),
            socket,
            _dir: dir,
        };
        // Each server's health check passed (`L7OK`: `/readyz` answered 200), not only
        // HAProxy's initial "up" before any check.
        eventually(Duration::from_secs(20), "HAProxy's checks to pass", || {
            (0..gateways.len())
                .all(|n| balancer.stat(n, CHECK_STATUS).as_deref() == Some("L7OK"))
                .then_some(())
        });
        balancer
    }

    /// Server `n`'s status as HAProxy sees it (`UP`, `DOWN`, …).
    fn status(&self, n: usize) -> Option<String> {
        self.stat(n, STATUS)
    }

    /// Field `field` of server `n`'s line of `show stat`.
    fn stat(&self, n: usize, field: usize) -> Option<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.write_all(b"show stat\n").ok()?;
        let name = format!("s{n}");
        std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                let fields: Vec<&str> = line.split(',').collect();
                (fields.first() == Some(&"sluice") && fields.get(1) == Some(&name.as_str()))
                    .then(|| fields.get(field).map(|s| s.to_string()))
                    .flatten()
            })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three instances from one configuration: MQTT on a listener of its own, everything to
/// the local sink (read back from each instance's directory).
fn three_instances(extra: &str) -> Vec<Gateway> {
    let config = format!(
        "[server]\n{extra}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n"
    );
    (0..3).map(|_| Gateway::start(&config)).collect()
}

/// 200 paho devices through `balancer` with MQTT `version`, publishing for 8 s, once
/// every device is connected and more than 200 publishes were acknowledged.
fn fleet_under_way(balancer: &Balancer, version: u8) -> PahoSession {
    let fleet = PahoSession::python(
        "tests/clients/fleet.py",
        &[json!({
            "url": format!("mqtt://{}", balancer.address), "version": version, "devices": 200,
            "interval": 0.5, "seconds": 8,
        })
        .to_string()],
    );
    fleet.next("connected");
    eventually(Duration::from_secs(20), "acknowledged publishes", || {
        (fleet.next("progress")["acked"].as_u64()? > 200).then_some(())
    });
    fleet
}

/// Every payload in the instances' sinks, with how many times each arrived.
fn delivered(gateways: &[Gateway]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for gateway in gateways {
        for line in gateway.sink("local") {
            if let Some(text) = line["payload_text"].as_str() {
                *seen.entry(text.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Checks that every payload the fleet was acknowledged is in a sink; says how many
/// arrived more than once (at least once is the promise).
fn nothing_acknowledged_is_lost(done: &Value, gateways: &[Gateway]) {
    let acked: Vec<&str> = done["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let seen = delivered(gateways);
    let lost: Vec<&&str> = acked.iter().filter(|p| !seen.contains_key(**p)).collect();
    let duplicates = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "fleet: {} published, {} acknowledged, {} delivered, {duplicates} delivered more than once, {} lost, {} connections",
        done["published"],
        acked.len(),
        seen.len(),
        lost.len(),
        done["connections"]
    );
    assert!(acked.len() > 200, "the fleet got going: {}", acked.len());
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

/// 200 devices publishing QoS 1 through HAProxy while one instance is killed with
/// SIGKILL: its devices reconnect through HAProxy to the others and go on; once the dead
/// instance's data directory is delivered (restarted on the same directory), every
/// acknowledged message is in a sink.
#[test]
fn an_instance_killed_under_load_behind_haproxy_loses_nothing_acknowledged() {
    let mut gateways = three_instances("");
    let balancer = Balancer::start(&gateways, Front::Mqtt);
    let fleet = fleet_under_way(&balancer, 4);
    gateways[0].kill();
    eventually(Duration::from_secs(20), "HAProxy to take s0 out", || {
        balancer.status(0)?.starts_with("DOWN").then_some(())
    });
    let done = fleet.next("done");
    assert!(
        done["connections"].as_u64().unwrap() > 200,
        "the dead instance's devices connected again: {done}"
    );
    gateways[0].restart();
    nothing_acknowledged_is_lost(&done, &gateways);
}

/// SIGTERM to one of three instances while 200 MQTT 5 devices publish through HAProxy:
/// HAProxy's health check sees `/readyz` red and takes the instance out while its
/// devices are still connected to it; then they are told to go (DISCONNECT 0x8B),
/// reconnect through HAProxy to the others, the instance delivers its spool and exits 0,
/// and every acknowledged message is in a sink.
#[test]
fn an_instance_leaving_under_load_behind_haproxy_is_taken_out_first_and_loses_nothing() {
    let mut gateways = three_instances("leave_delay_ms = 3000");
    let balancer = Balancer::start(&gateways, Front::Mqtt);
    let fleet = fleet_under_way(&balancer, 5);
    let sessions = |gateway: &Gateway| {
        gateway.admin_get("/admin/devices")["sessions"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(sessions(&gateways[0]) > 0, "devices on the first instance");
    gateways[0].send_sigterm();
    eventually(Duration::from_secs(10), "HAProxy to take s0 out", || {
        balancer.status(0)?.starts_with("DOWN").then_some(())
    });
    assert!(
        sessions(&gateways[0]) > 0,
        "HAProxy took the instance out before its devices were told to go"
    );
    let done = fleet.next("done");
    assert!(
        gateways[0].wait_exit(Duration::from_secs(30)).success(),
        "the leaving instance exits 0"
    );
    assert!(
        done["disconnect_reasons"]["139"].as_u64().unwrap_or(0) > 0,
        "devices told to go with 0x8B: {}",
        done["disconnect_reasons"]
    );
    gateways[0].restart();
    nothing_acknowledged_is_lost(&done, &gateways);
}

/// Commands for 200 devices, QoS 1, published at the broker while instances die
/// (SIGKILL) and their devices move through HAProxy to the others: each device's session
/// lives at the broker (`[upstream]`, IoT Core's part), resumed wherever the device comes
/// back, so every command reaches its device.
#[test]
fn commands_for_devices_moving_between_instances_behind_haproxy_all_arrive() {
    let env = TestEnv::get();
    let run = unique("moving");
    let config = format!(
        "{}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
        env.upstream_config_via(env.mqtt_address().port())
    );
    let mut gateways: Vec<Gateway> = (0..3).map(|_| Gateway::start(&config)).collect();
    let balancer = Balancer::start(&gateways, Front::Mqtt);
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let devices = 200;
    let fleet = PahoSession::python(
        "tests/clients/fleet.py",
        &[json!({
            "url": format!("mqtt://{}", balancer.address), "version": 5, "devices": devices, "prefix": run,
            "interval": 1.0, "seconds": 15, "subscribe": format!("cmd/{run}/{{id}}/#"),
        })
        .to_string()],
    );
    fleet.next("connected");
    let mut sent = Vec::new();
    for round in 0..4 {
        for n in 0..devices {
            let payload = format!("{run}-{n}:{round}");
            commander.publish(&format!("cmd/{run}/{run}-{n}/c"), &payload);
            sent.push(payload);
        }
        // Back through the commander's own subscription: the broker has them all.
        commander.take(devices);
        match round {
            0 => gateways[0].kill(),
            2 => gateways[1].kill(),
            _ => {}
        }
    }
    let done = fleet.next("done");
    let received: Vec<&str> = done["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&str> = received.iter().copied().collect();
    let lost: Vec<&String> = sent
        .iter()
        .filter(|p| !unique.contains(p.as_str()))
        .collect();
    eprintln!(
        "commands: {} sent, {} received, {} received more than once, {} lost, {} connections",
        sent.len(),
        received.len(),
        received.len() - unique.len(),
        lost.len(),
        done["connections"]
    );
    assert!(
        done["connections"].as_u64().unwrap() > devices as u64,
        "devices moved: {}",
        done["connections"]
    );
    assert!(lost.is_empty(), "{} commands lost: {lost:?}", lost.len());
}

/// A device that long-polls for commands (`GET /commands`) through HAProxy, each poll on
/// a new connection, so round robin sends its polls to each of three instances in turn:
/// its session at the broker moves with its polls, and every command sent meanwhile is
/// returned to it, none once per instance.
#[test]
fn a_device_polling_through_a_round_robin_balancer_gets_each_command() {
    let env = TestEnv::get();
    let run = unique("polling");
    let config = format!(
        "{}\n[routing]\ndefault_destination = \"local\"\n",
        env.commands_config(&run, 600)
    );
    let gateways: Vec<Gateway> = (0..3).map(|_| Gateway::start(&config)).collect();
    let balancer = Balancer::start(&gateways, Front::Http);
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = format!("{run}-valve");
    // No connection kept between polls: each goes through the balancer anew.
    let client = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let poll = || -> Vec<String> {
        let response = client
            .get(format!("http://{}/commands?wait=2", balancer.address))
            .header("x-device-id", &device)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().unwrap();
        answer["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["payload_text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    // The first poll opens the device's session at the broker.
    assert!(poll().is_empty());
    let sent: Vec<String> = (0..12).map(|n| format!("command-{n}")).collect();
    let mut received = Vec::new();
    for (n, payload) in sent.iter().enumerate() {
        commander.publish(&format!("cmd/{run}/{device}/c{n}"), payload);
        commander.take(1);
        received.extend(poll());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.len() < sent.len() && std::time::Instant::now() < deadline {
        received.extend(poll());
    }
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    eprintln!(
        "polls: {} commands sent, {} returned, {} distinct",
        sent.len(),
        received.len(),
        unique.len()
    );
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(unique, expected, "every command returned");
    assert_eq!(
        received.len(),
        sent.len(),
        "none returned twice: {received:?}"
    );
    for gateway in &gateways {
        assert!(
            gateway.metric(r#"sluice_upstream_events_total{status="connected"}"#) >= 1.0,
            "the polls went to every instance, each opening the device's session there"
        );
    }
}

/// The AWS IoT Device SDK v2 (its defaults: MQTT 3.1.1, a persistent session) through
/// HAProxy in TCP mode with TLS passed through, as the README's configuration has it:
/// its client certificate reaches Sluice, which names the device by it, and HAProxy's
/// health checks are HTTPS with a certificate of their own. The SDK's pubsub sample runs
/// through an instance; that instance is killed; the sample runs again, through another
/// instance, which resumes the device's session at the broker.
#[test]
fn the_aws_device_sdk_through_haproxy_with_tls_passed_through_moves_between_instances() {
    let env = TestEnv::get();
    let run = unique("sdk-lb");
    let certs = crate::mqtt::certs();
    let sink = env.mqtt_config_per_instance();
    let config = format!(
        r#"
        {sink}
        {upstream}
        {mtls}
        [[policy.grants]]
        name = "sdk"
        devices = ["*"]
        client_ids = ["${{device.id}}-*"]
        publish = ["sdk/#"]
        subscribe = ["sdk/#"]
        "#,
        upstream = env.upstream_config_via(env.mqtt_address().port()),
        mtls = crate::mqtt::mtls_config(&certs),
    );
    let mut gateways: Vec<Gateway> = (0..3).map(|_| Gateway::start(&config)).collect();
    // HAProxy's own certificate for its checks: the handshake requires one.
    let check_pem = certs.join(format!("{run}-check.pem"));
    let pem = [
        std::fs::read(certs.join("test-subscriber.pem")).unwrap(),
        std::fs::read(certs.join("test-subscriber.key")).unwrap(),
    ]
    .concat();
    std::fs::write(&check_pem, pem).unwrap();
    let balancer = Balancer::start_checking(
        &gateways,
        Front::Mqtt,
        &format!("check-ssl verify none crt {}", check_pem.display()),
    );
    let port: u16 = balancer
        .address
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let topic = format!("sdk/{run}/echo");
    let pubsub = || {
        let spec = json!({
            "endpoint": "localhost", "port": port,
            "ca": certs.join("ca.pem"), "cert": certs.join("test-subscriber.pem"),
            "key": certs.join("test-subscriber.key"),
            "client_id": format!("test-subscriber-{run}"), "thing": run, "timeout": 60,
            "scenario": "pubsub", "topic": topic, "count": 3,
        });
        let device = PahoSession::python("tests/clients/aws_device.py", &[spec.to_string()]);
        let connected = device.next("connected");
        for _ in 0..3 {
            device.next("message");
        }
        device.next("end");
        connected["session_present"].as_bool().unwrap()
    };
    let connected_here = |gateway: &Gateway| {
        gateway.metric(r#"sluice_upstream_events_total{status="connected"}"#) > 0.0
    };
    assert!(!pubsub(), "a new session");
    let first = (0..3)
        .find(|n| connected_here(&gateways[*n]))
        .expect("an instance opened the device's session");
    gateways[first].kill();
    eventually(
        Duration::from_secs(20),
        "HAProxy to take the instance out",
        || balancer.status(first)?.starts_with("DOWN").then_some(()),
    );
    assert!(
        pubsub(),
        "the session resumed at the broker through another instance"
    );
    let second = (0..3)
        .filter(|n| *n != first)
        .find(|n| connected_here(&gateways[*n]));
    assert!(second.is_some(), "another instance served the device");
    let _ = std::fs::remove_file(check_pem);
}
