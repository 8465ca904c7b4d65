//! Each device's own session at IoT Core (`[upstream]`), with mosquitto playing IoT
//! Core's broker and paho-mqtt and rumqttc (clients nobody here wrote) as devices: the
//! pubsub round trip, retained messages on subscribe, requests on reserved topics and
//! their replies, MQTT 5 properties both ways, persistent sessions kept by the broker
//! (across a gateway crash, and on a second instance), flow control towards the device,
//! an outage of the broker that never blocks publishing, and the AWS IoT Device SDK's
//! own shadow and jobs flows, answered by a stand-in for those services on the broker.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::mqtt::ws_url;
use crate::mqtt_sessions::{PahoSession, payloads};
use crate::net::Proxy;
use crate::raw_mqtt::{Packet5, RawMqtt, raw_publish, raw_subscribe};

/// A gateway whose IoT Core sink and device sessions use the broker (through `port`).
fn gateway_via(env: &TestEnv, port: u16, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{}\n{}\n{extra}",
        env.mqtt_config_via(port),
        env.upstream_config_via(port)
    ))
}

fn gateway(env: &TestEnv, extra: &str) -> Gateway {
    gateway_via(env, env.mqtt_address().port(), extra)
}

/// A mosquitto of the test's own: the test environment's configuration (its TLS, its
/// users and ACL) on a port of its own, plus `extra` lines; stopped when dropped.
struct OwnBroker {
    /// The test client, connected once the broker answered (it may publish `cmd/#`).
    client: Subscriber,
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnBroker {
    fn start(env: &TestEnv, extra: &str) -> OwnBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let config: String = std::fs::read_to_string(env.dir().join("mosquitto.conf"))
            .unwrap()
            .lines()
            .map(|line| match line.starts_with("listener ") {
                true => format!("listener {port} 127.0.0.1\n"),
                false => format!("{line}\n"),
            })
            .collect();
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, format!("{config}{extra}\n")).unwrap();
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let binary = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| std::path::Path::new(b).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto");
        // Connecting retries until the broker answers: it is ready then.
        let client = Subscriber::connect_to(env, port, &unique("own-broker/ready"));
        OwnBroker {
            client,
            child,
            port,
            _dir: dir,
        }
    }

    /// A gateway (MQTT listener on) whose IoT Core sink and device sessions use it.
    fn gateway(&self, env: &TestEnv) -> Gateway {
        gateway_via(env, self.port, "[mqtt]\nlisten = \"127.0.0.1:0\"\n")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The messages' (topic, payload, retain), sorted.
fn received(messages: &[Value]) -> Vec<(String, String, bool)> {
    let mut got: Vec<(String, String, bool)> = messages
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_string(),
                m["payload"].as_str().unwrap().to_string(),
                m["retain"].as_bool().unwrap(),
            )
        })
        .collect();
    got.sort();
    got
}

/// The value of `sluice_upstream_events_total{status="EVENT"}`.
fn upstream_events(gateway: &Gateway, event: &str) -> f64 {
    let prefix = format!("sluice_upstream_events_total{{status=\"{event}\"}}");
    gateway
        .admin_text("/metrics")
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().parse::<f64>().unwrap())
        .sum()
}

/// The AWS SDK's pubsub sample through Sluice: subscribe to a topic, publish to it, get
/// the message back (it goes through the gateway's way to IoT Core, and comes back on
/// the device's own session); a retained configuration message arrives on subscribe,
/// flagged retained. Both MQTT versions.
#[test]
fn the_pubsub_round_trip_and_a_retained_message_on_subscribe() {
    let env = TestEnv::get();
    let run = unique("pubsub");
    let gateway = gateway(&env, "");
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    commander.publish_retained(&format!("cmd/{run}/config"), r#"{"rate":5}"#);
    for version in [4, 5] {
        let device = format!("{run}-v{version}");
        let echo = format!("sdk/{run}/{device}");
        let session = PahoSession::start(json!({
            "url": ws_url(&gateway), "version": version, "client_id": device,
            "subscribe": [[format!("cmd/{run}/config"), 1], [echo, 1]],
            "publishes": [{"topic": echo, "payload": "hello", "qos": 1}],
            "expect": 2,
        }));
        assert_eq!(
            session.next("suback")["granted"],
            json!([1, 1]),
            "v{version}"
        );
        let messages = session.messages_until_end();
        assert_eq!(
            received(&messages),
            [
                (
                    format!("cmd/{run}/config"),
                    r#"{"rate":5}"#.to_string(),
                    true
                ),
                (echo.clone(), "hello".to_string(), false),
            ],
            "v{version}"
        );
    }
}

/// Telemetry of a device whose session at IoT Core is connected goes through that
/// session, with its MQTT 5 properties (a listener on the broker sees them); a device
/// without a session has its telemetry delivered through the sink's own connection, with
/// its properties too (the sink speaks MQTT 5). The sink needs no section of its own:
/// `[upstream]` is its endpoint.
#[test]
fn telemetry_goes_through_the_devices_own_session_with_its_properties() {
    let env = TestEnv::get();
    let run = unique("tele");
    let gateway = Gateway::start(&format!(
        "[sinks.iot_core]\ntransport = \"mqtt\"\n{}",
        env.upstream_config_via(env.mqtt_address().port())
    ));
    let (url, tls) = env.paho_direct();
    let listener = PahoSession::start(json!({
        "url": url, "tls": tls, "version": 5, "client_id": unique("listener"),
        "subscribe": [[format!("{run}/tele/#"), 1]], "expect": 2, "timeout": 30,
    }));
    listener.next("suback");
    let properties =
        json!({"content_type": "application/json", "user_properties": [["site", "north"]]});
    let publish = |device: &str| json!({"topic": format!("{run}/tele/{device}"), "payload": "{\"t\":1}", "qos": 1, "properties": properties});
    // With a session: it subscribed to its own topic, as the SDKs' pubsub sample does,
    // and stays until its message has come back and IoT Core's PUBACK for it is in (its
    // PUBACK comes once the record is in the spool, the delivery later: a device gone by
    // then has no session to use, and IoT Core may send the echo before that PUBACK).
    let with = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": format!("{run}-with"),
        "subscribe": [[format!("{run}/tele/with"), 1], [format!("cmd/{run}/release"), 1]],
        "publishes": [publish("with")], "expect": 2, "timeout": 60,
    }));
    assert_eq!(with.next("suback")["granted"], json!([1, 1]));
    assert_eq!(with.next("puback")["reason"], 0);
    let without = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": format!("{run}-without"),
        "publishes": [publish("without")],
    }));
    assert_eq!(without.next("puback")["reason"], 0);
    let mut messages = listener.messages_until_end();
    messages.sort_by_key(|m| m["topic"].as_str().unwrap().to_string());
    let seen: Vec<(&str, &Value)> = messages
        .iter()
        .map(|m| (m["topic"].as_str().unwrap(), &m["properties"]))
        .collect();
    assert_eq!(
        seen,
        [
            (format!("{run}/tele/with").as_str(), &properties),
            (format!("{run}/tele/without").as_str(), &properties),
        ],
        "{messages:?}"
    );
    // Counted once IoT Core's PUBACK is in, which may come just after the message.
    eventually(Duration::from_secs(5), "the telemetry counted", || {
        (upstream_events(&gateway, "telemetry") == 1.0).then_some(())
    });
    assert_eq!(upstream_events(&gateway, "telemetry_elsewhere"), 0.0);
    let releaser = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    releaser.publish(&format!("cmd/{run}/release"), "release");
    releaser.take(1);
    let echoed = with.messages_until_end();
    assert_eq!(payloads(&echoed), ["{\"t\":1}", "release"], "{echoed:?}");
}

/// A device that leaves while IoT Core's PUBACK for its telemetry is still on the way
/// (held by a slow link): its session at IoT Core waits for that answer before it
/// closes, so the telemetry counts as delivered there and is not sent again through the
/// sink's connection (IoT Core would have had it twice).
#[test]
fn telemetry_in_flight_when_its_device_leaves_is_not_sent_twice() {
    let env = TestEnv::get();
    let run = unique("leaving");
    let proxy = Proxy::start(env.mqtt_address());
    let gateway = gateway_via(&env, proxy.port, "[mqtt]\nlisten = \"127.0.0.1:0\"\n");
    let broker = Subscriber::connect(&env, &format!("{run}/tele/#"));
    let (mut device, connack) = RawMqtt::connect(&gateway, &format!("{run}-dev"), &[]);
    assert!(matches!(connack, Packet5::ConnAck(_)), "{connack:?}");
    // A SUBSCRIBE gives the device its session at IoT Core.
    device.send(&raw_subscribe(1, &format!("cmd/{run}/x")));
    assert!(matches!(device.next(), Some(Packet5::SubAck(_))));
    proxy.hold_answers();
    let topic = format!("{run}/tele/raw");
    device.send(&raw_publish(topic.as_bytes(), 1, &[]));
    assert!(matches!(device.next(), Some(Packet5::PubAck(_))), "spooled");
    // At the broker through the device's session; its PUBACK waits in the proxy.
    assert_eq!(broker.take(1)[0].0, topic);
    device.send(&[0xe0, 0x00]);
    // The slow link: the answer comes a little after the device left.
    std::thread::sleep(Duration::from_millis(300));
    proxy.release_answers();
    eventually(Duration::from_secs(10), "the telemetry counted", || {
        (upstream_events(&gateway, "telemetry") == 1.0).then_some(())
    });
    assert_eq!(
        upstream_events(&gateway, "telemetry_elsewhere"),
        0.0,
        "not sent again through the sink's connection"
    );
}

/// A shared subscription (`$share/{group}/{filter}`) that a grant covers is made at the
/// broker: the messages on its filter are shared among the group's subscribers, each
/// delivered to one of them; the filter alone, outside the grant, is refused.
#[test]
fn a_shared_subscription_shares_the_messages_among_the_group() {
    let env = TestEnv::get();
    let run = unique("share");
    let gateway = gateway(
        &env,
        &format!(
            r#"
            [[policy.grants]]
            name = "workers"
            devices = ["*"]
            subscribe = ["$share/+/cmd/{run}/work/#"]
            "#
        ),
    );
    let shared = format!("$share/pool/cmd/{run}/work/#");
    let worker = |n: u32| {
        PahoSession::start(json!({
            "url": ws_url(&gateway), "version": 5, "client_id": format!("{run}-w{n}"),
            "subscribe": [
                [shared, 1],
                [format!("cmd/{run}/work/#"), 1],
                [format!("$share/pool/cmd/{run}/work/{}", "x".repeat(256)), 1],
            ],
            "expect": 3,
        }))
    };
    let workers = [worker(1), worker(2)];
    for session in &workers {
        // The last filter is over IoT Core's 256 bytes: 0x8F, topic filter invalid.
        assert_eq!(session.next("suback")["granted"], json!([1, 0x87, 0x8f]));
    }
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    for n in 0..6 {
        commander.publish(&format!("cmd/{run}/work/{n}"), &format!("job-{n}"));
    }
    let [first, second] = workers;
    let first = first.messages_until_end();
    let second = second.messages_until_end();
    let mut all: Vec<&str> = payloads(&first);
    all.extend(payloads(&second));
    all.sort_unstable();
    assert_eq!(all, ["job-0", "job-1", "job-2", "job-3", "job-4", "job-5"]);
    assert!(
        !first.is_empty() && !second.is_empty(),
        "shared: {first:?} {second:?}"
    );
}

/// Without `[upstream]`, a SUBSCRIBE is refused in the
/// SUBACK (5.0: 0x83; 3.1.1: 0x80), never granted and then silent.
#[test]
fn a_subscribe_without_iot_core_is_refused_in_the_suback() {
    let gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    for (version, code) in [(5, 0x83), (4, 0x80)] {
        let session = PahoSession::start(json!({
            "url": ws_url(&gateway), "version": version, "client_id": format!("lonely-{version}"),
            "subscribe": [["cmd/lonely/#", 1]],
        }));
        assert_eq!(
            session.next("suback")["granted"],
            json!([code]),
            "v{version}"
        );
    }
}

/// A request on a reserved topic goes straight to the broker on the device's own
/// session (its PUBACK after the broker's), with its MQTT 5 properties; what comes back
/// keeps them. A device cannot publish on a reply topic, nor retain on a reserved one.
#[test]
fn requests_on_reserved_topics_pass_through_with_their_properties() {
    let env = TestEnv::get();
    let run = unique("props");
    let gateway = gateway(&env, "");
    let device = format!("{run}-d");
    let request = format!("$aws/things/{device}/echo/props");
    let properties = json!({
        "response_topic": format!("$aws/things/{device}/echo/props"),
        "correlation_data": "req-42",
        "content_type": "application/json",
        "user_properties": [["site", "north"], ["rev", "3"]],
    });
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "subscribe": [[request, 1]],
        "publishes": [
            {"topic": request, "payload": "{\"ask\":1}", "qos": 1, "properties": properties},
            {"topic": format!("$aws/things/{device}/shadow/update/accepted"), "payload": "{}", "qos": 1},
        ],
        "expect": 1,
    }));
    assert_eq!(session.next("suback")["granted"], json!([1]));
    let first = session.next("puback");
    assert_eq!(
        first["reason"], 0,
        "the request is PUBACKed once the broker has it"
    );
    let second = session.next("puback");
    assert_eq!(
        second["reason"], 0x87,
        "a reply topic is IoT Core's, not the device's"
    );
    let messages = session.messages_until_end();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["topic"], request);
    assert_eq!(messages[0]["properties"], properties);
    // Nothing went to the gateway's sinks: the request bypassed the spool.
    assert!(gateway.sink("local").is_empty());
}

/// A request on a reserved topic passes only the transforms scoped to it by topic: the
/// json-enricher scoped to `…/shadow/update` adds its field to the update IoT Core gets,
/// the same plugin without `topics` (every message) touches neither request, and the
/// `…/shadow/get` outside the scoped one's filter arrives as sent. Telemetry still
/// passes the unscoped one.
#[test]
fn requests_pass_only_the_plugins_scoped_to_them() {
    let env = TestEnv::get();
    let run = unique("scoped");
    let enricher = crate::harness::plugin("json_enricher");
    let gateway = gateway(
        &env,
        &format!(
            r#"
            [[plugins.transform]]
            name = "everywhere"
            path = "{enricher}"
            config = {{ device_field = "by_everywhere", time_field = "t_everywhere" }}
            [[plugins.transform]]
            name = "shadow-updates"
            path = "{enricher}"
            topics = ["$aws/things/+/shadow/update"]
            config = {{ device_field = "by_scoped", time_field = "t_scoped" }}
            [routing]
            default_destination = "local"
            "#,
            enricher = enricher.display()
        ),
    );
    let device = format!("{run}-d");
    let broker = Subscriber::connect(&env, &format!("$aws/things/{device}/shadow/#"));
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "publishes": [
            {"topic": format!("$aws/things/{device}/shadow/update"), "payload": "{\"state\":{}}", "qos": 1},
            {"topic": format!("$aws/things/{device}/shadow/get"), "payload": "{\"ask\":1}", "qos": 1},
            {"topic": format!("sdk/{run}/telemetry"), "payload": "{\"t\":1}", "qos": 1},
        ],
        "expect": 0,
    }));
    for _ in 0..3 {
        assert_eq!(session.next("puback")["reason"], 0);
    }
    let mut got: Vec<(String, Value)> = broker
        .take(2)
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).unwrap()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let (get, update) = (&got[0], &got[1]);
    assert_eq!(get.0, format!("$aws/things/{device}/shadow/get"));
    assert_eq!(get.1, json!({"ask": 1}), "outside every scope: as sent");
    assert_eq!(update.0, format!("$aws/things/{device}/shadow/update"));
    assert_eq!(update.1["by_scoped"], device.as_str(), "{}", update.1);
    assert!(update.1.get("by_everywhere").is_none(), "{}", update.1);
    let telemetry = gateway.sink("local");
    assert_eq!(telemetry.len(), 1, "{telemetry:?}");
    assert_eq!(telemetry[0]["payload"]["by_everywhere"], device.as_str());
}

/// A request passed straight through is held to its grant's rates like any publish:
/// with one message a second, three shadow requests at once get one PUBACK 0 (and that one
/// reaches the broker) and two 0x97.
#[test]
fn requests_passed_through_are_held_to_the_grants_rates() {
    let env = TestEnv::get();
    let run = unique("rated");
    let gateway = gateway(
        &env,
        r#"
        [[policy.grants]]
        name = "shadow"
        devices = ["*"]
        publish = ["$aws/things/${device.id}/#"]
        subscribe = ["$aws/things/${device.id}/#"]
        max_messages_per_sec = 1
        "#,
    );
    let device = format!("{run}-d");
    let request = format!("$aws/things/{device}/shadow/get");
    let broker = Subscriber::connect(&env, &request);
    let publishes: Vec<Value> = (0..3)
        .map(|n| json!({"topic": request, "payload": format!("{{\"n\":{n}}}"), "qos": 1}))
        .collect();
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device, "publishes": publishes,
    }));
    let mut reasons: Vec<i64> = (0..3)
        .map(|_| session.next("puback")["reason"].as_i64().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, [0, 0x97, 0x97]);
    let (topic, _) = broker.take(1).pop().unwrap();
    assert_eq!(topic, request);
}

/// A persistent session lives at the broker: a message sent while the device is away
/// arrives when it comes back, with session present and no new SUBSCRIBE; after a
/// `kill -9` of the gateway too; and on a second gateway (two instances, one broker),
/// whose session takes the client id over from the first: the device's connection there
/// ends with its session at the broker, and the first gateway does not take it back.
/// (IoT Core says why with DISCONNECT 0x8E, which Sluice passes on; mosquitto 2.0 closes
/// without a word, and the device hears 0x80.)
#[test]
fn a_persistent_session_at_the_broker_survives_a_crash_and_moves_to_another_instance() {
    let env = TestEnv::get();
    let run = unique("persist");
    let mut first_gateway = gateway(&env, "");
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = format!("{run}-meter");
    let persistent = |gateway: &Gateway, extra: Value| {
        let mut spec = json!({
            "url": ws_url(gateway), "version": 5, "client_id": device,
            "clean": false, "session_expiry": 600,
        });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        PahoSession::start(spec)
    };
    let subscribing = persistent(
        &first_gateway,
        json!({"clean": true, "subscribe": [[format!("cmd/{run}/{device}/#"), 1]]}),
    );
    assert_eq!(subscribing.next("connack")["session_present"], false);
    assert_eq!(subscribing.next("suback")["granted"], json!([1]));
    subscribing.messages_until_end();

    commander.publish(&format!("cmd/{run}/{device}/a"), "while-offline");
    commander.take(1);
    let back = persistent(&first_gateway, json!({"expect": 1}));
    assert_eq!(back.next("connack")["session_present"], true);
    assert_eq!(payloads(&back.messages_until_end()), ["while-offline"]);

    // Connected when the gateway dies.
    let held = persistent(&first_gateway, json!({"expect": 1, "timeout": 120}));
    assert_eq!(held.next("connack")["session_present"], true);
    first_gateway.crash_and_restart_after(|| {
        commander.publish(&format!("cmd/{run}/{device}/b"), "while-down");
        commander.take(1);
    });
    held.messages_until_end();
    let after_crash = persistent(&first_gateway, json!({"expect": 1}));
    assert_eq!(after_crash.next("connack")["session_present"], true);
    assert_eq!(payloads(&after_crash.messages_until_end()), ["while-down"]);

    // Connected to the first gateway, the device comes back through a second one.
    let second_gateway = gateway(&env, "");
    let on_first = persistent(&first_gateway, json!({"expect": 1, "timeout": 120}));
    assert_eq!(on_first.next("connack")["session_present"], true);
    commander.publish(&format!("cmd/{run}/{device}/c"), "before-the-move");
    commander.take(1);
    assert_eq!(
        payloads(&on_first.messages_until_end()),
        ["before-the-move"]
    );
    let staying = persistent(&first_gateway, json!({"expect": 5, "timeout": 120}));
    assert_eq!(staying.next("connack")["session_present"], true);
    let moved = persistent(&second_gateway, json!({"expect": 1}));
    assert_eq!(moved.next("connack")["session_present"], true);
    let end = staying.next("end");
    assert_eq!(end["disconnect_reason"], 0x80, "taken over: {end}");
    commander.publish(&format!("cmd/{run}/{device}/d"), "after-the-move");
    commander.take(1);
    assert_eq!(payloads(&moved.messages_until_end()), ["after-the-move"]);
}

/// Flow control towards the device: 20 QoS 1 messages to a device whose receive maximum
/// is 2 all arrive (each acknowledged at the broker after the device's PUBACK); a QoS 0
/// burst of 50 all arrive; a message over the device's Maximum Packet Size is not sent
/// and is counted, and the next one arrives.
#[test]
fn messages_for_the_device_respect_its_receive_maximum_and_packet_size() {
    let env = TestEnv::get();
    let run = unique("flow");
    let gateway = gateway(&env, "");
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = format!("{run}-slow");
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "receive_maximum": 2, "max_packet_size": 2048,
        "subscribe": [[format!("cmd/{run}/{device}/one/#"), 1], [format!("cmd/{run}/{device}/zero/#"), 0]],
        "expect": 71, "timeout": 60,
    }));
    assert_eq!(session.next("suback")["granted"], json!([1, 0]));
    for n in 0..20 {
        commander.publish(&format!("cmd/{run}/{device}/one"), &format!("q1-{n}"));
    }
    for n in 0..50 {
        commander.publish(&format!("cmd/{run}/{device}/zero"), &format!("q0-{n}"));
    }
    commander.publish_bytes(&format!("cmd/{run}/{device}/one"), vec![b'x'; 4096]);
    commander.publish(&format!("cmd/{run}/{device}/one"), "after-the-big-one");
    commander.take(72);
    let messages = session.messages_until_end();
    let got = payloads(&messages);
    // QoS 1 in order, the big one left out; QoS 0 may come between them (the broker
    // sends it while QoS 1 waits for room).
    let ones: Vec<&str> = got
        .iter()
        .copied()
        .filter(|p| !p.starts_with("q0-"))
        .collect();
    let mut want: Vec<String> = (0..20).map(|n| format!("q1-{n}")).collect();
    want.push("after-the-big-one".to_string());
    assert_eq!(ones, want);
    assert_eq!(got.iter().filter(|p| p.starts_with("q0-")).count(), 50);
    assert_eq!(upstream_events(&gateway, "too_large"), 1.0);
}

/// The broker unreachable: 300 devices with persistent sessions connect, publish and
/// leave, each publish PUBACKed from the spool; a SUBSCRIBE then is refused in the SUBACK
/// (0x80: nothing could be delivered), truthfully; a device resuming a session is told
/// it goes on, and told to reconnect when the broker comes back without it. Once the
/// broker is back, every publish reaches it and a device's subscription works again.
#[test]
fn an_outage_of_the_broker_never_blocks_publishing() {
    let env = TestEnv::get();
    let run = unique("outage");
    let proxy = Proxy::start(env.mqtt_address());
    let gateway = gateway_via(&env, proxy.port, "[mqtt]\nlisten = \"127.0.0.1:0\"\n");
    let watcher = Subscriber::connect(&env, &format!("tele/{run}/#"));
    proxy.cut();
    let port: u16 = gateway.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let started = std::time::Instant::now();
    // mosquitto_pub, 30 at a time: each connects with a persistent session, publishes
    // at QoS 1 and exits 0 once the gateway PUBACKed it.
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|threads| {
        for _ in 0..30 {
            threads.spawn(|| {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= 300 {
                        return;
                    }
                    let output = std::process::Command::new("mosquitto_pub")
                        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
                        .args(["-i", &format!("{run}-{n}"), "-c", "-x", "600", "-q", "1"])
                        .args(["-t", &format!("tele/{run}/{n}"), "-m", &format!("m{n}")])
                        .output()
                        .expect("mosquitto_pub");
                    assert!(output.status.success(), "device {n}: {output:?}");
                }
            });
        }
    });
    let took = started.elapsed();
    let refused = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": format!("{run}-sub"),
        "subscribe": [[format!("cmd/{run}/#"), 1]],
    }));
    assert_eq!(refused.next("suback")["granted"], json!([0x80]));
    drop(refused);
    // A device resuming a session the broker never had is told it goes on (the
    // gateway cannot ask); once the broker answers that it had none, the device is
    // told to reconnect, and then hears the truth.
    let resuming = format!("{run}-resuming");
    let promised = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": resuming,
        "clean": false, "session_expiry": 600, "expect": 1, "timeout": 60,
    }));
    assert_eq!(promised.next("connack")["session_present"], true);
    proxy.restore();
    let end = promised.next("end");
    assert_eq!(end["disconnect_reason"], 0x80, "{end}");
    let truthful = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": resuming,
        "clean": false, "session_expiry": 600,
    }));
    assert_eq!(truthful.next("connack")["session_present"], false);
    drop(truthful);
    let mut seen: Vec<String> = watcher
        .take(300)
        .into_iter()
        .map(|(_, payload)| String::from_utf8(payload).unwrap())
        .collect();
    seen.sort();
    let mut want: Vec<String> = (0..300).map(|n| format!("m{n}")).collect();
    want.sort();
    assert_eq!(seen, want);
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = format!("{run}-after");
    eventually(
        Duration::from_secs(30),
        "a subscription once the broker is back",
        || {
            let session = PahoSession::start(json!({
                "url": ws_url(&gateway), "version": 5, "client_id": device,
                "subscribe": [[format!("cmd/{run}/{device}"), 1]], "expect": 1, "timeout": 10,
            }));
            if session.next("suback")["granted"] != json!([1]) {
                return None;
            }
            commander.publish(&format!("cmd/{run}/{device}"), "back");
            let messages = session.messages_until_end();
            (payloads(&messages) == ["back"]).then_some(())
        },
    );
    eprintln!("300 devices published through an outage in {took:?}");
}

/// IoT Core's shadow and jobs services, played by tests/servers/iot_services.py on the
/// broker; stopped when dropped.
struct IotServices {
    _process: PahoSession,
}

impl IotServices {
    fn start(env: &TestEnv) -> IotServices {
        let certs = crate::mqtt::certs();
        let file = |name: &str| certs.join(name).display().to_string();
        let args = [
            "--host".to_string(),
            "localhost".to_string(),
            "--port".to_string(),
            env.mqtt_address().port().to_string(),
            "--ca".to_string(),
            file("ca.pem"),
            "--cert".to_string(),
            file("test-subscriber.pem"),
            "--key".to_string(),
            file("test-subscriber.key"),
        ];
        let services = PahoSession::python("tests/servers/iot_services.py", &args);
        services.next("ready");
        IotServices { _process: services }
    }
}

/// A gateway that devices reach over TLS with their client certificate (the test
/// certificate names device `test-subscriber`), which may use any thing's shadow and
/// jobs topics.
fn device_gateway(env: &TestEnv) -> Gateway {
    gateway(
        env,
        &format!(
            r#"
            {}
            [[policy.grants]]
            name = "things"
            devices = ["*"]
            client_ids = ["${{device.id}}-*"]
            publish = ["$aws/things/+/#", "sdk/#"]
            subscribe = ["$aws/things/+/#", "sdk/#"]
            [routing]
            default_destination = "local"
            "#,
            crate::mqtt::mtls_config(&crate::mqtt::certs())
        ),
    )
}

/// The AWS IoT Device SDK v2 for Python (`aws_device.py`, the SDK's defaults: MQTT
/// 3.1.1, a persistent session, keep-alive 1200 s, its metrics user name) over TLS with
/// its client certificate, through a gateway of its own, for a thing of its own, with the
/// shadow and jobs services' stand-in on the broker.
struct SdkDevice {
    /// The SDK's events.
    events: PahoSession,
    /// Its thing's name.
    thing: String,
    env: TestEnv,
    _gateway: Gateway,
    _services: IotServices,
}

impl SdkDevice {
    /// Runs `scenario` (aws_device.py's spec, less the connection).
    fn start(name: &str, scenario: Value) -> SdkDevice {
        let env = TestEnv::get();
        let services = IotServices::start(&env);
        let run = unique(name);
        let gateway = device_gateway(&env);
        let thing = format!("{run}-pump");
        let certs = crate::mqtt::certs();
        let port: u16 = gateway.mqtt.rsplit(':').next().unwrap().parse().unwrap();
        let mut spec = json!({
            "endpoint": "localhost", "port": port,
            "ca": certs.join("ca.pem"), "cert": certs.join("test-subscriber.pem"),
            "key": certs.join("test-subscriber.key"),
            "client_id": format!("test-subscriber-{run}"), "thing": thing, "timeout": 60,
        });
        spec.as_object_mut()
            .unwrap()
            .extend(scenario.as_object().unwrap().clone());
        let events = PahoSession::python("tests/clients/aws_device.py", &[spec.to_string()]);
        SdkDevice {
            events,
            thing,
            env,
            _gateway: gateway,
            _services: services,
        }
    }
}

/// The SDK's Device Shadow flow through Sluice, answered by the shadow service on the
/// device's own session: report state (update/accepted), get a delta when the cloud
/// changes the desired state, report it back, read the document (get/accepted). Every
/// reply topic is one IoT Core answers on the connection that asked.
#[test]
fn the_aws_device_sdk_reports_its_shadow_and_gets_its_delta() {
    let sdk = SdkDevice::start(
        "shadow",
        json!({"scenario": "shadow", "shadow": "config", "reported": {"rate": 1},
               "report_delta": true}),
    );
    let (device, thing, env) = (&sdk.events, &sdk.thing, &sdk.env);
    assert_eq!(device.next("connected")["session_present"], false);
    let accepted = device.next("update_accepted");
    assert_eq!(
        accepted["response"]["state"]["reported"]["rate"], 1,
        "{accepted}"
    );
    device.next("waiting_delta");
    // The cloud side asks for another rate (an application, through the broker).
    let cloud = Subscriber::connect(
        env,
        &format!("$aws/things/{thing}/shadow/name/config/update/accepted"),
    );
    cloud.publish(
        &format!("$aws/things/{thing}/shadow/name/config/update"),
        r#"{"state":{"desired":{"rate":5}}}"#,
    );
    let delta = device.next("delta");
    assert_eq!(delta["response"]["state"]["rate"], 5, "{delta}");
    let document = device.next("get_accepted");
    assert_eq!(
        document["response"]["state"]["reported"]["rate"], 5,
        "{document}"
    );
    assert_eq!(
        document["response"]["state"]["desired"]["rate"], 5,
        "{document}"
    );
    device.next("end");
}

/// The SDK's Jobs flow (what every OTA agent does) through Sluice: a job created in the
/// cloud reaches the device (notify-next), which starts it (start-next/accepted) and
/// reports it done (update/accepted), then hears that nothing is next.
#[test]
fn the_aws_device_sdk_runs_a_job() {
    let sdk = SdkDevice::start("jobs", json!({"scenario": "jobs", "status": "SUCCEEDED"}));
    let (device, thing, env) = (&sdk.events, &sdk.thing, &sdk.env);
    device.next("waiting_job");
    let cloud = Subscriber::connect(env, &format!("$aws/things/{thing}/jobs/notify-next"));
    cloud.publish(
        "standin/jobs/create",
        &json!({"thing": thing, "jobId": "ota-1", "document": {"firmware": "2.0"}}).to_string(),
    );
    let started = device.next("start_next_accepted");
    assert_eq!(
        started["response"]["execution"]["job_id"], "ota-1",
        "{started}"
    );
    assert_eq!(
        started["response"]["execution"]["job_document"]["firmware"], "2.0",
        "{started}"
    );
    let updated = device.next("update_accepted");
    assert!(updated["response"].is_object(), "{updated}");
    device.next("end");
}

/// A last will goes out only while the policy grants its topic. With a session at IoT
/// Core, IoT Core holds the will from the CONNECT on: after a reload that takes the grant
/// away, the dropped connection's session there is closed so that it publishes no will
/// (it used to be published all the same); a will still granted is published.
#[test]
fn a_will_the_policy_no_longer_grants_is_not_published_at_iot_core() {
    let env = TestEnv::get();
    let run = unique("will");
    let gateway = gateway(
        &env,
        &format!(
            r#"
            [[policy.grants]]
            name = "wills"
            devices = ["*"]
            publish = ["status/{run}/#"]
            subscribe = ["cmd/{run}/#"]
            "#
        ),
    );
    let watcher = Subscriber::connect(&env, &format!("status/{run}/#"));
    let device = |name: &str| {
        PahoSession::start(json!({
            "url": ws_url(&gateway), "version": 5, "client_id": format!("{run}-{name}"),
            "will": {"topic": format!("status/{run}/{name}"), "payload": format!("{name} gone"), "qos": 1},
            "subscribe": [[format!("cmd/{run}/{name}"), 1]], "expect": 1, "end": "drop",
        }))
    };
    let revoked = device("revoked");
    let kept = device("kept");
    for session in [&revoked, &kept] {
        assert_eq!(session.next("suback")["granted"], json!([1]));
    }
    crate::devices::rewrite_and_reload(
        &gateway,
        &[(
            &format!("publish = [\"status/{run}/#\"]"),
            &format!("publish = [\"status/{run}/kept\"]"),
        )],
    );
    // Each device drops its connection once its message is in; the revoked one first.
    for (name, session) in [("revoked", revoked), ("kept", kept)] {
        watcher.publish(&format!("cmd/{run}/{name}"), "drop");
        assert_eq!(payloads(&session.messages_until_end()), ["drop"]);
        let client_id = format!("{run}-{name}");
        eventually(Duration::from_secs(20), "the session closed", || {
            let devices = gateway.admin_get("/admin/devices");
            let open = devices["sessions"]
                .as_array()?
                .iter()
                .any(|s| s["device"] == client_id.as_str());
            (!open).then_some(())
        });
    }
    let (topic, payload) = watcher.take(1).remove(0);
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        (
            format!("status/{run}/kept").as_str(),
            b"kept gone".as_slice()
        )
    );
}

/// A connection taken over by a clean-start one leaves nothing of its session behind:
/// the subscriptions of the persistent session it held are gone with the broker's clean
/// start, and its end does not make them again (suspected: the replaced connection used
/// to write its subscriptions back after the new one cleared them).
#[test]
fn a_clean_start_takeover_keeps_none_of_the_replaced_sessions_subscriptions() {
    let env = TestEnv::get();
    let run = unique("takeover");
    let gateway = gateway(&env, "");
    let commander = Subscriber::connect(&env, &format!("cmd/{run}/#"));
    let device = format!("{run}-valve");
    let replaced = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "clean": false, "session_expiry": 600,
        "subscribe": [[format!("cmd/{run}/old"), 1]], "expect": 1, "timeout": 60,
    }));
    assert_eq!(replaced.next("suback")["granted"], json!([1]));
    let taker = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device, "clean": true,
        "subscribe": [[format!("cmd/{run}/new"), 1]], "expect": 1,
    }));
    assert_eq!(taker.next("connack")["session_present"], false);
    assert_eq!(taker.next("suback")["granted"], json!([1]));
    let end = replaced.next("end");
    assert_eq!(end["disconnect_reason"], 0x8e, "taken over: {end}");
    eventually(Duration::from_secs(20), "one session listed", || {
        let devices = gateway.admin_get("/admin/devices");
        (devices["sessions"].as_array()?.len() == 1).then_some(())
    });
    commander.publish(&format!("cmd/{run}/old"), "to-the-old-subscription");
    commander.publish(&format!("cmd/{run}/new"), "to-the-new-subscription");
    commander.take(2);
    assert_eq!(
        payloads(&taker.messages_until_end()),
        ["to-the-new-subscription"]
    );
}

/// A broker may ask for a shorter keep-alive than the session's in its CONNACK (MQTT 5's
/// Server Keep Alive; mosquitto's `max_keepalive`), and the client must then use it: the
/// device's session pings that often and stays up through an idle spell several times
/// as long. Asked for 10 s (mosquitto's least), mosquitto drops a session silent for
/// 15 s; the gateway's own keep-alive is its default, 300 s.
#[test]
fn the_session_keeps_alive_as_often_as_the_broker_asks() {
    let env = TestEnv::get();
    let run = unique("keepalive");
    let broker = OwnBroker::start(&env, "max_keepalive 10");
    let gateway = broker.gateway(&env);
    let device = format!("{run}-device");
    let topic = format!("cmd/{run}/{device}");
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "subscribe": [[topic, 1]], "expect": 1, "timeout": 45,
    }));
    assert_eq!(session.next("suback")["granted"], json!([1]));
    // The idle spell is what is tested: longer than the broker's 15-second limit.
    std::thread::sleep(Duration::from_secs(20));
    broker.client.publish(&topic, "still here");
    let messages = session.messages_until_end();
    assert_eq!(
        received(&messages),
        [(topic.clone(), "still here".to_string(), false)]
    );
    assert_eq!(upstream_events(&gateway, "lost"), 0.0);
    assert_eq!(upstream_events(&gateway, "connected"), 1.0);
}

/// A publish larger than the broker takes (the Maximum Packet Size of its CONNACK;
/// mosquitto's `max_packet_size`) is refused alone: the device hears it was not passed
/// on, the session stays up, and its next request goes through. (rumqttc, which drove
/// these sessions before, ended the whole connection on such a publish.)
#[test]
fn a_publish_larger_than_the_broker_takes_fails_alone() {
    let env = TestEnv::get();
    let run = unique("bigreq");
    let broker = OwnBroker::start(&env, "max_packet_size 2000");
    let gateway = broker.gateway(&env);
    let device = format!("{run}-d");
    let echo = format!("$aws/things/{device}/echo/#");
    let session = PahoSession::start(json!({
        "url": ws_url(&gateway), "version": 5, "client_id": device,
        "subscribe": [[echo, 1]],
        "publishes": [
            {"topic": format!("$aws/things/{device}/echo/big"), "payload": "x".repeat(3000), "qos": 1},
            {"topic": format!("$aws/things/{device}/echo/small"), "payload": "ok", "qos": 1},
        ],
        "expect": 1,
    }));
    assert_eq!(session.next("suback")["granted"], json!([1]));
    let big = session.next("puback");
    assert_ne!(big["reason"], 0, "{big}");
    let small = session.next("puback");
    assert_eq!(small["reason"], 0, "{small}");
    let messages = session.messages_until_end();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        messages[0]["topic"],
        format!("$aws/things/{device}/echo/small")
    );
    assert_eq!(upstream_events(&gateway, "publish_too_large"), 1.0);
    assert_eq!(upstream_events(&gateway, "lost"), 0.0);
}
