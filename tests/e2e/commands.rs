//! Commands for the devices that cannot subscribe (the `sluice.v1` WebSocket dialect,
//! HTTP long-polls), through each device's own session at IoT Core, with mosquitto
//! playing IoT Core's broker: a command and its reply over WebSocket and over HTTP (a
//! long-poll woken by the command), MQTT 5 request/response (the reply goes to the
//! command's response topic with its correlation data, from paho-mqtt on the broker), a
//! QoS 1 command sent while the device was away (the gateway killed, or the device gone)
//! waiting at the broker and picked up on the same or a second instance, and the
//! refusals of a device that receives nothing.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::mqtt_sessions::PahoSession;
use crate::wsclient::{self, Socket, next_json, runtime};

/// The last path level of every probe command (see [`until_subscribed`]).
const PROBE: &str = "probe";

/// A gateway on the local sink whose devices' sessions are at the broker, with command
/// topics under `run`.
fn start(env: &TestEnv, run: &str) -> Gateway {
    Gateway::start(&format!(
        "[routing]\ndefault_destination = \"local\"\n{}",
        env.commands_config(run, 600)
    ))
}

/// A session of `device`, past its welcome frame.
async fn connect(gateway: &Gateway, device: &str) -> Socket {
    let mut socket = wsclient::connect(gateway, device, "sluice.v1")
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "welcome");
    socket
}

/// The next text frame within `within`, if one comes.
async fn frame_within(socket: &mut Socket, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Frame::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Frame::Ping(_) | Frame::Pong(_)))) => continue,
            Ok(other) => panic!("expected a text frame, got {other:?}"),
            Err(_) => return None,
        }
    }
}

/// Waits until `device`'s session at the broker is subscribed to its command topics: a
/// probe command is published on them until one comes through `received` (a command
/// published before the subscription exists goes nowhere).
fn until_subscribed(
    commander: &Subscriber,
    run: &str,
    device: &str,
    mut received: impl FnMut() -> Vec<Value>,
) {
    eventually(Duration::from_secs(30), "the command subscription", || {
        commander.publish(&format!("cmd/{run}/{device}/{PROBE}"), "p");
        received()
            .iter()
            .any(|command| command["topic"].as_str().unwrap().ends_with(PROBE))
            .then_some(())
    });
}

/// The next command frame on `socket` that is not a probe.
async fn next_command(socket: &mut Socket) -> Value {
    loop {
        let frame = next_json(socket).await;
        assert_eq!(frame["type"], "command", "{frame}");
        if !frame["topic"].as_str().unwrap().ends_with(PROBE) {
            return frame;
        }
    }
}

/// A WebSocket session of `device` whose command subscription is in place.
fn subscribed_session(
    rt: &tokio::runtime::Runtime,
    gateway: &Gateway,
    commander: &Subscriber,
    run: &str,
    device: &str,
) -> Socket {
    let mut socket = rt.block_on(connect(gateway, device));
    until_subscribed(commander, run, device, || {
        rt.block_on(frame_within(&mut socket, Duration::from_millis(500)))
            .into_iter()
            .collect()
    });
    socket
}

/// A `GET /commands?wait=N` as `device`: the status and the answer.
fn poll(gateway: &Gateway, device: &str, wait: u64) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/commands?wait={wait}", gateway.url))
        .header("x-device-id", device)
        .send()
        .unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

fn polled(gateway: &Gateway, device: &str, wait: u64) -> Vec<Value> {
    let (status, answer) = poll(gateway, device, wait);
    assert_eq!(status, 200, "{answer}");
    answer["commands"].as_array().expect("commands").clone()
}

/// The reply the broker got on `replies`' topics, as (topic, JSON).
fn next_reply(replies: &Subscriber) -> (String, Value) {
    let (topic, payload) = replies.take(1).pop().unwrap();
    (topic, serde_json::from_slice(&payload).unwrap())
}

/// A command published on the broker reaches the device's WebSocket session with its
/// payload; the device's reply is published on its reply topic, by its own session.
#[test]
fn a_command_reaches_the_websocket_session_and_the_reply_goes_back() {
    let env = TestEnv::get();
    let run = unique("ws");
    let device = format!("{run}-valve");
    let gateway = start(&env, &run);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let rt = runtime();
    let mut socket = subscribed_session(&rt, &gateway, &commander, &run, &device);
    commander.publish(&format!("cmd/{run}/{device}/open"), r#"{"percent": 40}"#);
    let command = rt.block_on(next_command(&mut socket));
    assert_eq!(command["topic"], format!("cmd/{run}/{device}/open"));
    assert_eq!(command["payload"], json!({"percent": 40}));
    assert_eq!(command["qos"], 1);
    let reply = json!({"type": "command_reply", "id": command["id"], "status": "done", "payload": {"open": 40}});
    rt.block_on(socket.send(Frame::Text(reply.to_string().into())))
        .unwrap();
    let (topic, reply) = next_reply(&commander);
    assert_eq!(topic, format!("cmd-reply/{run}/{device}"));
    assert_eq!(
        reply,
        json!({"command_id": command["id"], "status": "done", "payload": {"open": 40}})
    );
    // The broker saw the device itself: its client id is the device's.
    let devices = gateway.admin_get("/admin/devices");
    let commands = devices["sessions"][0]["commands"].as_u64().unwrap();
    assert!(commands >= 2, "the probe and the command: {devices}");
}

/// A long-poll is woken by a command (long before the end of its wait), and the reply
/// posted for it reaches the broker.
#[test]
fn an_http_long_poll_is_woken_by_a_command_and_its_reply_reaches_the_broker() {
    let env = TestEnv::get();
    let run = unique("poll");
    let device = format!("{run}-meter");
    let gateway = start(&env, &run);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    // The first poll opens the device's session; it stays open between polls.
    until_subscribed(&commander, &run, &device, || polled(&gateway, &device, 1));
    let url = gateway.url.clone();
    let poller = device.clone();
    let waiting = std::thread::spawn(move || {
        let mut got = Vec::new();
        while !got.iter().any(|c: &Value| c["payload_text"] == "now") {
            let answer: Value = reqwest::blocking::Client::new()
                .get(format!("{url}/commands?wait=20"))
                .header("x-device-id", &poller)
                .send()
                .unwrap()
                .json()
                .unwrap();
            got.extend(answer["commands"].as_array().unwrap().iter().cloned());
        }
        (got, Instant::now())
    });
    let published_at = Instant::now();
    commander.publish(&format!("cmd/{run}/{device}/read"), "now");
    let (got, answered_at) = waiting.join().unwrap();
    let command = got.iter().find(|c| c["payload_text"] == "now").unwrap();
    assert_eq!(command["topic"], format!("cmd/{run}/{device}/read"));
    let waited = answered_at - published_at;
    assert!(
        waited < Duration::from_secs(10),
        "answered {waited:?} after the publish, not at the end of the wait"
    );
    let id = command["id"].as_str().unwrap();
    let reply = gateway.post(
        &format!("/commands/{id}/reply"),
        &device,
        br#"{"status": "done", "payload": {"kwh": 12}}"#.to_vec(),
        Some("application/json"),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let (topic, reply) = next_reply(&commander);
    assert_eq!(topic, format!("cmd-reply/{run}/{device}"));
    assert_eq!(
        reply,
        json!({"command_id": id, "status": "done", "payload": {"kwh": 12}})
    );
}

/// MQTT 5 request/response through a device that speaks the WebSocket dialect: the
/// command shows its response topic and user properties, and the reply goes to that
/// topic with the command's correlation data (paho-mqtt on the broker asks and gets
/// the answer).
#[test]
fn a_reply_goes_to_the_commands_response_topic_with_its_correlation_data() {
    let env = TestEnv::get();
    let run = unique("rr");
    let device = format!("{run}-pump");
    let gateway = start(&env, &run);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let rt = runtime();
    let mut socket = subscribed_session(&rt, &gateway, &commander, &run, &device);
    let (url, tls) = env.paho_direct();
    let answers = format!("app/{run}/answers");
    let asker = PahoSession::start(json!({
        "url": url, "tls": tls, "version": 5, "client_id": unique("asker"),
        "subscribe": [[answers, 1]],
        "publishes": [{
            "topic": format!("cmd/{run}/{device}/start"), "payload": "{\"rpm\":900}", "qos": 1,
            "properties": {"response_topic": answers, "correlation_data": "req-9",
                           "user_properties": [["site", "north"]]},
        }],
        "expect": 1,
    }));
    assert_eq!(asker.next("puback")["reason"], 0);
    let command = rt.block_on(next_command(&mut socket));
    assert_eq!(command["response_topic"], answers);
    assert_eq!(command["user_properties"], json!([{"site": "north"}]));
    let reply = json!({"type": "command_reply", "id": command["id"], "status": "started"});
    rt.block_on(socket.send(Frame::Text(reply.to_string().into())))
        .unwrap();
    let messages = asker.messages_until_end();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["topic"], answers);
    assert_eq!(messages[0]["properties"]["correlation_data"], "req-9");
    let body: Value = serde_json::from_str(messages[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"command_id": command["id"], "status": "started"})
    );
}

/// The device's session outlives its connection at the broker: a QoS 1 command sent
/// while the gateway was down (kill -9) arrives when the device comes back, and one
/// sent while the device was away arrives when it comes back on a second instance.
#[test]
fn a_command_sent_while_the_device_was_away_waits_at_the_broker() {
    let env = TestEnv::get();
    let run = unique("away");
    let device = format!("{run}-door");
    let mut first = start(&env, &run);
    let second = start(&env, &run);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let rt = runtime();
    let socket = subscribed_session(&rt, &first, &commander, &run, &device);
    first.crash_and_restart_after(|| {
        commander.publish(&format!("cmd/{run}/{device}/unlock"), "while-down");
    });
    drop(socket);
    let mut socket = rt.block_on(connect(&first, &device));
    let command = rt.block_on(next_command(&mut socket));
    assert_eq!(command["payload_text"], "while-down");
    rt.block_on(socket.close(None)).unwrap();
    // Closed politely; the session stays at the broker (no connection holds it now).
    eventually(Duration::from_secs(20), "the session closed", || {
        let devices = first.admin_get("/admin/devices");
        devices["sessions"].as_array()?.is_empty().then_some(())
    });
    commander.publish(&format!("cmd/{run}/{device}/lock"), "while-away");
    let mut socket = rt.block_on(connect(&second, &device));
    let command = rt.block_on(next_command(&mut socket));
    assert_eq!(command["payload_text"], "while-away");
}

/// Without `[upstream]` a long-poll and a reply are refused and say why; with it, a
/// device whose grants cover none of the command topics is told so.
#[test]
fn a_device_that_receives_nothing_is_told_why() {
    let plain = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    let (status, answer) = poll(&plain, "meter-1", 0);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("[upstream]"),
        "{answer}"
    );
    let reply = plain.post("/commands/c-1/reply", "meter-1", b"{}".to_vec(), None);
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    let env = TestEnv::get();
    let run = unique("nogrant");
    let gateway = Gateway::start(&format!(
        r#"
        [routing]
        default_destination = "local"
        [[policy.grants]]
        name = "telemetry only"
        devices = ["*"]
        publish = ["t/#"]
        {}
        "#,
        env.commands_config(&run, 600)
    ));
    let (status, answer) = poll(&gateway, "meter-1", 0);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("no policy grant lets `meter-1` receive"),
        "{answer}"
    );
}
