//! Commands to devices through mosquitto: to a WebSocket session, to an HTTP long-poll,
//! queued for an offline device (and expired), and across two gateway instances.

use std::time::{Duration, Instant};

use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::net::Proxy;
use crate::wsclient::{self, Socket, next_json, runtime};

fn start(env: &TestEnv, run: &str, instance: &str, ttl_secs: u64) -> Gateway {
    start_with(&format!(
        "[routing]\ndefault_destination = \"local\"\n{}",
        env.downlink_config(run, instance, ttl_secs)
    ))
}

/// A gateway on `config`, once its downlink subscriptions are confirmed.
fn start_with(config: &str) -> Gateway {
    let gateway = Gateway::start(config);
    eventually(
        Duration::from_secs(30),
        "the downlink subscriptions",
        || (gateway.admin_get("/admin/downlink")["subscribed"] == true).then_some(()),
    );
    gateway
}

/// A session of `device`, past its welcome frame.
async fn connect(gateway: &Gateway, device: &str) -> Socket {
    let mut socket = wsclient::connect(gateway, device, "sluice.v1")
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "welcome");
    socket
}

/// The presence the gateway published for `device` (retained), once it says `online`.
fn wait_online(env: &TestEnv, run: &str, device: &str, instance: &str) {
    let presence = Subscriber::connect(env, &format!("sluice/presence/{run}/{device}"));
    eventually(Duration::from_secs(20), "the device's presence", || {
        let (_, payload) = presence.take(1).pop()?;
        let value: Value = serde_json::from_slice(&payload).ok()?;
        (value["online"] == true && value["instance"] == instance).then_some(())
    });
}

#[test]
fn a_command_reaches_the_websocket_session_and_the_reply_goes_back() {
    let env = TestEnv::get();
    let run = unique("ws");
    let gateway = start(&env, &run, "gw-1", 300);
    let replies = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let rt = runtime();
    let mut socket = rt.block_on(connect(&gateway, "valve-1"));
    wait_online(&env, &run, "valve-1", "gw-1");
    replies.publish(&format!("cmd/{run}/valve-1/open"), r#"{"percent": 40}"#);
    let command = rt.block_on(next_json(&mut socket));
    assert_eq!(command["type"], "command");
    assert_eq!(command["topic"], format!("cmd/{run}/valve-1/open"));
    assert_eq!(command["payload"], json!({"percent": 40}));
    let reply = json!({"type": "command_reply", "id": command["id"], "status": "done", "payload": {"open": 40}});
    rt.block_on(socket.send(Frame::Text(reply.to_string().into())))
        .unwrap();
    let (topic, payload) = replies.take(1).pop().unwrap();
    assert_eq!(topic, format!("cmd-reply/{run}/valve-1"));
    let reply: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(reply["command_id"], command["id"]);
    assert_eq!(reply["status"], "done");
    assert_eq!(reply["payload"], json!({"open": 40}));
    // The session's own count of commands sent, in the admin API.
    eventually(
        Duration::from_secs(10),
        "the session's command count",
        || {
            let devices = gateway.admin_get("/admin/devices");
            (devices["sessions"][0]["commands"] == 1).then_some(())
        },
    );
}

#[test]
fn an_http_long_poll_receives_a_command() {
    let env = TestEnv::get();
    let run = unique("poll");
    let gateway = start(&env, &run, "gw-1", 300);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let url = format!("{}/commands?wait=20", gateway.url);
    let poll = std::thread::spawn(move || {
        let answer = reqwest::blocking::Client::new()
            .get(url)
            .header("x-device-id", "meter-7")
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap();
        (answer, Instant::now())
    });
    // The poll is waiting: it announced the device online. Only then the command.
    wait_online(&env, &run, "meter-7", "gw-1");
    assert!(!poll.is_finished(), "the poll waits for a command");
    let published_at = Instant::now();
    commander.publish(&format!("cmd/{run}/meter-7/read"), "now");
    let (answer, answered_at) = poll.join().unwrap();
    let commands = answer["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "{answer}");
    assert_eq!(commands[0]["payload_text"], "now");
    assert_eq!(commands[0]["topic"], format!("cmd/{run}/meter-7/read"));
    // Woken by the command, not at the end of its 20 s wait.
    let waited = answered_at - published_at;
    assert!(
        waited < Duration::from_secs(10),
        "answered {waited:?} after the publish"
    );
    assert_eq!(gateway.admin_get("/admin/downlink")["devices_waiting"], 0);
}

/// Sends a probe command to `probe` (a device no instance holds) after the commands
/// under test and waits until `gateway` has it queued, taking it off with a long-poll:
/// commands from one client reach the gateway in the order sent, so by then every
/// command sent before the probe has been handled.
fn probe_handled(commander: &Subscriber, gateway: &Gateway, run: &str, probe: &str) {
    commander.publish(&format!("cmd/{run}/{probe}/ping"), "p");
    eventually(Duration::from_secs(20), "the probe command", || {
        (!poll(gateway, probe, 0).is_empty()).then_some(())
    });
}

fn devices_waiting(gateway: &Gateway) -> Value {
    gateway.admin_get("/admin/downlink")["devices_waiting"].clone()
}

#[test]
fn an_offline_device_gets_its_queued_commands_on_reconnect_and_expired_ones_are_reported() {
    let env = TestEnv::get();
    let run = unique("offline");
    let gateway = start(&env, &run, "gw-1", 2);
    let replies = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    replies.publish(&format!("cmd/{run}/pump-3/old"), r#""stale""#);
    // The TTL is 2 s: the first command expires while the device is away, and that is
    // reported on its reply topic.
    let (_, payload) = replies.take(1).pop().unwrap();
    let report: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(report["status"], "expired", "{report}");
    replies.publish(&format!("cmd/{run}/pump-3/first"), "1");
    replies.publish(&format!("cmd/{run}/pump-3/second"), "2");
    // Once a probe sent last is there, both of pump-3's have been handled.
    probe_handled(&replies, &gateway, &run, "probe-0");
    assert_eq!(devices_waiting(&gateway), 1, "pump-3's commands wait");
    let second_id = runtime().block_on(async {
        let mut socket = connect(&gateway, "pump-3").await;
        let first = next_json(&mut socket).await;
        let second = next_json(&mut socket).await;
        assert_eq!(
            first["topic"],
            format!("cmd/{run}/pump-3/first"),
            "in order"
        );
        assert_eq!(first["payload"], 1);
        assert_eq!(second["topic"], format!("cmd/{run}/pump-3/second"));
        assert_eq!(second["payload"], 2);
        // Nothing else was queued for pump-3 (the stale one expired): the reply to the
        // second command is the next report on pump-3's reply topic.
        let reply = json!({"type": "command_reply", "id": second["id"], "status": "done"});
        socket
            .send(Frame::Text(reply.to_string().into()))
            .await
            .unwrap();
        second["id"].clone()
    });
    let pump_report = loop {
        let (topic, payload) = replies.take(1).pop().unwrap();
        if topic == format!("cmd-reply/{run}/pump-3") {
            break serde_json::from_slice::<Value>(&payload).unwrap();
        }
    };
    assert_eq!(pump_report["status"], "done", "{pump_report}");
    assert_eq!(pump_report["command_id"], second_id);
}

#[test]
fn with_two_instances_a_command_reaches_the_device_connected_to_the_second() {
    let env = TestEnv::get();
    let run = unique("pair");
    let first = start(&env, &run, "gw-a", 300);
    let second = start(&env, &run, "gw-b", 300);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let rt = runtime();
    let mut socket = rt.block_on(connect(&second, "door-9"));
    wait_online(&env, &run, "door-9", "gw-b");
    commander.publish(&format!("cmd/{run}/door-9/unlock"), "now");
    let command = rt.block_on(next_json(&mut socket));
    assert_eq!(command["topic"], format!("cmd/{run}/door-9/unlock"));
    // The first instance had the command too; once it has a probe sent after it, it
    // has handled door-9's, and left it to the second: nothing waits there.
    probe_handled(&commander, &first, &run, "probe-0");
    assert_eq!(devices_waiting(&first), 0, "door-9's command is not queued");
}

/// A `GET /commands?wait=N` as `device`: the commands returned.
fn poll(gateway: &Gateway, device: &str, wait: u64) -> Vec<Value> {
    let answer: Value = reqwest::blocking::Client::new()
        .get(format!("{}/commands?wait={wait}", gateway.url))
        .header("x-device-id", device)
        .send()
        .unwrap()
        .json()
        .unwrap();
    answer["commands"].as_array().expect("commands").clone()
}

/// The next report on the reply subscriber's topics, as (topic, JSON).
fn next_report(replies: &Subscriber) -> (String, Value) {
    let (topic, payload) = replies.take(1).pop().unwrap();
    (topic, serde_json::from_slice(&payload).unwrap())
}

#[test]
fn overflow_denied_commands_and_http_replies_are_reported_on_the_reply_topic() {
    let env = TestEnv::get();
    let run = unique("reports");
    let config = format!(
        "[[policy.grants]]\nname = \"own\"\ndevices = [\"*\"]\npublish = [\"x/#\", \"cmd-reply/{run}/${{device.id}}\"]\n\
         subscribe = [\"cmd/{run}/${{device.id}}/ok/#\"]\n\
         [routing]\ndefault_destination = \"local\"\n{}",
        env.downlink_config(&run, "gw-1", 300).replace(
            "queue_ttl_secs = 300",
            "queue_ttl_secs = 300\nqueue_max_depth = 2"
        )
    );
    let gateway = start_with(&config);
    let replies = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));

    // Three commands for an offline device with room for two: the oldest is pushed out.
    for n in 1..=3 {
        replies.publish(&format!("cmd/{run}/pump-1/ok/{n}"), &n.to_string());
    }
    let (topic, report) = next_report(&replies);
    assert_eq!(topic, format!("cmd-reply/{run}/pump-1"));
    assert_eq!(report["status"], "overflow", "{report}");
    assert_eq!(report["instance"], "gw-1");
    let commands = poll(&gateway, "pump-1", 0);
    let topics: Vec<&str> = commands
        .iter()
        .map(|c| c["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        topics,
        [
            format!("cmd/{run}/pump-1/ok/2"),
            format!("cmd/{run}/pump-1/ok/3")
        ],
        "the two newest, in order"
    );
    assert_ne!(report["command_id"], commands[0]["id"]);

    // The device answers over HTTP: published on its reply topic.
    let answer = reqwest::blocking::Client::new()
        .post(format!(
            "{}/commands/{}/reply",
            gateway.url,
            commands[0]["id"].as_str().unwrap()
        ))
        .header("x-device-id", "pump-1")
        .body(r#"{"status": "done", "payload": {"v": 1}}"#)
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let (topic, report) = next_report(&replies);
    assert_eq!(topic, format!("cmd-reply/{run}/pump-1"));
    assert_eq!(report["command_id"], commands[0]["id"], "{report}");
    assert_eq!(report["status"], "done");
    assert_eq!(report["payload"], json!({"v": 1}));

    // A command on a topic the device's grants do not list under `subscribe` never
    // reaches it: reported `denied`.
    replies.publish(&format!("cmd/{run}/pump-1/secret/x"), "s");
    eventually(Duration::from_secs(20), "the command queued", || {
        (devices_waiting(&gateway) == 1).then_some(())
    });
    assert!(
        poll(&gateway, "pump-1", 0).is_empty(),
        "not handed to the device"
    );
    let (topic, report) = next_report(&replies);
    assert_eq!(topic, format!("cmd-reply/{run}/pump-1"));
    assert_eq!(report["status"], "denied", "{report}");
    assert_eq!(devices_waiting(&gateway), 0);
}

#[test]
fn readyz_is_not_ready_while_the_downlink_has_no_subscription() {
    let env = TestEnv::get();
    let run = unique("ready");
    let proxy = Proxy::start(env.mqtt_address());
    let gateway = start_with(&format!(
        "[routing]\ndefault_destination = \"local\"\n{}",
        env.downlink_config_via(&run, "gw-1", 300, proxy.port)
    ));
    let readiness = || {
        let response = reqwest::blocking::get(format!("{}/readyz", gateway.url)).unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap(),
        )
    };
    assert_eq!(readiness().0, 200, "{:?}", readiness().1);
    proxy.cut();
    let reasons = eventually(Duration::from_secs(30), "not ready", || {
        let (status, body) = readiness();
        (status == 503).then(|| body["reasons"].to_string())
    });
    assert!(reasons.contains("downlink"), "{reasons}");
    assert_eq!(gateway.admin_get("/admin/downlink")["subscribed"], false);
    proxy.restore();
    eventually(Duration::from_secs(30), "ready again", || {
        (readiness().0 == 200).then_some(())
    });
    assert_eq!(gateway.admin_get("/admin/downlink")["subscribed"], true);
}

#[test]
fn a_device_that_moves_to_another_instance_gets_its_commands_there() {
    let env = TestEnv::get();
    let run = unique("move");
    let first = start(&env, &run, "gw-a", 300);
    let second = start(&env, &run, "gw-b", 300);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let presence = Subscriber::connect(&env, &format!("sluice/presence/{run}/door-9"));
    let presence_is = |online: bool, instance: &str| {
        eventually(Duration::from_secs(20), "the device's presence", || {
            let (_, payload) = presence.take(1).pop()?;
            let value: Value = serde_json::from_slice(&payload).ok()?;
            (value["online"] == online && value["instance"] == instance).then_some(())
        })
    };
    let rt = runtime();
    // On the second instance first, then it leaves and comes back on the first.
    let mut socket = rt.block_on(connect(&second, "door-9"));
    presence_is(true, "gw-b");
    rt.block_on(socket.close(None)).unwrap();
    presence_is(false, "gw-b");
    let mut socket = rt.block_on(connect(&first, "door-9"));
    presence_is(true, "gw-a");
    commander.publish(&format!("cmd/{run}/door-9/unlock"), "now");
    let command = rt.block_on(next_json(&mut socket));
    assert_eq!(command["topic"], format!("cmd/{run}/door-9/unlock"));
    // The second instance had it too and left it to the first.
    probe_handled(&commander, &second, &run, "probe-0");
    assert_eq!(
        devices_waiting(&second),
        0,
        "door-9's command is not queued"
    );
}
