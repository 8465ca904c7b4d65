//! MQTT sessions beyond publishing, with paho-mqtt, rumqttc and mosquitto_sub (clients
//! nobody here wrote): messages from the device's own session at IoT Core (mosquitto)
//! on its subscriptions, a QoS 1 message sent again until the device acknowledges it,
//! last wills, retained messages to IoT Core, and kill -9 under MQTT load with every
//! PUBACKed message read back.

use std::io::BufRead as _;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::mqtt::{paho, ws_url};

/// A paho-mqtt session (tests/clients/paho_session.py), its events read as they come.
pub struct PahoSession {
    child: std::process::Child,
    events: mpsc::Receiver<Value>,
    /// Messages that came while [`PahoSession::next`] looked for another event: kept for
    /// [`PahoSession::messages_until_end`].
    skipped: std::cell::RefCell<Vec<Value>>,
}

impl PahoSession {
    pub fn start(spec: Value) -> PahoSession {
        PahoSession::python("tests/clients/paho_session.py", &[spec.to_string()])
    }

    /// Any of the tests' Python clients or servers that report JSON lines on stdout
    /// (`script` from the repository's root), run with `args`.
    pub fn python(script: &str, args: &[String]) -> PahoSession {
        let python =
            std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON: run scripts/test");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(script);
        let mut child = std::process::Command::new(python)
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run a Python client");
        let stdout = child.stdout.take().expect("stdout");
        let (send, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if send.send(event).is_err() {
                    return;
                }
            }
        });
        PahoSession {
            child,
            events,
            skipped: Default::default(),
        }
    }

    /// The next event of kind `kind` (others before it are skipped; messages are kept).
    pub fn next(&self, kind: &str) -> Value {
        loop {
            let event = self
                .events
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no `{kind}` event from paho"));
            if event["event"] == kind {
                return event;
            }
            assert_ne!(event["event"], "error", "looking for `{kind}`: {event}");
            if event["event"] == "message" {
                self.skipped.borrow_mut().push(event);
            }
        }
    }

    /// The messages it received until its end.
    pub fn messages_until_end(mut self) -> Vec<Value> {
        let mut messages = self.skipped.take();
        loop {
            let event = self.next_any();
            match event["event"].as_str() {
                Some("message") => messages.push(event),
                Some("end") => break,
                _ => {}
            }
        }
        let _ = self.child.wait();
        messages
    }

    fn next_any(&self) -> Value {
        self.events
            .recv_timeout(Duration::from_secs(30))
            .expect("an event from paho")
    }
}

impl Drop for PahoSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway with the local sink whose devices' sessions are at the broker, and `extra`.
fn gateway(env: &TestEnv, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[routing]\ndefault_destination = \"local\"\n{}\n{extra}",
        env.upstream_config_via(env.mqtt_address().port())
    ))
}

pub fn payloads(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect()
}

/// A QoS 1 message the device never acknowledges is not acknowledged at the broker
/// either: it goes again to the device's next connection (its persistent session),
/// which acknowledges it.
#[test]
fn an_unacknowledged_qos1_message_goes_again_to_the_next_connection() {
    let env = TestEnv::get();
    let run = unique("mqttack");
    let device = format!("{run}-pump");
    let gateway = gateway(&env, "");
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let subscribe = json!([[format!("cmd/{run}/{device}/#"), 1]]);
    let first = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 4, "client_id": device, "clean": false,
        "subscribe": subscribe, "expect": 1, "ack": false, "end": "drop",
    }));
    assert_eq!(first.next("suback")["granted"], json!([1]));
    commander.publish(&format!("cmd/{run}/{device}/reboot"), "r1");
    assert_eq!(payloads(&first.messages_until_end()), ["r1"]);
    let second = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 4, "client_id": device, "clean": false,
        "expect": 1,
    }));
    assert_eq!(second.next("connack")["session_present"], true);
    let messages = second.messages_until_end();
    assert_eq!(payloads(&messages), ["r1"]);
    assert_eq!(messages[0]["dup"], true, "sent again: {messages:?}");
}

/// The last will goes through the pipeline when the connection drops without a
/// DISCONNECT, and on MQTT 5's DISCONNECT with reason 0x04; not on a plain DISCONNECT.
/// A will on a topic the device may not publish to refuses the CONNECT.
#[test]
fn the_last_will_is_published_when_the_connection_drops() {
    let gateway = Gateway::start(
        r#"
        [routing]
        default_destination = "local"
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["status/${device.id}"]
        "#,
    );
    let will = |device: &str| json!({"topic": format!("status/{device}"), "payload": format!("{device} gone"), "qos": 1});
    for (device, version, end) in [
        ("dropped", 4, "drop"),
        ("polite", 4, "disconnect"),
        ("willing", 5, "disconnect_with_will"),
    ] {
        let session = PahoSession::start(json!({
            "url": ws_url(&gateway), "version": version, "client_id": device,
            "will": will(device), "end": end,
        }));
        assert_eq!(session.next("connack")["reason"], 0);
        session.messages_until_end();
        eventually(Duration::from_secs(20), "the session closed", || {
            let devices = gateway.admin_get("/admin/devices");
            let open = devices["sessions"]
                .as_array()?
                .iter()
                .any(|s| s["device"] == device);
            (!open).then_some(())
        });
    }
    let lines = gateway.sink("local");
    let mut wills: Vec<&str> = lines
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap())
        .collect();
    wills.sort();
    assert_eq!(wills, ["dropped gone", "willing gone"], "{lines:?}");
    assert_eq!(
        lines[0]["topic"],
        format!("status/{}", lines[0]["device"].as_str().unwrap())
    );
    let denied = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": "sneaky",
        "will": {"topic": "status/other", "payload": "x"},
    }));
    assert_eq!(denied.next("connack")["reason"], 0x87);
}

/// A retained MQTT publish reaches IoT Core (mosquitto) with the retain flag, so a
/// subscriber arriving later still gets it, even where routing sends everything else to
/// Kinesis; the plain publish beside it is on the stream.
#[test]
fn a_retained_publish_reaches_iot_core_retained_and_never_kinesis() {
    let env = TestEnv::get();
    let stream = unique("retained");
    env.create_stream(&stream, 1);
    let topic = unique("shadow");
    let gateway = Gateway::start(&format!(
        "{}\n{}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n",
        env.kinesis_config(&stream, ""),
        env.mqtt_config()
    ));
    let session = PahoSession::start(json!({
        "url": gateway.mqtt, "version": 5, "client_id": "lamp-1",
        "publishes": [
            {"topic": format!("{topic}/state"), "payload": "on", "qos": 1, "retain": true},
            {"topic": format!("{topic}/reading"), "payload": "plain", "qos": 1},
        ],
    }));
    assert_eq!(session.next("puback")["reason"], 0);
    assert_eq!(session.next("puback")["reason"], 0);
    drop(session);
    gateway.settle();
    // Subscribed only now: the broker kept the message because it came retained.
    let late = Subscriber::connect(&env, &format!("{topic}/state"));
    let (got, payload) = late.take(1).pop().unwrap();
    assert_eq!(
        (got.as_str(), payload.as_slice()),
        (format!("{topic}/state").as_str(), &b"on"[..])
    );
    let records = env.read_stream(&stream);
    let on_stream: Vec<&[u8]> = records.iter().map(|(_, _, data)| data.as_slice()).collect();
    assert_eq!(
        on_stream,
        [b"plain"],
        "the retained one is not on the stream"
    );
}

/// rumqttc (the Rust client) over `[mqtt] listen`: QoS 1 publishes, each PUBACKed and
/// read back, and a command on its subscription.
#[test]
fn rumqttc_publishes_and_receives_a_command() {
    let env = TestEnv::get();
    let run = unique("rumqttc");
    let gateway = gateway(&env, "[mqtt]\nlisten = \"127.0.0.1:0\"\n");
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let port: u16 = gateway.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let runtime = TestEnv::runtime();
    let mut options = rumqttc::MqttOptions::new("rusty-1", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = runtime.block_on(async { rumqttc::AsyncClient::new(options, 64) });
    // Subscribed first (the SUBACK seen), then the command is sent, outside the runtime.
    runtime.block_on(async {
        client
            .subscribe(format!("cmd/{run}/rusty-1/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), events.poll())
                .await
                .expect("a SUBACK in time")
                .expect("the connection holds");
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) = event {
                assert_eq!(
                    ack.return_codes,
                    [rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )]
                );
                break;
            }
        }
    });
    commander.publish(&format!("cmd/{run}/rusty-1/blink"), "twice");
    let command = runtime.block_on(async {
        for n in 0..10 {
            client
                .publish("rusty/t", rumqttc::QoS::AtLeastOnce, false, format!("r{n}"))
                .await
                .unwrap();
        }
        let mut acked = 0;
        let mut command = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acked < 10 || command.is_none() {
            let event = tokio::time::timeout_at(deadline, events.poll())
                .await
                .expect("PUBACKs and the command in time")
                .expect("the connection holds");
            match event {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => acked += 1,
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) => {
                    command = Some((publish.topic.clone(), publish.payload.to_vec()));
                }
                _ => {}
            }
        }
        command.unwrap()
    });
    assert_eq!(
        command,
        (format!("cmd/{run}/rusty-1/blink"), b"twice".to_vec())
    );
    let mut got: Vec<String> = gateway
        .sink("local")
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..10).map(|n| format!("r{n}")).collect();
    want.sort();
    assert_eq!(got, want);
}

/// kill -9 while paho publishes thousands of QoS 1 messages: every one the gateway
/// PUBACKed is in the local sink after the restart.
#[test]
fn kill_9_under_mqtt_load_loses_no_acknowledged_message() {
    let mut gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    let url = ws_url(&gateway);
    let count = 20_000;
    let publisher = std::thread::spawn(move || {
        paho(json!({
            "url": url, "version": 5, "client_id": "loader",
            "generate": {"topic": "load/t", "prefix": "m", "count": count, "qos": 1},
        }))
    });
    eventually(Duration::from_secs(60), "some messages stored", || {
        (gateway.sink("local").len() >= 300).then_some(())
    });
    gateway.crash_and_restart();
    let report = publisher.join().unwrap();
    gateway.settle();
    let acked: Vec<String> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(0..)
        .filter(|(result, _)| result["reason"] == 0)
        .map(|(_, n)| format!("m{n}"))
        .collect();
    assert!(acked.len() >= 300, "{} acknowledged", acked.len());
    assert!(acked.len() < count, "the crash came before the end");
    let stored: std::collections::HashSet<String> = gateway
        .sink("local")
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|m| !stored.contains(*m)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged and lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// `mosquitto_sub` (Debian's) over TLS with a client certificate on `[mqtt] listen`
/// receives a command retained at the broker, through its own session there; the
/// certificate names the device.
#[test]
fn mosquitto_sub_over_tls_receives_a_command() {
    let env = TestEnv::get();
    let run = unique("mosqsub");
    let certs = crate::mqtt::certs();
    let gateway = gateway(
        &env,
        &format!(
            r#"
            {}
            [[policy.grants]]
            name = "own"
            devices = ["*"]
            subscribe = ["cmd/{run}/${{device.id}}/#"]
            "#,
            crate::mqtt::mtls_config(&certs)
        ),
    );
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = "test-subscriber";
    let port = gateway.mqtt.rsplit(':').next().unwrap().to_string();
    let sub = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-q", "1"])
        .args(["-i", device, "-C", "1", "-W", "30", "-v"])
        .args(["-t", &format!("cmd/{run}/{device}/#")])
        .arg("--cafile")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join("test-subscriber.pem"))
        .arg("--key")
        .arg(certs.join("test-subscriber.key"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let session = eventually(Duration::from_secs(20), "mosquitto_sub's session", || {
        let devices = gateway.admin_get("/admin/devices");
        devices["sessions"]
            .as_array()?
            .iter()
            .find(|s| s["device"] == device)
            .cloned()
    });
    assert_eq!(session["protocol"], "mqtt");
    assert!(
        session["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:")),
        "{session}"
    );
    // Retained: it is there whenever the subscription comes (mosquitto_sub subscribes
    // right after its CONNACK).
    commander.publish_retained(&format!("cmd/{run}/{device}/reboot"), "please");
    let output = sub.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("cmd/{run}/{device}/reboot please")
    );
}

/// An MQTT session is one of the device sessions the gateway waits for at shutdown: a
/// publish still in a plugin when SIGTERM comes is answered (PUBACK) before the session
/// is told to leave (DISCONNECT 0x8B), and the gateway exits after. The session's
/// accounting in `/admin/devices` is the WebSocket dialect's: messages, in flight.
#[test]
fn a_publish_in_flight_at_sigterm_is_acknowledged_before_the_session_is_told_to_leave() {
    let mut gateway = Gateway::start(&format!(
        r#"
        [routing]
        default_destination = "local"
        [plugins]
        call_timeout_ms = 1500
        on_failure = "dead-letter"
        workers = 1
        [[plugins.transform]]
        name = "misbehave"
        path = "{}"
        "#,
        crate::harness::plugin("misbehave").display()
    ));
    // `loop` keeps the plugin busy until its time limit, then it is dead-lettered (and
    // acknowledged: it is safe).
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": "slow",
        "publishes": [{"topic": "t/slow", "payload": "loop", "qos": 1}],
        "expect": 1, "timeout": 60,
    }));
    assert_eq!(session.next("connack")["reason"], 0);
    let listed = eventually(Duration::from_secs(20), "the publish in flight", || {
        let devices = gateway.admin_get("/admin/devices");
        devices["sessions"]
            .as_array()?
            .iter()
            .find(|s| s["device"] == "slow" && s["in_flight"] == 1)
            .cloned()
    });
    assert_eq!(listed["protocol"], "mqtt-ws");
    assert_eq!(listed["auth"], "claimed", "{listed}");
    assert_eq!(listed["messages"], 1, "{listed}");
    gateway.send_sigterm();
    assert_eq!(
        session.next("puback")["reason"],
        0,
        "acknowledged, not dropped"
    );
    let end = session.next("end");
    assert_eq!(end["disconnected"], true, "{end}");
    assert_eq!(
        end["disconnect_reason"], 0x8b,
        "server shutting down: {end}"
    );
    assert!(gateway.wait_exit(Duration::from_secs(30)).success());
    gateway.restart();
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["topic"], "t/slow", "{letters:?}");
    assert_eq!(letters[0]["origin"]["stage"], "plugin", "{letters:?}");
}

/// The gateway ending a session because its token expired is the gateway's decision,
/// not the device's abnormal end: no last will (MQTT 5 DISCONNECT 0x87). A connection
/// that drops, in the same configuration, still has its will published.
#[test]
fn a_session_the_gateway_ends_for_an_expired_token_publishes_no_will() {
    let secret = "will-secret-0123456789abcdef0123456789";
    let gateway = Gateway::start(&format!(
        r#"
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{secret}" }}]
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["status/${{device.id}}"]
        [routing]
        default_destination = "local"
        "#
    ));
    let session = |device: &str, ttl: &str, end: &str| {
        PahoSession::start(json!({
            "url": ws_url(&gateway), "version": 5, "client_id": device,
            "username": device, "password": gateway.issue_token(device, ttl),
            "will": {"topic": format!("status/{device}"), "payload": format!("{device} gone"), "qos": 1},
            "expect": 1, "timeout": 30, "end": end,
        }))
    };
    let expiring = session("valve-9", "2s", "disconnect");
    assert_eq!(expiring.next("connack")["reason"], 0);
    let end = expiring.next("end");
    assert_eq!(
        end["disconnect_reason"], 0x87,
        "the credential expired: {end}"
    );
    // A connection that drops (no DISCONNECT) after the first ended: its will is stored.
    let dropping = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": "valve-8",
        "username": "valve-8", "password": gateway.issue_token("valve-8", "10m"),
        "will": {"topic": "status/valve-8", "payload": "valve-8 gone", "qos": 1},
        "end": "drop",
    }));
    assert_eq!(dropping.next("connack")["reason"], 0);
    dropping.next("end");
    let wills = eventually(
        Duration::from_secs(20),
        "the dropped connection's will",
        || {
            let lines = gateway.sink("local");
            lines
                .iter()
                .any(|l| l["payload_text"] == "valve-8 gone")
                .then_some(lines)
        },
    );
    let payloads: Vec<&str> = wills
        .iter()
        .map(|l| l["payload_text"].as_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        ["valve-8 gone"],
        "no will for the expired session"
    );
}
