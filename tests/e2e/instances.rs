//! Many instances behind a load balancer (issue 23): an instance leaves before it stops,
//! so that the balancer sees it go before its clients are told to.

use std::time::Duration;

use crate::harness::{Gateway, eventually};
use crate::raw_mqtt::{Packet5, RawMqtt};

/// SIGTERM with `server.leave_delay_ms`: the gateway first leaves. `/readyz` turns red
/// while an MQTT 5 session is still up, and an HTTP publish is refused with `503
/// leaving`, `Retry-After` and `Connection: close`, nothing of it kept. Then the session
/// gets DISCONNECT 0x8B, the listener closes, and the publish acknowledged before the
/// signal is in the sink when the process exits 0.
#[test]
fn a_leaving_gateway_turns_readyz_red_before_it_tells_its_clients_to_go() {
    let mut gateway = Gateway::start(
        "[server]\nleave_delay_ms = 1500\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
    );
    let (mut session, connack) = RawMqtt::connect(&gateway, "leaver", &[]);
    assert!(
        matches!(connack, Packet5::ConnAck(ref ack) if ack.code as u8 == 0),
        "{connack:?}"
    );
    let before = gateway.publish("t/before", "dev-1", "kept");
    assert_eq!(before.status, 200, "{:?}", before.body);
    let client = reqwest::blocking::Client::new();
    let ready = |client: &reqwest::blocking::Client| {
        client
            .get(format!("{}/readyz", gateway.url))
            .send()
            .map(|r| {
                (
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().unwrap_or_default(),
                )
            })
    };
    assert_eq!(ready(&client).unwrap().0, 200);

    gateway.send_sigterm();
    let red = eventually(Duration::from_secs(10), "/readyz red", || {
        ready(&client).ok().filter(|(status, _)| *status == 503)
    });
    assert_eq!(red.1["leaving"], true, "{red:?}");
    assert!(
        session.quiet_for(Duration::from_millis(200)),
        "the MQTT session is still up when /readyz is red"
    );
    let refused = client
        .post(format!("{}/topics/t/during", gateway.url))
        .header("x-device-id", "dev-1")
        .body("refused")
        .send()
        .unwrap();
    assert_eq!(refused.status(), 503);
    let headers = refused.headers().clone();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["connection"], "close");
    let body: serde_json::Value = refused.json().unwrap();
    assert_eq!(body["code"], "leaving", "{body}");

    match session.next() {
        Some(Packet5::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason_code as u8, 0x8b, "server shutting down")
        }
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(gateway.wait_exit(Duration::from_secs(30)).success());
    let sink = gateway.dir.path().join("data").join("local.jsonl");
    let topics: Vec<String> = std::fs::read_to_string(sink)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["topic"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        topics,
        ["t/before"],
        "the acknowledged publish, not the refused one"
    );
}

/// `sluice admin drain` takes a gateway out of service as SIGTERM does: it answers
/// `202`, `/readyz` turns red, and the process exits 0.
#[test]
fn sluice_admin_drain_stops_the_gateway_as_sigterm_does() {
    let mut gateway = Gateway::start("[server]\nleave_delay_ms = 1000\n");
    let (code, out, err) = crate::harness::sluice(&[
        "admin",
        "drain",
        "--admin-url",
        &gateway.admin,
        "--token",
        crate::harness::ADMIN_TOKEN,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["leaving"], true, "{answer}");
    assert_eq!(answer["leave_delay_ms"], 1000, "{answer}");
    let status = reqwest::blocking::get(format!("{}/readyz", gateway.url))
        .unwrap()
        .status();
    assert_eq!(status, 503);
    assert!(gateway.wait_exit(Duration::from_secs(30)).success());
}
