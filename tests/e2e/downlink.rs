//! Commands to devices through mosquitto: to a WebSocket session, to an HTTP long-poll,
//! queued for an offline device (and expired), and across two gateway instances.

use std::time::Duration;

use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::cloud::{Subscriber, TestEnv, unique};
use crate::harness::{Gateway, eventually};
use crate::wsclient::{self, Socket, next_json, runtime};

fn start(env: &TestEnv, run: &str, instance: &str, ttl_secs: u64) -> Gateway {
    let config = format!(
        "[routing]\ndefault_destination = \"local\"\n{}",
        env.downlink_config(run, instance, ttl_secs)
    );
    let gateway = Gateway::start(&config);
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
}

#[test]
fn an_http_long_poll_receives_a_command() {
    let env = TestEnv::get();
    let run = unique("poll");
    let gateway = start(&env, &run, "gw-1", 300);
    let commander = Subscriber::connect(&env, &format!("cmd-reply/{run}/#"));
    let url = format!("{}/commands?wait=20", gateway.url);
    let poll = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .get(url)
            .header("x-device-id", "meter-7")
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()
    });
    commander.publish(&format!("cmd/{run}/meter-7/read"), "now");
    let answer = poll.join().unwrap();
    let commands = answer["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "{answer}");
    assert_eq!(commands[0]["payload_text"], "now");
    assert_eq!(commands[0]["topic"], format!("cmd/{run}/meter-7/read"));
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
    eventually(Duration::from_secs(20), "both commands queued", || {
        (gateway.admin_get("/admin/downlink")["devices_waiting"] == 1).then_some(())
    });
    runtime().block_on(async {
        let mut socket = connect(&gateway, "pump-3").await;
        let first = next_json(&mut socket).await;
        let second = next_json(&mut socket).await;
        assert_eq!(
            first["topic"],
            format!("cmd/{run}/pump-3/first"),
            "in order"
        );
        assert_eq!(second["topic"], format!("cmd/{run}/pump-3/second"));
        assert_ne!(first["payload_text"], "stale");
    });
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
    // The first instance left it to the second: nothing waits there.
    assert_eq!(first.admin_get("/admin/downlink")["devices_waiting"], 0);
}
