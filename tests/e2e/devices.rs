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
const SECRET_3: &str = "k3-secret-0123456789abcdef0123456789abcdef";
const SECRET_4: &str = "k4-secret-0123456789abcdef0123456789abcdef";

/// A certificate authority that signs device certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
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
    pub fn device(&self, id: &str, group: &str, serial: u8, expired: bool) -> (String, Vec<u8>) {
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
pub fn server_cert(dir: &Path) -> String {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    cert.pem()
}

pub fn client(server_pem: &str, identity: Option<&str>) -> reqwest::blocking::Client {
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
    let token = gateway.issue_token("dev-9", "1h");
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

/// Rewrites the gateway's configuration file (`from` → `to`, which must occur) and
/// reloads it through the admin API; the report.
pub fn rewrite_and_reload(gateway: &Gateway, edits: &[(&str, &str)]) -> Value {
    let path = gateway.dir.path().join("sluice.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} in {text}");
        text = text.replace(from, to);
    }
    std::fs::write(&path, text).unwrap();
    let reply = gateway.admin_post("/admin/reload", "");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

fn names(report: &Value, field: &str) -> Vec<String> {
    report[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tls_files_rewritten_under_the_same_names_serve_new_connections_after_a_reload() {
    let Setup {
        gateway,
        server_pem,
        ca,
        good,
    } = setup();
    let dir = gateway.dir.path().to_path_buf();
    let old_connection = client(&server_pem, Some(&good));
    let (status, body, _) =
        publish(&old_connection, &gateway, "devices/sensor-1/t", None, "x").unwrap();
    assert_eq!(status, 200, "{body}");

    // New server certificate and key, a new device CA, written over the same files.
    let new_server_pem = server_cert(&dir);
    let new_ca = Ca::new("Fleet Device CA, next year");
    std::fs::write(dir.join("devices-ca.pem"), &new_ca.pem).unwrap();
    let report = gateway.admin_post("/admin/reload", "");
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(
        report.body["restart_required"],
        json!([]),
        "{:?}",
        report.body
    );

    // The connection opened before goes on with the identity it shook hands with. (A
    // new connection of this client would fail: it trusts only the old server
    // certificate.)
    let (status, body, _) =
        publish(&old_connection, &gateway, "devices/sensor-1/t", None, "x").unwrap();
    assert_eq!(status, 200, "the open connection stays: {body}");

    // New connections see the new server certificate...
    let error = publish(
        &client(&server_pem, Some(&good)),
        &gateway,
        "devices/sensor-1/t",
        None,
        "x",
    )
    .expect_err("the old server certificate is no longer served");
    assert!(error.contains("InvalidCertificate"), "{error}");
    // ... and the new device CA: a device of the old CA is refused, one of the new
    // CA accepted.
    let error = publish(
        &client(&new_server_pem, Some(&good)),
        &gateway,
        "devices/sensor-1/t",
        None,
        "x",
    )
    .expect_err("the old device CA is no longer trusted");
    assert!(error.contains("AlertReceived(UnknownCA)"), "{error}");
    let (renewed, _) = new_ca.device("sensor-1", "sensors", 2, false);
    let (status, body, _) = publish(
        &client(&new_server_pem, Some(&renewed)),
        &gateway,
        "devices/sensor-1/t",
        None,
        "x",
    )
    .unwrap();
    assert_eq!(status, 200, "a device of the new CA: {body}");

    // A certificate revoked by a reload fails its next handshake.
    let report = rewrite_and_reload(
        &gateway,
        &[(
            r#"revoked_serials = ["10:66"]"#,
            r#"revoked_serials = ["10:66", "10:02"]"#,
        )],
    );
    assert!(
        names(&report, "applied").contains(&"auth".to_string()),
        "{report}"
    );
    let error = publish(
        &client(&new_server_pem, Some(&renewed)),
        &gateway,
        "devices/sensor-1/t",
        None,
        "x",
    )
    .expect_err("revoked by the reload");
    assert!(
        error.contains("AlertReceived(CertificateRevoked)"),
        "{error}"
    );
    drop(ca);
}

#[test]
fn turning_tls_or_client_certificates_on_or_off_waits_for_a_restart() {
    // Plain HTTP; [server.tls] added by a reload: listed, not applied.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    server_cert(dir.path());
    let gateway = Gateway::start_in(
        dir,
        "[routing]\ndefault_destination = \"local\"\n",
        reqwest::blocking::Client::new(),
    );
    let tls = format!("[server.tls]\ncert = \"{path}/server.pem\"\nkey = \"{path}/server.key\"\n");
    let report = rewrite_and_reload(&gateway, &[("[routing]", &format!("{tls}[routing]"))]);
    assert_eq!(
        names(&report, "restart_required"),
        ["server.tls (turning TLS on or off)"],
        "{report}"
    );
    assert_eq!(
        gateway.publish("t", "dev-1", "{}").status,
        200,
        "still plain HTTP"
    );
    drop(gateway);

    // HTTPS; [server.tls] removed by a reload: listed, and HTTPS goes on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let server_pem = server_cert(dir.path());
    let tls = format!("[server.tls]\ncert = \"{path}/server.pem\"\nkey = \"{path}/server.key\"\n");
    let gateway = Gateway::start_in(
        dir,
        &format!("{tls}[routing]\ndefault_destination = \"local\"\n"),
        client(&server_pem, None),
    );
    assert!(gateway.url.starts_with("https://"), "{}", gateway.url);
    let report = rewrite_and_reload(&gateway, &[(tls.as_str(), "")]);
    assert_eq!(
        names(&report, "restart_required"),
        ["server.tls (turning TLS on or off)"],
        "{report}"
    );
    let reply = gateway.publish("t", "dev-1", "{}");
    assert_eq!(
        reply.status, 200,
        "still HTTPS (a new connection): {:?}",
        reply.body
    );
    drop(gateway);

    // TLS with tokens; [auth.mtls] turned on together with a token key change: the
    // whole [auth] change waits (the old key still works, the new one does not yet).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let server_pem = server_cert(dir.path());
    let ca = Ca::new("Fleet Device CA");
    std::fs::write(dir.path().join("devices-ca.pem"), &ca.pem).unwrap();
    let tls = format!("[server.tls]\ncert = \"{path}/server.pem\"\nkey = \"{path}/server.key\"\n");
    let keys_k1 = format!(r#"keys = [{{ id = "k1", secret = "{SECRET_1}" }}]"#);
    let keys_k2 = format!(r#"keys = [{{ id = "k2", secret = "{SECRET_2}" }}]"#);
    let config = format!(
        "{tls}[auth.tokens]\n{keys_k1}\n[[policy.grants]]\nname = \"own\"\ndevices = [\"*\"]\npublish = [\"devices/${{device.id}}/#\"]\n[routing]\ndefault_destination = \"local\"\n"
    );
    let gateway = Gateway::start_in(dir, &config, reqwest::blocking::Client::new());
    let config_file = gateway.dir.path().join("sluice.toml");
    let issue = || {
        let (code, token, stderr) = sluice(&[
            "token",
            "issue",
            "--config",
            config_file.to_str().unwrap(),
            "--device",
            "dev-9",
        ]);
        assert_eq!(code, 0, "{stderr}");
        token.trim().to_string()
    };
    let k1_token = issue();
    let plain = client(&server_pem, None);
    let (status, body, _) =
        publish(&plain, &gateway, "devices/dev-9/x", Some(&k1_token), "x").unwrap();
    assert_eq!(status, 200, "{body}");
    let mtls = format!("[auth.mtls]\nca = [\"{path}/devices-ca.pem\"]\n");
    let report = rewrite_and_reload(
        &gateway,
        &[
            (keys_k1.as_str(), keys_k2.as_str()),
            ("[auth.tokens]", &format!("{mtls}[auth.tokens]")),
        ],
    );
    assert_eq!(
        names(&report, "restart_required"),
        ["auth (turning client certificates on or off; the whole [auth] change waits)"],
        "{report}"
    );
    assert!(
        !names(&report, "applied").contains(&"auth".to_string()),
        "{report}"
    );
    let k2_token = issue();
    let fresh = client(&server_pem, None);
    let (status, body, _) =
        publish(&fresh, &gateway, "devices/dev-9/x", Some(&k1_token), "x").unwrap();
    assert_eq!(status, 200, "the old key still holds: {body}");
    let (status, body, _) =
        publish(&fresh, &gateway, "devices/dev-9/x", Some(&k2_token), "x").unwrap();
    assert_eq!(status, 401, "the new key waits for the restart: {body}");
    assert_eq!(body["code"], "token_unknown_key");
    let (good, _) = ca.device("dev-9", "sensors", 3, false);
    let (status, body, _) = publish(
        &client(&server_pem, Some(&good)),
        &gateway,
        "devices/dev-9/x",
        None,
        "x",
    )
    .unwrap();
    assert_eq!(
        status, 401,
        "client certificates are not asked for yet: {body}"
    );
}

#[test]
fn token_keys_rotate_by_reload_and_a_removed_key_is_refused_even_for_cached_tokens() {
    let Setup {
        gateway,
        server_pem,
        ..
    } = setup();
    let config = gateway.dir.path().join("sluice.toml");
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "issue",
            "--config",
            config.to_str().unwrap(),
            "--device",
            "dev-9",
            "--ttl",
            "1h",
        ];
        args.extend_from_slice(extra);
        sluice(&args)
    };
    let kid = |token: &str| {
        jsonwebtoken::decode_header(token)
            .unwrap()
            .kid
            .unwrap_or_default()
    };
    let (code, k1, stderr) = issue(&["--key-id", "k1"]);
    assert_eq!(code, 0, "{stderr}");
    let k1 = k1.trim().to_string();
    assert_eq!(kid(&k1), "k1", "--key-id picks the key");
    let (code, k2, stderr) = issue(&[]);
    assert_eq!(code, 0, "{stderr}");
    let k2 = k2.trim().to_string();
    assert_eq!(kid(&k2), "k2", "by default the last key listed signs");
    let (code, _, stderr) = issue(&["--key-id", "k7"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("k7"), "{stderr}");

    let plain = client(&server_pem, None);
    let send =
        |token: &str| publish(&plain, &gateway, "devices/dev-9/x", Some(token), "x").unwrap();
    for token in [&k1, &k2] {
        let (status, body, _) = send(token);
        assert_eq!(status, 200, "{}: {body}", kid(token));
    }

    // Claims: not yet valid, or from another issuer.
    let now = jsonwebtoken::get_current_timestamp();
    let sign = |claims: Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k2".to_string());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET_2.as_bytes()),
        )
        .unwrap()
    };
    let early = sign(
        json!({"sub": "dev-9", "iss": "sluice", "iat": now, "nbf": now + 3600, "exp": now + 7200}),
    );
    let foreign =
        sign(json!({"sub": "dev-9", "iss": "someone-else", "iat": now, "exp": now + 600}));
    for (what, token, code) in [
        ("nbf in an hour", &early, "token_not_yet_valid"),
        ("wrong issuer", &foreign, "token_wrong_issuer"),
    ] {
        let (status, body, _) = send(token);
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
    }

    // Rotation: k3 added and made the signing key, k1 removed. k1's token, verified
    // (and cached) a moment ago, is refused from now on.
    let report = rewrite_and_reload(
        &gateway,
        &[(
            &format!(
                r#"keys = [{{ id = "k1", secret = "{SECRET_1}" }}, {{ id = "k2", secret = "{SECRET_2}" }}]"#
            ),
            &format!(
                r#"signing_key = "k3"
        keys = [{{ id = "k2", secret = "{SECRET_2}" }}, {{ id = "k3", secret = "{SECRET_3}" }}, {{ id = "k4", secret = "{SECRET_4}" }}]"#
            ),
        )],
    );
    assert!(
        names(&report, "applied").contains(&"auth".to_string()),
        "{report}"
    );
    let (status, body, _) = send(&k1);
    assert_eq!(status, 401, "a removed key's token: {body}");
    assert_eq!(body["code"], "token_unknown_key");
    let (status, body, _) = send(&k2);
    assert_eq!(status, 200, "a kept key's token: {body}");
    let (code, k3, stderr) = issue(&[]);
    assert_eq!(code, 0, "{stderr}");
    let k3 = k3.trim().to_string();
    assert_eq!(
        kid(&k3),
        "k3",
        "signing_key names the signing key, not the last listed"
    );
    let (status, body, _) = send(&k3);
    assert_eq!(status, 200, "{body}");
    let (code, _, stderr) = issue(&["--key-id", "k1"]);
    assert_ne!(code, 0, "k1 is gone: {stderr}");
}
