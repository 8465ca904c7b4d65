//! Device identity and policy over real TLS: certificates generated here (a device CA, a
//! foreign CA, good, expired and revoked device certificates), tokens minted with
//! `sluice token issue`, grants that confine each device to its own topics.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use serde_json::{Value, json};

use crate::harness::{Gateway, sluice};

const SECRET_1: &str = "k1-secret-0123456789abcdef0123456789abcdef";
const SECRET_2: &str = "k2-secret-0123456789abcdef0123456789abcdef";

/// A certificate authority that signs device certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A device certificate (CN = device id, OU = group): (cert PEM + key PEM, DER).
    fn device(&self, id: &str, group: &str, serial: u8, expired: bool) -> (String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, group);
        params.serial_number = Some(SerialNumber::from(vec![0x10, serial]));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            format!("{}{}", cert.pem(), key.serialize_pem()),
            cert.der().to_vec(),
        )
    }
}

/// The gateway's own server certificate for 127.0.0.1, written to `dir`; returns its PEM.
fn server_cert(dir: &Path) -> String {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    cert.pem()
}

fn client(server_pem: &str, identity: Option<&str>) -> reqwest::blocking::Client {
    let mut builder = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(server_pem.as_bytes()).unwrap());
    if let Some(pem) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// (status, body) of a publish; `Err` when the TLS handshake or connection failed.
fn publish(
    client: &reqwest::blocking::Client,
    gateway: &Gateway,
    topic: &str,
    token: Option<&str>,
    spoofed_device: &str,
) -> Result<(u16, Value, Option<String>), String> {
    let mut request = client
        .post(format!("{}/topics/{topic}", gateway.url))
        .header("x-device-id", spoofed_device)
        .body(r#"{"t": 1}"#);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    Ok((status, response.json().unwrap_or(Value::Null), retry_after))
}

/// A gateway with mTLS, tokens and grants, and the PKI around it.
struct Setup {
    gateway: Gateway,
    server_pem: String,
    ca: Ca,
    good: String,
}

fn setup() -> Setup {
    setup_with(Ca::new("Fleet Device CA"), &[])
}

/// A gateway trusting `ca`, with serial 10:66 and the given certificates revoked.
fn setup_with(ca: Ca, revoked: &[&[u8]]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server_pem = server_cert(dir.path());
    std::fs::write(dir.path().join("devices-ca.pem"), &ca.pem).unwrap();
    let (good, _) = ca.device("sensor-1", "sensors", 1, false);
    let fingerprints: Vec<String> = revoked
        .iter()
        .map(|der| {
            use sha2::Digest as _;
            format!("\"{}\"", hex::encode(sha2::Sha256::digest(der)))
        })
        .collect();
    let fingerprints = fingerprints.join(", ");
    let config = format!(
        r#"
        [server.tls]
        cert = "{{dir}}/server.pem"
        key = "{{dir}}/server.key"
        [auth.mtls]
        ca = ["{{dir}}/devices-ca.pem"]
        revoked_serials = ["10:66"]
        revoked_fingerprints = [{fingerprints}]
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{SECRET_1}" }}, {{ id = "k2", secret = "{SECRET_2}" }}]
        [[policy.grants]]
        name = "slow-devices"
        groups = ["slow"]
        publish = ["devices/${{device.id}}/#"]
        max_messages_per_sec = 2
        [[policy.grants]]
        name = "own-topics"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#
    );
    let gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    Setup {
        gateway,
        server_pem,
        ca,
        good,
    }
}

#[test]
fn client_certificates_name_devices_and_bad_ones_fail_the_handshake() {
    let Setup {
        gateway,
        server_pem,
        ca,
        good,
    } = setup();

    let good_client = client(&server_pem, Some(&good));
    let (status, body, _) = publish(
        &good_client,
        &gateway,
        "devices/sensor-1/temp",
        None,
        "someone-else",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let line = gateway.find(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        line["device"], "sensor-1",
        "the certificate's CN, not the header"
    );

    let foreign = Ca::new("Somebody Else's CA")
        .device("sensor-1", "sensors", 4, false)
        .0;
    let expired = ca.device("sensor-1", "sensors", 5, true).0;
    let revoked = ca.device("sensor-1", "sensors", 0x66, false).0;
    for (what, pem, alert) in [
        ("foreign CA", &foreign, "UnknownCA"),
        ("expired", &expired, "CertificateExpired"),
        ("revoked serial", &revoked, "CertificateRevoked"),
    ] {
        let result = publish(
            &client(&server_pem, Some(pem)),
            &gateway,
            "devices/sensor-1/temp",
            None,
            "x",
        );
        // The handshake fails with the precise TLS alert.
        let error = result.expect_err(what);
        assert!(
            error.contains(&format!("AlertReceived({alert})")),
            "{what}: {error}"
        );
    }

    let anonymous = client(&server_pem, None);
    let (status, body, _) = publish(
        &anonymous,
        &gateway,
        "devices/sensor-1/temp",
        None,
        "sensor-1",
    )
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "missing_credentials");

    // Only the good device's message reached a sink.
    assert_eq!(gateway.all_sink_lines().len(), 1);
    let (status, _, _) =
        publish(&good_client, &gateway, "devices/sensor-1/temp", None, "x").unwrap();
    assert_eq!(status, 200, "the gateway kept serving");
}

#[test]
fn a_certificate_revoked_by_fingerprint_fails_the_handshake() {
    let ca = Ca::new("Fleet Device CA");
    let (lost, lost_der) = ca.device("sensor-2", "sensors", 7, false);
    let Setup {
        gateway,
        server_pem,
        good,
        ..
    } = setup_with(ca, &[&lost_der]);
    let revoked = publish(
        &client(&server_pem, Some(&lost)),
        &gateway,
        "devices/sensor-2/t",
        None,
        "x",
    );
    let error = revoked.expect_err("revoked by fingerprint");
    assert!(
        error.contains("AlertReceived(CertificateRevoked)"),
        "{error}"
    );
    let (status, body, _) = publish(
        &client(&server_pem, Some(&good)),
        &gateway,
        "devices/sensor-1/t",
        None,
        "x",
    )
    .unwrap();
    assert_eq!(status, 200, "another certificate of the same CA: {body}");
}

#[test]
fn tokens_good_expired_tampered_and_unknown_key_behave_as_specified() {
    let Setup {
        gateway,
        server_pem,
        ..
    } = setup();
    let config = gateway.dir.path().join("sluice.toml");
    let (code, token, stderr) = sluice(&[
        "token",
        "issue",
        "--config",
        config.to_str().unwrap(),
        "--device",
        "dev-9",
        "--ttl",
        "1h",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let token = token.trim().to_string();
    let plain = client(&server_pem, None);
    let (status, body, _) =
        publish(&plain, &gateway, "devices/dev-9/x", Some(&token), "spoof").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        gateway.find(body["id"].as_str().unwrap()).unwrap()["device"],
        "dev-9"
    );

    let now = jsonwebtoken::get_current_timestamp();
    let sign = |kid: &str, secret: &str, claims: Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let expired = sign(
        "k1",
        SECRET_1,
        json!({"sub": "dev-9", "iss": "sluice", "iat": now - 7200, "exp": now - 3600}),
    );
    let unknown = sign(
        "k9",
        "k9-secret-0123456789abcdef0123456789abcdef",
        json!({"sub": "dev-9", "iss": "sluice", "iat": now, "exp": now + 600}),
    );
    let foreign_secret = sign(
        "k1",
        "not-our-secret-0123456789abcdef0123456789",
        json!({"sub": "dev-9", "iss": "sluice", "iat": now, "exp": now + 600}),
    );
    let rotated = sign(
        "k2",
        SECRET_2,
        json!({"sub": "dev-9", "iss": "sluice", "iat": now, "exp": now + 600}),
    );
    let tampered = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let claims = String::from_utf8(engine.decode(&parts[1]).unwrap()).unwrap();
        parts[1] = engine.encode(claims.replace("dev-9", "dev-1"));
        parts.join(".")
    };
    for (what, token, code) in [
        ("expired", expired.as_str(), "token_expired"),
        ("unknown key", &unknown, "token_unknown_key"),
        ("wrong secret", &foreign_secret, "token_invalid_signature"),
        ("tampered", &tampered, "token_invalid_signature"),
        ("garbage", "abc.def", "token_malformed"),
    ] {
        let (status, body, _) =
            publish(&plain, &gateway, "devices/dev-9/x", Some(token), "x").unwrap();
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
        let text = body.to_string();
        assert!(
            !text.contains(SECRET_1) && !text.contains("secret"),
            "{what}: nothing about the secret: {text}"
        );
    }
    let (status, body, _) =
        publish(&plain, &gateway, "devices/dev-9/x", Some(&rotated), "x").unwrap();
    assert_eq!(status, 200, "a token of the second key: {body}");
    assert_eq!(
        gateway.all_sink_lines().len(),
        2,
        "only the good tokens' messages"
    );
}

#[test]
fn a_device_cannot_publish_to_another_devices_topic_and_fast_ones_get_429() {
    let Setup {
        gateway,
        server_pem,
        ..
    } = setup();
    let config = gateway.dir.path().join("sluice.toml");
    let issue = |device: &str, group: Option<&str>| {
        let mut args = vec![
            "token",
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--device",
            device,
        ];
        if let Some(group) = group {
            args.extend(["--group", group]);
        }
        let (code, token, stderr) = sluice(&args);
        assert_eq!(code, 0, "{stderr}");
        token.trim().to_string()
    };
    let plain = client(&server_pem, None);
    let a = issue("dev-a", None);
    let (status, body, _) = publish(&plain, &gateway, "devices/dev-b/temp", Some(&a), "x").unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "topic_denied");
    assert_eq!(body["rule"], "policy:default-deny");
    assert!(
        gateway.all_sink_lines().is_empty(),
        "nothing reached any sink"
    );
    assert_eq!(
        gateway.admin_get("/admin/spool")["last_seq"],
        0,
        "nothing was spooled"
    );

    let slow = issue("dev-s", Some("slow"));
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(publish(&plain, &gateway, "devices/dev-s/temp", Some(&slow), "x").unwrap());
    }
    assert_eq!(answers[0].0, 200);
    let limited = answers
        .iter()
        .find(|(status, ..)| *status == 429)
        .expect("a 429 within 4 quick messages at 2/s");
    assert_eq!(limited.1["code"], "rate_limited");
    assert_eq!(limited.1["rule"], "policy:slow-devices");
    assert_eq!(limited.2.as_deref(), Some("1"), "Retry-After");
}
