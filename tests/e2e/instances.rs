//! Many instances behind a load balancer (issue 23): an instance leaves before it stops,
//! so that the balancer sees it go before its clients are told to; a dead instance's
//! data directory is delivered by `sluice spool drain`.

use std::time::Duration;

use crate::cloud::{TestEnv, unique};
use crate::harness::{Gateway, eventually, sluice};
use crate::raw_mqtt::{Packet5, RawMqtt};

/// SIGTERM with `server.leave_delay_ms`: the gateway first leaves. `/readyz` turns red
/// while an MQTT 5 session is still up, and an HTTP publish is refused with `503
/// leaving`, `Retry-After` and `Connection: close`, nothing of it kept. Then the session
/// gets DISCONNECT 0x8B, the listener closes, and the publish acknowledged before the
/// signal is in the sink when the process exits 0.
#[test]
fn a_leaving_gateway_turns_readyz_red_before_it_tells_its_clients_to_go() {
    let mut gateway = Gateway::start(
        "[server]\nleave_delay_ms = 3000\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[routing]\ndefault_destination = \"local\"\n",
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

/// What an instance acknowledged and never delivered (records its unreachable sink never
/// took, dead letters Kinesis refused while the stream was missing) is delivered from its
/// data directory by `sluice spool drain` once the instance is dead: every message read
/// back from the stream, none left. While the instance runs, the directory is refused.
#[test]
fn spool_drain_delivers_a_dead_instances_queue_and_dead_letters() {
    let env = TestEnv::get();
    let stream = unique("handover");
    let fleet = env.kinesis_config(&stream, "");
    let mut gateway = Gateway::start(&fleet);
    // The stream does not exist yet: Kinesis refuses these for good.
    for n in 0..3 {
        let reply = gateway.publish("t", "dev-1", format!("dead-{n}"));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    eventually(Duration::from_secs(30), "three dead letters", || {
        (gateway.dead_letters().len() == 3).then_some(())
    });
    // Kinesis unreachable: these are acknowledged and wait in the spool.
    let own = gateway.dir.path().join("sluice.toml");
    let unreachable = std::fs::read_to_string(&own)
        .unwrap()
        .replace(&env.aws_endpoint(), "http://127.0.0.1:9");
    gateway.crash_and_restart_after(|| std::fs::write(&own, unreachable).unwrap());
    for n in 0..5 {
        let reply = gateway.publish("t", "dev-1", format!("queued-{n}"));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let data = gateway.dir.path().join("data");
    let fleet_file = gateway.dir.path().join("fleet.toml");
    std::fs::write(&fleet_file, &fleet).unwrap();
    let drain = |json: bool| {
        let mut args = vec![
            "spool".to_string(),
            "drain".to_string(),
            "--data-dir".to_string(),
            data.display().to_string(),
            "--config".to_string(),
            fleet_file.display().to_string(),
            "--timeout".to_string(),
            "60".to_string(),
        ];
        if json {
            args.push("--json".to_string());
        }
        sluice(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, _, error) = drain(false);
    assert_eq!(
        code, 1,
        "a directory a live gateway holds is refused: {error}"
    );
    assert!(error.contains("is in use by another process"), "{error}");
    assert_eq!(gateway.spooled(), 5, "nothing taken from the live instance");

    gateway.kill();
    env.create_stream(&stream, 1);
    let (code, out, error) = drain(true);
    assert_eq!(code, 0, "{out}{error}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["dead_letters_redriven"], 3, "{report}");
    assert_eq!(report["dead_letters_left"], 0, "{report}");
    let kinesis = report["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|sink| sink["sink"] == "kinesis")
        .unwrap();
    assert_eq!(kinesis["delivered"], 8, "{report}");
    assert_eq!(kinesis["left"], 0, "{report}");
    let mut got: Vec<String> = env
        .read_stream(&stream)
        .into_iter()
        .map(|(_, _, data)| String::from_utf8(data).unwrap())
        .collect();
    got.sort();
    let mut expected: Vec<String> = (0..3)
        .map(|n| format!("dead-{n}"))
        .chain((0..5).map(|n| format!("queued-{n}")))
        .collect();
    expected.sort();
    assert_eq!(got, expected);
}

/// With `mqtt.server_reference`, a leaving gateway sends its MQTT 5 clients elsewhere:
/// DISCONNECT 0x9C (use another server) naming that server.
#[test]
fn a_leaving_gateway_sends_mqtt5_clients_to_the_configured_server() {
    let mut gateway = Gateway::start(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\nserver_reference = \"edge-b.example.com:8883\"\n[routing]\ndefault_destination = \"local\"\n",
    );
    let (mut session, connack) = RawMqtt::connect(&gateway, "moved", &[]);
    assert!(
        matches!(connack, Packet5::ConnAck(ref ack) if ack.code as u8 == 0),
        "{connack:?}"
    );
    gateway.send_sigterm();
    match session.next() {
        Some(Packet5::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason_code as u8, 0x9c, "use another server");
            let reference = disconnect.properties.and_then(|p| p.server_reference);
            assert_eq!(reference.as_deref(), Some("edge-b.example.com:8883"));
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    assert!(gateway.wait_exit(Duration::from_secs(30)).success());
}
