//! Tokens from an identity provider (`[auth.jwt]`): keys and tokens made by
//! `tests/clients/idp.py` with PyJWT and `cryptography` (libraries nobody here wrote),
//! the JWKS read from a file and from a real HTTP server (Python's `http.server`), the
//! tokens sent from every place a token travels: `Authorization: Bearer`, the
//! `token_key_name` header and URL query parameter, the MQTT password, the MQTT user
//! name's query, the MQTT-over-WebSocket URL. Every accepted message is read back from
//! the local sink under the token's device.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Gateway, eventually, python_client};
use crate::mqtt::{paho, ws_url};

const ISSUER: &str = "https://idp.example/";
const AUDIENCE: &str = "sluice-fleet";
const OWN_SECRET: &str = "own-secret-0123456789abcdef0123456789ab";

/// The identity provider's keys, in a directory of their own.
struct Idp {
    dir: tempfile::TempDir,
}

impl Idp {
    /// Keys `(kid, alg)`, published in `jwks.json` or not.
    fn new(published: &[(&str, &str)], unpublished: &[(&str, &str)]) -> Idp {
        let idp = Idp {
            dir: tempfile::tempdir().unwrap(),
        };
        idp.publish(published, unpublished);
        idp
    }

    /// Publishes `published` (making the keys that do not exist yet) as the JWKS.
    fn publish(&self, published: &[(&str, &str)], unpublished: &[(&str, &str)]) {
        let list = |keys: &[(&str, &str)]| -> Vec<Value> {
            keys.iter()
                .map(|(kid, alg)| json!({"kid": kid, "alg": alg}))
                .collect()
        };
        let spec = json!({"publish": list(published), "unpublished": list(unpublished)});
        python_client("idp.py", &["keys", self.path(), &spec.to_string()]);
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn jwks(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    /// Tokens by name, from `{NAME: {"kid", "claims", "exp_in"?, "nbf_in"?, "no_kid"?}}`;
    /// `iss` and `aud` are added to the claims unless given.
    fn mint(&self, tokens: Value) -> Value {
        let mut tokens = tokens;
        for token in tokens.as_object_mut().unwrap().values_mut() {
            let claims = token["claims"].as_object_mut().unwrap();
            claims.entry("iss").or_insert(ISSUER.into());
            claims.entry("aud").or_insert(AUDIENCE.into());
        }
        let spec = json!({"tokens": tokens});
        python_client("idp.py", &["mint", self.path(), &spec.to_string()]).remove(0)
    }

    /// Serves the directory over HTTP: the server (stopped on drop) and its port.
    fn serve(&self) -> (Served, u16) {
        let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/idp.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["serve", self.path()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = serde_json::from_str::<Value>(&line).unwrap()["port"]
            .as_u64()
            .unwrap() as u16;
        (Served(child), port)
    }
}

/// `idp.py serve`, stopped on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A gateway taking the provider's tokens (keys from `source`, a `jwks_file = …` or
/// `jwks_url = …` line) and its own HS256 ones, over HTTP and MQTT (TCP and WebSocket).
fn gateway(source: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
        [mqtt]
        listen = "127.0.0.1:0"
        [auth.jwt]
        {source}
        issuer = "{ISSUER}"
        audience = ["{AUDIENCE}"]
        groups_claim = "groups"
        refresh_secs = 3600
        [auth.tokens]
        keys = [{{ id = "k1", secret = "{OWN_SECRET}" }}]
        [[policy.grants]]
        name = "own-site"
        devices = ["*"]
        publish = ["sites/${{claims.site}}/${{device.id}}/#"]
        [[policy.grants]]
        name = "operators"
        groups = ["operators"]
        publish = ["ops/#"]
        [[policy.grants]]
        name = "own-devices"
        devices = ["*"]
        publish = ["devices/${{device.id}}/#"]
        [routing]
        default_destination = "local"
        "#
    ))
}

/// Where an HTTP request carries its token.
#[derive(Debug, Clone, Copy)]
enum Carried {
    Bearer,
    Header,
    Query,
}

/// (status, body) of a publish to `topic` with `token` carried `how`.
fn publish(gateway: &Gateway, topic: &str, token: &str, how: Carried) -> (u16, Value) {
    let client = reqwest::blocking::Client::new();
    let url = format!("{}/topics/{topic}?qos=1", gateway.url);
    let request = match how {
        Carried::Bearer => client.post(url).bearer_auth(token),
        Carried::Header => client.post(url).header("token", token),
        Carried::Query => client.post(format!("{url}&token={token}")),
    };
    let response = request.body(r#"{"t":1}"#).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// The device a publish answered `200` was stored under, read back from the local sink.
fn stored_device(gateway: &Gateway, reply: &(u16, Value)) -> String {
    assert_eq!(reply.0, 200, "{}", reply.1);
    let line = gateway.find(reply.1["id"].as_str().unwrap()).unwrap();
    line["device"].as_str().unwrap().to_string()
}

fn token<'a>(tokens: &'a Value, name: &str) -> &'a str {
    tokens[name].as_str().unwrap()
}

#[test]
fn identity_provider_tokens_are_accepted_wherever_a_token_travels() {
    let idp = Idp::new(
        &[("rsa-1", "RS256"), ("ec-1", "ES256"), ("ed-1", "EdDSA")],
        &[("rsa-unlisted", "RS256")],
    );
    let gateway = gateway(&format!("jwks_file = \"{}\"", idp.jwks().display()));
    let tokens = idp.mint(json!({
        "rs": {"kid": "rsa-1", "claims": {"sub": "dev-rs", "site": "paris"}},
        "es": {"kid": "ec-1", "claims": {"sub": "dev-es", "site": "lyon"}},
        "ed": {"kid": "ed-1", "claims": {"sub": "dev-ed", "groups": ["operators"]}},
        "es_no_kid": {"kid": "ec-1", "no_kid": true, "claims": {"sub": "dev-nk", "site": "lyon"}},
        "no_site": {"kid": "rsa-1", "claims": {"sub": "dev-ns"}},
        "slash_site": {"kid": "rsa-1", "claims": {"sub": "dev-sl", "site": "paris/dev-sl"}},
        "wrong_issuer": {"kid": "rsa-1", "claims": {"sub": "dev-rs", "iss": "https://evil.example/"}},
        "wrong_audience": {"kid": "rsa-1", "claims": {"sub": "dev-rs", "aud": "another-app"}},
        "expired": {"kid": "rsa-1", "exp_in": -600, "claims": {"sub": "dev-rs"}},
        "not_yet": {"kid": "rsa-1", "nbf_in": 600, "claims": {"sub": "dev-rs"}},
        "unknown_key": {"kid": "rsa-unlisted", "claims": {"sub": "dev-rs"}},
        "no_subject": {"kid": "rsa-1", "claims": {"site": "paris"}},
    }));

    // RS256 from each place an HTTP request carries a token; the device is the token's.
    for how in [Carried::Bearer, Carried::Header, Carried::Query] {
        let reply = publish(&gateway, "sites/paris/dev-rs/t", token(&tokens, "rs"), how);
        assert_eq!(stored_device(&gateway, &reply), "dev-rs", "{how:?}");
    }
    // ES256 (with a kid, and without one: the only ES256 key) and EdDSA.
    let reply = publish(
        &gateway,
        "sites/lyon/dev-es/t",
        token(&tokens, "es"),
        Carried::Bearer,
    );
    assert_eq!(stored_device(&gateway, &reply), "dev-es");
    let reply = publish(
        &gateway,
        "sites/lyon/dev-nk/t",
        token(&tokens, "es_no_kid"),
        Carried::Bearer,
    );
    assert_eq!(stored_device(&gateway, &reply), "dev-nk");
    // Groups from the groups claim.
    let reply = publish(
        &gateway,
        "ops/restart",
        token(&tokens, "ed"),
        Carried::Bearer,
    );
    assert_eq!(stored_device(&gateway, &reply), "dev-ed");
    // The gateway's own HS256 tokens keep working beside them.
    let own = gateway.issue_token("dev-own", "10m");
    let reply = publish(&gateway, "devices/dev-own/t", &own, Carried::Bearer);
    assert_eq!(stored_device(&gateway, &reply), "dev-own");

    // `${claims.site}` confines each device to its own site; a missing claim, or one that
    // would reach across topic levels, allows nothing.
    let denied = [
        ("sites/lyon/dev-rs/t", "rs"),
        ("sites/paris/dev-ns/t", "no_site"),
        ("sites/${claims.site}/dev-ns/t", "no_site"),
        ("sites/paris/dev-sl/dev-sl/t", "slash_site"),
        ("ops/restart", "rs"),
    ];
    for (topic, name) in denied {
        let (status, body) = publish(&gateway, topic, token(&tokens, name), Carried::Bearer);
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("topic_denied")),
            "{name} on {topic}: {body}"
        );
    }

    // Each bad token refused with its reason.
    for (name, code) in [
        ("wrong_issuer", "token_wrong_issuer"),
        ("wrong_audience", "token_wrong_audience"),
        ("expired", "token_expired"),
        ("not_yet", "token_not_yet_valid"),
        ("unknown_key", "token_unknown_key"),
        ("no_subject", "token_missing_claim"),
    ] {
        let (status, body) = publish(
            &gateway,
            "sites/paris/dev-rs/t",
            token(&tokens, name),
            Carried::Bearer,
        );
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some(code)),
            "{name}: {body}"
        );
    }

    // MQTT: the password; the user name's query, as IoT Core's custom authorizers take
    // it (no password); the MQTT-over-WebSocket URL's query. Then a refused one.
    let mqtt = |url: &str,
                client_id: &str,
                username: Option<&str>,
                password: Option<&str>,
                topic: &str| {
        let mut spec = json!({
            "url": url, "version": 5, "client_id": client_id,
            "publishes": [{"topic": topic, "payload": client_id, "qos": 1}],
        });
        if let Some(username) = username {
            spec["username"] = username.into();
        }
        if let Some(password) = password {
            spec["password"] = password.into();
        }
        paho(spec)
    };
    let by_password = mqtt(
        &gateway.mqtt,
        "dev-rs",
        Some("dev-rs"),
        Some(token(&tokens, "rs")),
        "sites/paris/dev-rs/mqtt",
    );
    assert_eq!(by_password["results"][0]["reason"], 0, "{by_password}");
    let user_name = format!(
        "dev-es?x-amz-customauthorizer-name=fleet-idp&token={}",
        token(&tokens, "es")
    );
    let by_user_name = mqtt(
        &gateway.mqtt,
        "dev-es",
        Some(&user_name),
        None,
        "sites/lyon/dev-es/mqtt",
    );
    assert_eq!(by_user_name["results"][0]["reason"], 0, "{by_user_name}");
    let ws = format!("{}?token={}", ws_url(&gateway), token(&tokens, "ed"));
    let by_url = mqtt(&ws, "dev-ed", None, None, "ops/mqtt");
    assert_eq!(by_url["results"][0]["reason"], 0, "{by_url}");
    let expired = mqtt(
        &gateway.mqtt,
        "dev-rs",
        Some("dev-rs"),
        Some(token(&tokens, "expired")),
        "sites/paris/dev-rs/late",
    );
    assert_eq!(
        expired["connack"], 0x86,
        "bad user name or password: {expired}"
    );

    let stored: Vec<(String, String)> = gateway
        .all_sink_lines()
        .iter()
        .filter(|line| line["topic"].as_str().unwrap().ends_with("/mqtt"))
        .map(|line| {
            (
                line["topic"].as_str().unwrap().to_string(),
                line["device"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut stored = stored;
    stored.sort();
    assert_eq!(
        stored,
        [
            ("ops/mqtt".to_string(), "dev-ed".to_string()),
            ("sites/lyon/dev-es/mqtt".to_string(), "dev-es".to_string()),
            ("sites/paris/dev-rs/mqtt".to_string(), "dev-rs".to_string()),
        ]
    );
}

/// A JWKS URL: read at start (until then the gateway is not ready and tokens are refused
/// with `token_keys_unavailable`), and read again when a token names a key the gateway
/// does not have yet, so a provider's new key works without a reload.
#[test]
fn a_jwks_url_is_read_at_start_and_again_for_a_new_key() {
    let idp = Idp::new(&[("rsa-1", "RS256")], &[]);
    let tokens =
        idp.mint(json!({"first": {"kid": "rsa-1", "claims": {"sub": "dev-1", "site": "s1"}}}));

    // Nobody answers at the URL: not ready, and tokens wait for the keys.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let unready = gateway(&format!(
        "jwks_url = \"http://127.0.0.1:{closed_port}/jwks.json\""
    ));
    let readyz: Value = reqwest::blocking::get(format!("{}/readyz", unready.url))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(readyz["ready"], false, "{readyz}");
    assert!(
        readyz["reasons"].to_string().contains("auth.jwt"),
        "{readyz}"
    );
    let (status, body) = publish(
        &unready,
        "sites/s1/dev-1/t",
        token(&tokens, "first"),
        Carried::Bearer,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_keys_unavailable")),
        "{body}"
    );
    drop(unready);

    let (served, port) = idp.serve();
    let reads = || -> u64 {
        let answer: Value = reqwest::blocking::get(format!("http://127.0.0.1:{port}/_requests"))
            .unwrap()
            .json()
            .unwrap();
        answer["count"].as_u64().unwrap()
    };
    let gateway = gateway(&format!("jwks_url = \"http://127.0.0.1:{port}/jwks.json\""));
    eventually(Duration::from_secs(20), "the keys read", || {
        let readyz: Value = reqwest::blocking::get(format!("{}/readyz", gateway.url))
            .ok()?
            .json()
            .ok()?;
        (readyz["ready"] == true).then_some(())
    });
    let reply = publish(
        &gateway,
        "sites/s1/dev-1/t",
        token(&tokens, "first"),
        Carried::Bearer,
    );
    assert_eq!(stored_device(&gateway, &reply), "dev-1");
    assert_eq!(reads(), 1);

    // The provider adds a key and signs with it: the gateway reads the keys again.
    idp.publish(&[("rsa-1", "RS256"), ("rsa-2", "RS256")], &[]);
    let rotated =
        idp.mint(json!({"second": {"kid": "rsa-2", "claims": {"sub": "dev-2", "site": "s2"}}}));
    let reply = eventually(Duration::from_secs(30), "the new key known", || {
        let reply = publish(
            &gateway,
            "sites/s2/dev-2/t",
            token(&rotated, "second"),
            Carried::Bearer,
        );
        if reply.0 != 200 {
            assert_eq!(reply.1["code"], "token_unknown_key", "{}", reply.1);
        }
        (reply.0 == 200).then_some(reply)
    });
    assert_eq!(stored_device(&gateway, &reply), "dev-2");
    assert_eq!(
        reads(),
        2,
        "one read for the new key, however many tokens named it"
    );

    // The provider becomes unreachable, and a reload changes `[auth]`: the new verifier
    // starts with the keys read before, so tokens keep working.
    drop(served);
    let file = gateway.dir.path().join("sluice.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("refresh_secs = 3600", "refresh_secs = 1800"),
    )
    .unwrap();
    let reloaded = gateway.admin_post("/admin/reload", "");
    assert_eq!(reloaded.status, 200, "{:?}", reloaded.body);
    assert!(
        reloaded.body.to_string().contains("auth"),
        "{:?}",
        reloaded.body
    );
    let reply = publish(
        &gateway,
        "sites/s2/dev-2/t",
        token(&rotated, "second"),
        Carried::Bearer,
    );
    assert_eq!(stored_device(&gateway, &reply), "dev-2");
}
