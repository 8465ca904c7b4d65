//! WebSocket sessions with a real client (tokio-tungstenite): acknowledgements by id, bad
//! frames answered without ending the session, the credit window, close codes.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::harness::Gateway;
use crate::wsclient::{connect, next_json, runtime};

fn publish(id: &str, topic: &str, payload: Value) -> Frame {
    Frame::Text(
        json!({"type": "publish", "id": id, "topic": topic, "payload": payload})
            .to_string()
            .into(),
    )
}

#[test]
fn messages_are_acknowledged_by_id_and_a_malformed_frame_keeps_the_session() {
    let gateway = Gateway::start("[routing]\ndefault_destination = \"local\"\n");
    runtime().block_on(async {
        let mut socket = connect(&gateway, "dev-ws", "sluice.v1").await.unwrap();
        let welcome = next_json(&mut socket).await;
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["device"], "dev-ws");
        assert_eq!(welcome["window"], 64);

        socket
            .send(publish("a", "ws/t", json!({"n": 1})))
            .await
            .unwrap();
        socket
            .send(Frame::Text(
                r#"{"type": "publish", "id": "broken", "topic": 42}"#.into(),
            ))
            .await
            .unwrap();
        socket.send(Frame::Text("{not json".into())).await.unwrap();
        socket
            .send(publish("b", "ws/t/#", json!({})))
            .await
            .unwrap();
        socket
            .send(publish("c", "ws/t", json!({"n": 3})))
            .await
            .unwrap();
        let mut replies = Vec::new();
        for _ in 0..5 {
            replies.push(next_json(&mut socket).await);
        }
        let by_id = |id: &str| {
            replies
                .iter()
                .find(|r| r["id"] == id)
                .cloned()
                .unwrap_or(Value::Null)
        };
        for id in ["a", "c"] {
            let ack = by_id(id);
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["status"], "accepted");
            let line = gateway
                .find(ack["message_id"].as_str().unwrap())
                .expect("stored");
            assert_eq!(line["device"], "dev-ws");
            assert_eq!(line["attributes"]["ws.id"], id);
        }
        assert_eq!(by_id("broken")["code"], "bad_frame");
        assert_eq!(by_id("b")["code"], "bad_request", "a wildcard topic");
        assert!(
            replies
                .iter()
                .any(|r| r["type"] == "error" && r["id"].is_null() && r["code"] == "bad_frame"),
            "the unparseable frame is answered too: {replies:?}"
        );

        // The session is still open, and the compact binary form works on it.
        let mut frame = vec![0x01, 0x01, 3, b'b', b'i', b'n', 0, 4];
        frame.extend_from_slice(b"ws/b");
        frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        socket.send(Frame::Binary(frame.into())).await.unwrap();
        let ack = loop {
            match socket.next().await.unwrap().unwrap() {
                Frame::Binary(bytes) => break bytes.to_vec(),
                Frame::Ping(_) | Frame::Pong(_) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(ack[0], 0x02, "a binary ack");
        assert_eq!(ack[1], 0, "accepted");
        assert_eq!(&ack[5..], b"bin", "for id `bin`");
        socket.close(None).await.unwrap();
    });
    let stored = gateway.all_sink_lines();
    assert_eq!(stored.len(), 3, "a, c and bin: {stored:?}");
    assert!(stored.iter().any(|l| l["payload_base64"] == "3q2+7w=="));
}

#[test]
fn a_fast_sender_is_held_to_its_window_and_not_dropped() {
    let gateway =
        Gateway::start("[websocket]\nwindow = 4\n[routing]\ndefault_destination = \"local\"\n");
    runtime().block_on(async {
        let mut socket = connect(&gateway, "fast", "sluice.v1").await.unwrap();
        assert_eq!(next_json(&mut socket).await["window"], 4);
        // Send everything at once, without waiting for a single acknowledgement.
        for n in 0..300 {
            socket
                .feed(publish(&format!("m{n}"), "fast/t", json!({"n": n})))
                .await
                .unwrap();
        }
        socket.flush().await.unwrap();
        let mut acked = std::collections::BTreeSet::new();
        while acked.len() < 300 {
            let ack = next_json(&mut socket).await;
            assert_eq!(ack["status"], "accepted", "{ack}");
            let credit = ack["credit"].as_u64().unwrap();
            assert!(credit <= 4, "{ack}");
            acked.insert(ack["id"].as_str().unwrap().to_string());
        }
        // The gateway's own account of the session, while it is open.
        let devices = gateway.admin_get("/admin/devices");
        let session = &devices["sessions"][0];
        assert_eq!(session["device"], "fast");
        assert!(
            session["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with("127.0.0.1:")),
            "the connection's address: {session}"
        );
        assert_eq!(session["messages"], 300);
        assert_eq!(session["window"], 4);
        assert_eq!(
            session["max_in_flight"], 4,
            "filled to its window and never past it"
        );
        assert_eq!(session["in_flight"], 0);
        socket.close(None).await.unwrap();
    });
    let lines = gateway.all_sink_lines();
    let stored: std::collections::BTreeSet<String> = lines
        .iter()
        .map(|line| line["attributes"]["ws.id"].as_str().unwrap().to_string())
        .collect();
    let sent: std::collections::BTreeSet<String> = (0..300).map(|n| format!("m{n}")).collect();
    assert_eq!(stored, sent, "every message by its id, none dropped");
    assert_eq!(lines.len(), 300, "and none twice");
}

#[test]
fn oversized_frames_idle_sessions_and_foreign_subprotocols_are_refused_cleanly() {
    let gateway = Gateway::start(
        "[websocket]\nmax_frame_bytes = 2048\nping_interval_secs = 1\nidle_timeout_secs = 2\n",
    );
    runtime().block_on(async {
        let refused = connect(&gateway, "dev", "mqtt").await;
        assert!(
            refused.unwrap_err().contains("400"),
            "a foreign subprotocol gets 400"
        );

        let mut socket = connect(&gateway, "big", "sluice.v1").await.unwrap();
        next_json(&mut socket).await;
        socket
            .send(publish("huge", "t", json!("x".repeat(4096))))
            .await
            .unwrap();
        let close = loop {
            match socket.next().await {
                Some(Ok(Frame::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(u16::from(close.unwrap().code), 1009);

        let mut quiet = connect(&gateway, "quiet", "sluice.v1").await.unwrap();
        let mut active = connect(&gateway, "active", "sluice.v1").await.unwrap();
        next_json(&mut active).await;
        // `quiet` does not read, so it answers none of the gateway's pings: it goes idle.
        // `active` reads (answering pings) and publishes every 250 ms throughout, for
        // twice the idle timeout: it must outlive `quiet`.
        let opened = std::time::Instant::now();
        let mut n = 0;
        while opened.elapsed() < Duration::from_secs(4) {
            n += 1;
            active
                .send(publish(&format!("a{n}"), "t", json!({"n": n})))
                .await
                .unwrap();
            let ack = next_json(&mut active).await;
            assert_eq!(ack["type"], "ack", "the active session goes on: {ack}");
            assert_eq!(ack["id"], format!("a{n}"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let close = loop {
            match quiet.next().await {
                Some(Ok(Frame::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let close = close.unwrap();
        assert_eq!(u16::from(close.code), 4000);
        assert_eq!(close.reason.as_str(), "idle timeout");
        // Still open after `quiet` was closed, well past the idle timeout.
        active
            .send(publish("last", "t", json!({"n": 0})))
            .await
            .unwrap();
        let ack = next_json(&mut active).await;
        assert_eq!(ack["id"], "last", "{ack}");
        assert_eq!(ack["status"], "accepted", "{ack}");
        assert!(n >= 10, "{n} publishes over 4 s");
        active.close(None).await.unwrap();
    });
}
