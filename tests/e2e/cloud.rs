//! The cloud sinks against real servers started by `scripts/test-env` (through
//! `scripts/test`): moto for Kinesis and the IoT data plane, mosquitto with TLS and
//! client certificates for MQTT. Every delivery is read back from the server.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use md5::{Digest, Md5};
use serde_json::{Value, json};

use crate::harness::{Gateway, eventually};
use crate::net::Proxy;

/// The servers' fault queue and recordings are shared: cloud tests run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// What `scripts/test-env` started.
pub struct TestEnv {
    aws: String,
    mqtt_port: u16,
    certs: PathBuf,
    dir: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl TestEnv {
    pub fn get() -> TestEnv {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests with scripts/test, which starts the test servers")
            })
        };
        let env = TestEnv {
            aws: var("SLUICE_TEST_AWS_ENDPOINT"),
            mqtt_port: var("SLUICE_TEST_MQTT_PORT").parse().unwrap(),
            certs: PathBuf::from(var("SLUICE_TEST_CERTS")),
            dir: PathBuf::from(var("SLUICE_TEST_ENV_DIR")),
            _serial: serial,
        };
        let client = reqwest::blocking::Client::new();
        client
            .delete(format!("{}/_sluice/faults", env.aws))
            .send()
            .unwrap();
        client
            .delete(format!("{}/_sluice/stats", env.aws))
            .send()
            .unwrap();
        client
            .delete(format!("{}/_sluice/hold", env.aws))
            .send()
            .unwrap();
        env
    }

    /// Pauses Kinesis: every `PutRecords` call waits, unanswered, until
    /// [`TestEnv::release_kinesis`].
    pub fn hold_kinesis(&self) {
        self.control(reqwest::Method::POST, "hold", None);
    }

    pub fn release_kinesis(&self) {
        self.control(reqwest::Method::DELETE, "hold", None);
    }

    /// `PutRecords` calls waiting in the hold now.
    pub fn kinesis_calls_held(&self) -> u64 {
        self.control(reqwest::Method::GET, "hold", None)["waiting"]
            .as_u64()
            .unwrap()
    }

    /// A gateway whose Kinesis stream exists but whose every `PutRecords` is throttled
    /// until the faults are cleared; its deliveries time out after `delivery_timeout_ms`.
    fn gateway_with_refusing_kinesis(
        &self,
        prefix: &str,
        delivery_timeout_ms: u64,
    ) -> (Gateway, String) {
        let stream = unique(prefix);
        self.create_stream(&stream, 1);
        self.control(
            reqwest::Method::POST,
            "faults",
            Some(json!({"put_records": [{"kind": "throttle", "times": 1000}]})),
        );
        let config = self.kinesis_config(&stream, "").replace(
            "delivery_timeout_ms = 20000",
            &format!("delivery_timeout_ms = {delivery_timeout_ms}"),
        );
        (Gateway::start(&config), stream)
    }

    /// The moto server's address.
    pub fn aws_endpoint(&self) -> String {
        self.aws.clone()
    }

    pub fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let client = reqwest::blocking::Client::new();
        let mut request = client.request(method, format!("{}/_sluice/{path}", self.aws));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().unwrap_or(Value::Null)
    }

    pub fn kinesis_config(&self, stream: &str, extra: &str) -> String {
        format!(
            r#"
            [aws]
            region = "us-east-1"
            endpoint_url = "{}"
            [sinks.kinesis]
            linger_ms = 5
            delivery_timeout_ms = 20000
            [routing]
            default_destination = "kinesis"
            kinesis_stream = "{stream}"
            {extra}
            "#,
            self.aws
        )
    }

    /// `[upstream]` for the test broker, with command and reply topics of their own
    /// under `run` (for devices that cannot subscribe), sessions kept `expiry_secs`.
    pub fn commands_config(&self, run: &str, expiry_secs: u32) -> String {
        format!(
            r#"{}
            command_topics = ["cmd/{run}/${{device.id}}/#"]
            reply_topic = "cmd-reply/{run}/${{device.id}}"
            session_expiry_secs = {expiry_secs}
            "#,
            self.upstream_config_via(self.mqtt_port)
        )
    }

    /// What a paho client needs to reach the broker directly (mutual TLS, as the test
    /// subscriber): its URL and TLS files.
    pub fn paho_direct(&self) -> (String, Value) {
        let file = |name: &str| self.certs.join(name).display().to_string();
        (
            format!("mqtts://localhost:{}", self.mqtt_port),
            serde_json::json!({
                "ca": file("ca.pem"),
                "cert": file("test-subscriber.pem"),
                "key": file("test-subscriber.key"),
            }),
        )
    }

    pub fn mqtt_config(&self) -> String {
        self.mqtt_config_via(self.mqtt_port)
    }

    /// `[upstream]`: the devices' own sessions at the broker, reached through `port`
    /// (the broker's, or a proxy's), as the gateway's certificate.
    pub fn upstream_config_via(&self, port: u16) -> String {
        let certs = self.certs.display();
        format!(
            r#"
            [upstream]
            host = "localhost"
            port = {port}
            ca = "{certs}/ca.pem"
            cert = "{certs}/sluice-gateway.pem"
            key = "{certs}/sluice-gateway.key"
            answer_timeout_ms = 3000
            "#
        )
    }

    /// The MQTT sink's configuration, connecting to the broker through `port` (a proxy).
    pub fn mqtt_config_via(&self, port: u16) -> String {
        let certs = self.certs.display();
        format!(
            r#"
            [sinks.iot_core]
            transport = "mqtt"
            delivery_timeout_ms = 20000
            [sinks.iot_core.mqtt]
            host = "localhost"
            port = {}
            client_id = "{}"
            ca = "{certs}/ca.pem"
            cert = "{certs}/sluice-gateway.pem"
            key = "{certs}/sluice-gateway.key"
            keep_alive_secs = 5
            "#,
            port,
            // One per gateway: two gateways with one client id would take the broker's
            // connection from each other.
            unique("sluice-gateway")
        )
    }

    /// The MQTT sink's configuration with the client id left at its default, which
    /// names the instance: for several gateways from one configuration.
    pub fn mqtt_config_per_instance(&self) -> String {
        self.mqtt_config()
            .lines()
            .filter(|line| !line.trim_start().starts_with("client_id"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The broker's address, for a proxy in front of it.
    /// scripts/test-env's directory (its servers' configurations, certificates, logs).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn mqtt_address(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.mqtt_port).into()
    }

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn kinesis(&self) -> aws_sdk_kinesis::Client {
        kinesis_client(&self.aws)
    }

    /// Creates a stream with `shards` shards.
    pub fn create_stream(&self, name: &str, shards: i32) {
        let client = self.kinesis();
        Self::runtime().block_on(async {
            client
                .create_stream()
                .stream_name(name)
                .shard_count(shards)
                .send()
                .await
                .unwrap();
        });
    }

    /// Every record in the stream, by shard: (shard id, partition key, data).
    pub fn read_stream(&self, name: &str) -> Vec<(String, String, Vec<u8>)> {
        self.read_stream_raw(name)
            .into_iter()
            .map(|(shard, key, _, data)| (shard, key, data))
            .collect()
    }

    /// Every record: (shard id, partition key, sequence number, data).
    fn read_stream_raw(&self, name: &str) -> Vec<(String, String, String, Vec<u8>)> {
        read_records(&self.kinesis(), name)
    }

    /// The shard a partition key belongs to, from the stream's hash ranges.
    fn shard_for(&self, name: &str, key: &str) -> String {
        let client = self.kinesis();
        let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
        Self::runtime().block_on(async {
            let shards = client.list_shards().stream_name(name).send().await.unwrap();
            shards
                .shards()
                .iter()
                .find(|shard| {
                    let range = shard.hash_key_range().unwrap();
                    let start: u128 = range.starting_hash_key().parse().unwrap();
                    let end: u128 = range.ending_hash_key().parse().unwrap();
                    (start..=end).contains(&hash)
                })
                .unwrap()
                .shard_id()
                .to_string()
        })
    }
}

/// Every record in a stream, shard by shard: (shard id, partition key, sequence number,
/// data).
pub fn read_records(
    client: &aws_sdk_kinesis::Client,
    name: &str,
) -> Vec<(String, String, String, Vec<u8>)> {
    TestEnv::runtime().block_on(async {
        let shards = client.list_shards().stream_name(name).send().await.unwrap();
        let mut records = Vec::new();
        for shard in shards.shards() {
            let iterator = client
                .get_shard_iterator()
                .stream_name(name)
                .shard_id(shard.shard_id())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .unwrap();
            let mut next = iterator.shard_iterator().map(str::to_string);
            while let Some(iterator) = next.take() {
                let page = client
                    .get_records()
                    .shard_iterator(iterator)
                    .send()
                    .await
                    .unwrap();
                if page.records().is_empty() {
                    break;
                }
                for record in page.records() {
                    records.push((
                        shard.shard_id().to_string(),
                        record.partition_key().unwrap_or_default().to_string(),
                        record.sequence_number().to_string(),
                        record.data().as_ref().to_vec(),
                    ));
                }
                next = page.next_shard_iterator().map(str::to_string);
            }
        }
        records
    })
}

/// A Kinesis client for the endpoint (credentials from the test environment).
pub fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    let aws = sluice_gateway::config::AwsConfig {
        region: Some("us-east-1".to_string()),
        endpoint_url: Some(endpoint.to_string()),
    };
    let config = TestEnv::runtime().block_on(sluice_gateway::aws_sdk_config(&aws));
    aws_sdk_kinesis::Client::new(&config)
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )
}

#[test]
fn messages_are_read_back_from_the_right_kinesis_shard() {
    let env = TestEnv::get();
    let stream = unique("telemetry");
    env.create_stream(&stream, 4);
    let gateway = Gateway::start(&env.kinesis_config(&stream, ""));
    let mut sent = BTreeMap::new();
    for n in 0..40 {
        let device = format!("device-{}", n % 8);
        let payload = format!(r#"{{"n":{n},"device":"{device}"}}"#);
        let reply = gateway.publish("sites/1/temp", &device, payload.clone());
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body["routes"][0]["destination"]["type"], "kinesis");
        sent.insert(payload, device);
    }
    gateway.settle();
    let stored = env.read_stream(&stream);
    assert_eq!(stored.len(), sent.len(), "every message once, none dropped");
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for (shard, key, data) in &stored {
        let payload = String::from_utf8(data.clone()).unwrap();
        let device = sent.get(&payload).expect("a payload we sent, intact");
        assert_eq!(key, device, "partition key: the device id");
        assert_eq!(
            *shard,
            env.shard_for(&stream, key),
            "the shard the key's MD5 selects"
        );
        let n = serde_json::from_str::<Value>(&payload).unwrap()["n"]
            .as_u64()
            .unwrap();
        order.entry(key.clone()).or_default().push(n);
    }
    for (device, ns) in order {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{device}: in order {ns:?}"
        );
    }
}

#[test]
fn kinesis_faults_are_retried_until_every_record_arrives() {
    let env = TestEnv::get();
    let stream = unique("faulty");
    env.create_stream(&stream, 2);
    env.control(
        reqwest::Method::POST,
        "faults",
        Some(json!({"put_records": [
            {"kind": "throttle", "times": 2},
            {"kind": "partial", "times": 2, "fail_every": 2},
            {"kind": "error500", "times": 1}
        ]})),
    );
    let gateway = Gateway::start(&env.kinesis_config(&stream, ""));
    let messages: Vec<Value> = (0..30)
        .map(|n| json!({"topic": "t", "payload": {"n": n}, "attributes": {"k": "v"}}))
        .collect();
    let batch = serde_json::to_vec(&json!({"messages": messages})).unwrap();
    // Different devices, so one call carries many records and partial failures bite.
    let replies: Vec<_> = (0..3)
        .map(|d| gateway.post("/batch", &format!("dev-{d}"), batch.clone(), None))
        .collect();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert!(
            reply.body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["status"] == "accepted")
        );
    }
    gateway.settle();
    let faults = env.control(reqwest::Method::GET, "faults", None);
    assert_eq!(
        faults["put_records"],
        json!([]),
        "every injected fault was met"
    );
    let stored = env.read_stream(&stream);
    let mut count: HashMap<(String, u64), usize> = HashMap::new();
    for (_, key, data) in stored {
        let n = serde_json::from_slice::<Value>(&data).unwrap()["n"]
            .as_u64()
            .unwrap();
        *count.entry((key, n)).or_default() += 1;
    }
    assert_eq!(count.len(), 90, "every message arrived");
    assert!(count.values().all(|&c| c == 1), "no duplicates: {count:?}");
    let stats = env.control(reqwest::Method::GET, "stats", None);
    assert!(
        stats["put_records_calls"].as_u64().unwrap() >= 6,
        "retried: {stats}"
    );
    // The gateway's metrics saw the same: throttled calls, records sent again, calls.
    let metrics = gateway.admin_text("/metrics");
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(value("sluice_sink_throttles_total{sink=\"kinesis\"}") >= 2.0);
    assert!(value("sluice_sink_retries_total{sink=\"kinesis\"}") >= 4.0);
    assert!(value("sluice_sink_call_records_count{sink=\"kinesis\"}") >= 6.0);
    assert!(value("sluice_sink_window_records_count{sink=\"kinesis\"}") >= 1.0);
}

#[test]
fn order_per_partition_key_holds_while_kinesis_throttles_and_fails_records() {
    let env = TestEnv::get();
    let stream = unique("ordered");
    env.create_stream(&stream, 2);
    env.control(
        reqwest::Method::POST,
        "faults",
        Some(json!({"put_records": [
            {"kind": "partial", "times": 3, "fail_every": 2},
            {"kind": "throttle", "times": 2},
            {"kind": "partial", "times": 3, "fail_every": 3},
            {"kind": "error500", "times": 1},
            {"kind": "partial", "times": 4, "fail_every": 2}
        ]})),
    );
    let gateway = std::sync::Arc::new(Gateway::start(&env.kinesis_config(&stream, "")));
    // 8 devices (partition keys) at once, each sending 5 batches of 10 in order.
    let devices = 8;
    let per_device = 50u64;
    let senders: Vec<_> = (0..devices)
        .map(|d| {
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                for batch in 0..per_device / 10 {
                    let messages: Vec<Value> = (0..10)
                        .map(|i| json!({"topic": "t", "payload": {"d": d, "n": batch * 10 + i}}))
                        .collect();
                    let body = serde_json::to_vec(&json!({"messages": messages})).unwrap();
                    let reply = gateway.post("/batch", &format!("key-{d}"), body, None);
                    assert_eq!(reply.status, 200, "{:?}", reply.body);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    gateway.settle();
    let faults = env.control(reqwest::Method::GET, "faults", None);
    assert_eq!(
        faults["put_records"],
        json!([]),
        "every injected fault was met"
    );

    // Records of one key are on one shard, in the order of their sequence numbers.
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, key, _, data) in env.read_stream_raw(&stream) {
        let n = serde_json::from_slice::<Value>(&data).unwrap()["n"]
            .as_u64()
            .unwrap();
        by_key.entry(key).or_default().push(n);
    }
    assert_eq!(by_key.len(), devices, "{by_key:?}");
    for (key, ns) in &by_key {
        // At least once: a record may come twice, but a message's first arrival never
        // comes before an earlier message's.
        let mut first = Vec::new();
        for n in ns {
            if !first.contains(n) {
                first.push(*n);
            }
        }
        assert_eq!(
            first,
            (0..per_device).collect::<Vec<_>>(),
            "{key}: in order and complete: {ns:?}"
        );
    }
    let metrics = gateway.admin_text("/metrics");
    let retries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_sink_retries_total{sink=\"kinesis\"}"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(retries >= 10.0, "records were retried: {retries}");
}

#[test]
fn a_missing_stream_dead_letters_with_the_error() {
    let env = TestEnv::get();
    let gateway = Gateway::start(&env.kinesis_config(&unique("absent"), ""));
    let reply = gateway.publish("t", "dev-1", "{}");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "accepted", "spooled first");
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["id"], reply.body["id"]);
    assert_eq!(
        letter["origin"],
        json!({"stage": "sink", "sink": "kinesis"})
    );
    assert_eq!(
        letter["destination"]["type"], "kinesis",
        "kept for a redrive"
    );
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("ResourceNotFound"),
        "{letter}"
    );
}

/// An MQTT subscriber with the test-subscriber certificate, collecting messages.
pub struct Subscriber {
    received: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    client: rumqttc::AsyncClient,
    runtime: tokio::runtime::Runtime,
}

impl Subscriber {
    pub fn connect(env: &TestEnv, filter: &str) -> Subscriber {
        Subscriber::connect_to(env, env.mqtt_port, filter)
    }

    /// As the test client, to the broker on `port` (one with the test environment's
    /// certificates), subscribed to `filter`; retries until the broker answers.
    pub fn connect_to(env: &TestEnv, port: u16, filter: &str) -> Subscriber {
        let runtime = TestEnv::runtime();
        let tls = sluice_gateway::tls::client_config(
            &env.certs.join("ca.pem"),
            &env.certs.join("test-subscriber.pem"),
            &env.certs.join("test-subscriber.key"),
        )
        .unwrap();
        let mut options = rumqttc::MqttOptions::new(unique("subscriber"), "localhost", port);
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut events) =
            runtime.block_on(async { rumqttc::AsyncClient::new(options, 100) });
        let (deliver, received) = std::sync::mpsc::channel();
        let (subscribed, ready) = std::sync::mpsc::channel();
        let filter = filter.to_string();
        let publisher = client.clone();
        runtime.spawn(async move {
            client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            let _keep = client;
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        let _ = deliver.send((publish.topic.clone(), publish.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("subscribed");
        Subscriber {
            received,
            client: publisher,
            runtime,
        }
    }

    /// Publishes with QoS 1 as the test client (which may write `cmd/#`).
    pub fn publish(&self, topic: &str, payload: &str) {
        self.runtime
            .block_on(self.client.publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.to_string(),
            ))
            .unwrap();
    }

    /// Publishes a retained message with QoS 1, and waits until the broker has it (this
    /// subscriber's own filter must match it: it comes back).
    pub fn publish_retained(&self, topic: &str, payload: &str) {
        self.runtime
            .block_on(self.client.publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                true,
                payload.to_string(),
            ))
            .unwrap();
        let (got, _) = self.take(1).pop().unwrap();
        assert_eq!(got, topic);
    }

    /// Publishes `payload` bytes with QoS 1.
    pub fn publish_bytes(&self, topic: &str, payload: Vec<u8>) {
        self.runtime
            .block_on(
                self.client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload),
            )
            .unwrap();
    }

    pub fn take(&self, count: usize) -> Vec<(String, Vec<u8>)> {
        (0..count)
            .map(|_| {
                self.received
                    .recv_timeout(Duration::from_secs(20))
                    .expect("a message from the broker")
            })
            .collect()
    }
}

#[test]
fn mqtt_publishes_reach_a_subscriber_through_mosquitto() {
    let env = TestEnv::get();
    let topic = unique("fleet");
    let subscriber = Subscriber::connect(&env, &format!("{topic}/#"));
    let gateway = Gateway::start(&env.mqtt_config());
    for n in 0..5 {
        let reply = gateway.publish(
            &format!("{topic}/temp?qos=1"),
            "dev-1",
            format!(r#"{{"n":{n}}}"#),
        );
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let got = subscriber.take(5);
    let payloads: Vec<String> = got
        .iter()
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        (0..5)
            .map(|n| format!(r#"{{"n":{n}}}"#))
            .collect::<Vec<_>>()
    );
    assert!(got.iter().all(|(t, _)| *t == format!("{topic}/temp")));
}

/// Two instances started from one configuration (the sink's client id left at its
/// default) each keep their own connection at the broker for a minute (twelve of its
/// 5-second keep-alives): neither takes the other's over, so each made exactly one, and
/// each delivers throughout.
#[test]
fn two_instances_from_one_configuration_keep_their_own_broker_connections() {
    let env = TestEnv::get();
    let topic = unique("instances");
    let subscriber = Subscriber::connect(&env, &format!("{topic}/#"));
    let config = env.mqtt_config_per_instance();
    let gateways = [Gateway::start(&config), Gateway::start(&config)];
    let connections = r#"sluice_sink_connections_total{sink="iot-core"}"#;
    let started = std::time::Instant::now();
    for round in 0..7u64 {
        // Time passing is what is tested: a round every 10 s, for a minute.
        let due = started + Duration::from_secs(10 * round);
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        for (n, gateway) in gateways.iter().enumerate() {
            let reply = gateway.publish(&format!("{topic}/{n}?qos=1"), "dev-1", format!("{round}"));
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
        // Both delivered this round: each instance's connection was up for it.
        let mut got: Vec<String> = subscriber
            .take(2)
            .into_iter()
            .map(|(topic, payload)| format!("{topic} {}", String::from_utf8(payload).unwrap()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [format!("{topic}/0 {round}"), format!("{topic}/1 {round}")]
        );
    }
    for gateway in &gateways {
        assert_eq!(
            gateway.metric(connections),
            1.0,
            "connected once, never taken over"
        );
    }
}

/// A publish the broker refuses for good (the gateway's certificate may not write the
/// topic: MQTT 5 PUBACK 0x87) becomes a dead letter with the broker's answer, and the
/// sink goes on: the next message arrives. (Over MQTT 3.1.1 the broker acknowledged such
/// a publish and dropped it, and the sink counted it delivered.)
#[test]
fn a_publish_the_broker_refuses_is_dead_lettered_and_the_next_is_delivered() {
    let env = TestEnv::get();
    let topic = unique("refused");
    let subscriber = Subscriber::connect(&env, &format!("{topic}/#"));
    let gateway = Gateway::start(&format!(
        "{}\n[[routing.rules]]\nname = \"denied\"\ntopic = \"denied/#\"\ndestination = \"iot-core\"\niot_topic = \"$denied/${{device.id}}\"\nqos = 1\n",
        env.mqtt_config()
    ));
    let refused = gateway.publish("denied/x?qos=1", "dev-1", "not for the broker");
    assert_eq!(refused.status, 200, "{:?}", refused.body);
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], refused.body["id"]);
    assert_eq!(
        letters[0]["origin"],
        json!({"stage": "sink", "sink": "iot-core"})
    );
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("NotAuthorized"), "{reason}");
    let reply = gateway.publish(&format!("{topic}/next?qos=1"), "dev-1", "after");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = subscriber.take(1);
    assert_eq!(got[0].1, b"after");
}

/// What a device says in MQTT 5 properties over HTTP (IoT Core's publish API's
/// parameters) reaches the broker through the IoT Core sink's own connection: content
/// type, response topic, correlation data and user properties.
#[test]
fn mqtt_sink_publishes_carry_the_mqtt5_properties() {
    let env = TestEnv::get();
    let topic = unique("props-sink");
    let (url, tls) = env.paho_direct();
    let watcher = crate::mqtt_sessions::PahoSession::start(json!({
        "url": url, "tls": tls, "version": 5, "client_id": unique("watcher"),
        "subscribe": [[format!("{topic}/#"), 1]], "expect": 1, "timeout": 30,
    }));
    assert_eq!(watcher.next("suback")["granted"], json!([1]));
    let gateway = Gateway::start(&env.mqtt_config());
    // As query values: base64 with `+`, `/` and `=` escaped.
    let escaped = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    };
    let query = format!(
        "qos=1&contentType=application%2Fjson&responseTopic=replies%2F7&correlationData={}&userProperties={}",
        escaped(b"req-7"),
        escaped(br#"[{"site":"north"}]"#)
    );
    let reply = gateway.publish(&format!("{topic}/t?{query}"), "dev-1", "{}");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let message = watcher.next("message");
    assert_eq!(message["topic"], format!("{topic}/t"));
    let properties = &message["properties"];
    assert_eq!(properties["content_type"], "application/json", "{message}");
    assert_eq!(properties["response_topic"], "replies/7", "{message}");
    assert_eq!(properties["correlation_data"], "req-7", "{message}");
    assert_eq!(
        properties["user_properties"],
        json!([["site", "north"]]),
        "{message}"
    );
}

#[test]
fn basic_ingest_publishes_to_the_rules_topic() {
    let env = TestEnv::get();
    let topic = unique("ingest");
    let subscriber = Subscriber::connect(&env, &format!("$aws/rules/fleet_rule/{topic}/#"));
    let config = env.mqtt_config().replace(
        "delivery_timeout_ms = 20000",
        "delivery_timeout_ms = 20000\n            basic_ingest_rule = \"fleet_rule\"",
    );
    let gateway = Gateway::start(&config);
    let reply = gateway.publish(&format!("{topic}/temp?qos=1"), "dev-1", "cheap");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = subscriber.take(1);
    assert_eq!(got[0].0, format!("$aws/rules/fleet_rule/{topic}/temp"));
    assert_eq!(got[0].1, b"cheap");
}

#[test]
fn mqtt_publishes_made_during_an_outage_are_delivered_after_it() {
    let env = TestEnv::get();
    let topic = unique("outage");
    // The gateway reaches the broker through a proxy the test can cut; the subscriber
    // connects directly, so it can be listening before the gateway is let back in.
    let proxy = Proxy::start(env.mqtt_address());
    let config = env
        .mqtt_config_via(proxy.port)
        .replace("delivery_timeout_ms = 20000", "delivery_timeout_ms = 2000");
    let gateway = Gateway::start(&config);
    let subscriber = Subscriber::connect(&env, &format!("{topic}/#"));
    assert_eq!(
        gateway
            .publish(&format!("{topic}/a?qos=1"), "d", "before")
            .status,
        200
    );
    assert_eq!(subscriber.take(1)[0].1, b"before");
    gateway.settle();
    drop(subscriber);

    // The outage: the gateway's connection is cut and it cannot connect again; the
    // broker restarts meanwhile, so the gateway's session there is gone too.
    proxy.cut();
    let status =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/test-env"))
            .arg("restart-mqtt")
            .arg(&env.dir)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
    assert!(status.success());
    let during: Vec<String> = (0..3).map(|n| format!("during-{n}")).collect();
    for payload in &during {
        let reply = gateway.publish(&format!("{topic}/b?qos=1"), "d", payload.clone());
        assert_eq!(
            reply.status, 200,
            "accepted during the outage: {:?}",
            reply.body
        );
    }
    // Not delivered while the link is down: a delivery window fails (no PUBACK within
    // its 2 s), and the records stay spooled.
    eventually(Duration::from_secs(30), "a failed delivery window", || {
        let metrics = gateway.admin_text("/metrics");
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("sluice_sink_failures_total{sink=\"iot-core\"}"))
            .any(|v| v.trim().parse::<f64>().unwrap_or(0.0) >= 1.0)
            .then_some(())
    });
    assert_eq!(gateway.spooled(), 3, "kept while the broker is unreachable");

    let subscriber = Subscriber::connect(&env, &format!("{topic}/#"));
    proxy.restore();
    let got: Vec<Vec<u8>> = subscriber.take(3).into_iter().map(|(_, p)| p).collect();
    let expected: Vec<Vec<u8>> = during.iter().map(|p| p.as_bytes().to_vec()).collect();
    assert_eq!(got, expected, "every publish of the outage, in order");
    gateway.settle();
    assert_eq!(gateway.spooled(), 0);
}

/// A publish's MQTT 5 properties (from IoT Core's HTTPS API parameters here) reach IoT
/// Core's HTTPS `Publish` as its parameters: the content type, response topic and
/// message expiry as query parameters, the correlation data, payload format and user
/// properties as its `x-amz-mqtt5-*` headers.
#[test]
fn https_publishes_carry_the_mqtt5_properties() {
    use base64::Engine as _;
    let env = TestEnv::get();
    let topic = unique("props");
    let gateway = Gateway::start(&format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n[sinks.iot_core]\ntransport = \"https\"\n",
        env.aws
    ));
    let base64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    // As a query value: `+`, `/` and `=` escaped.
    let escaped = |text: String| {
        text.replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    };
    let users = r#"[{"site":"north"},{"rev":"3"}]"#;
    let query = format!(
        "qos=1&contentType=application%2Fjson&responseTopic=answers%2Fx&messageExpiry=90\
         &correlationData={}&payloadFormatIndicator=UTF8_DATA&userProperties={}",
        escaped(base64("req-7")),
        escaped(base64(users))
    );
    let reply = gateway.publish(&format!("{topic}/x?{query}"), "dev-p", r#"{"p":1}"#);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    gateway.settle();
    let published = env.control(reqwest::Method::GET, "published", None);
    let mine = published
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["topic"] == format!("{topic}/x"))
        .unwrap_or_else(|| panic!("{published}"))
        .clone();
    assert_eq!(mine["query"]["contentType"], "application/json", "{mine}");
    assert_eq!(mine["query"]["responseTopic"], "answers/x", "{mine}");
    assert_eq!(mine["query"]["messageExpiry"], "90", "{mine}");
    let headers = &mine["mqtt5_headers"];
    assert_eq!(
        headers["x-amz-mqtt5-correlation-data"],
        base64("req-7"),
        "{mine}"
    );
    assert_eq!(
        headers["x-amz-mqtt5-payload-format-indicator"], "UTF8_DATA",
        "{mine}"
    );
    assert_eq!(
        headers["x-amz-mqtt5-user-properties"],
        base64(users),
        "{mine}"
    );
}

#[test]
fn https_publishes_are_recorded_by_the_iot_data_plane() {
    let env = TestEnv::get();
    let topic = unique("https");
    let config = format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n[sinks.iot_core]\ntransport = \"https\"\n\
         [[routing.rules]]\nname = \"forced\"\ntopic = \"{topic}/forced\"\ndestination = \"iot-core\"\n",
        env.aws
    );
    let gateway = Gateway::start(&config);
    let reply = gateway.publish(&format!("{topic}/x?qos=1"), "dev-h", r#"{"h":1}"#);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    gateway.settle();
    let published = env.control(reqwest::Method::GET, "published", None);
    let mine: Vec<&Value> = published
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == format!("{topic}/x"))
        .collect();
    assert_eq!(mine.len(), 1, "{published}");
    assert_eq!(mine[0]["qos"], 1);
    assert_eq!(mine[0]["signing_service"], "iotdata");
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(mine[0]["payload_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(payload, br#"{"h":1}"#);

    // At IoT Core's limit exactly (128 KiB) it is published; one byte over, whether by
    // default or by a rule that asks for IoT Core, it never reaches IoT Core.
    env.control(reqwest::Method::DELETE, "published", None);
    let limit = 128 * 1024;
    let at_limit = gateway.publish(&format!("{topic}/limit"), "dev-h", vec![b'x'; limit]);
    assert_eq!(at_limit.status, 200, "{:?}", at_limit.body);
    let over = gateway.publish(&format!("{topic}/big"), "dev-h", vec![b'y'; limit + 1]);
    assert_eq!(over.status, 200, "{:?}", over.body);
    let forced = gateway.publish(&format!("{topic}/forced"), "dev-h", vec![b'z'; 200 * 1024]);
    assert_eq!(forced.status, 200, "{:?}", forced.body);
    gateway.settle();
    let published = env.control(reqwest::Method::GET, "published", None);
    let recorded: Vec<(String, usize)> = published
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(p["payload_b64"].as_str().unwrap())
                .unwrap();
            (p["topic"].as_str().unwrap().to_string(), payload.len())
        })
        .collect();
    assert_eq!(
        recorded,
        [(format!("{topic}/limit"), limit)],
        "only the payload within the limit reached the IoT data plane"
    );
    for (reply, what) in [
        (&over, "over the limit"),
        (&forced, "a rule asked for IoT Core"),
    ] {
        let line = gateway
            .find(reply.body["id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{what}: delivered elsewhere"));
        assert_eq!(line["destination"]["type"], "kinesis", "{what}: {line}");
        assert_eq!(
            line["rule"], "builtin:payload-over-iot-core-limit",
            "{what}: {line}"
        );
    }
}

/// De-aggregates raw Kinesis records with the independent `aws-kinesis-agg` package:
/// (partition key, data, was aggregated).
fn deaggregate_with_kcl_library(
    raw: &[(String, String, String, Vec<u8>)],
) -> Vec<(String, Vec<u8>, bool)> {
    use base64::Engine as _;
    use std::io::Write as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON: run scripts/test");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/servers/deaggregate.py"
    );
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for (_, key, sequence, data) in raw {
        input.push_str(&json!({"partition_key": key, "sequence_number": sequence, "data_b64": b64.encode(data)}).to_string());
        input.push('\n');
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let user: Value = serde_json::from_str(line).unwrap();
            (
                user["partition_key"].as_str().unwrap().to_string(),
                b64.decode(user["data_b64"].as_str().unwrap()).unwrap(),
                user["aggregated"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn aggregated_records_deaggregate_with_the_kcl_library() {
    let env = TestEnv::get();
    let stream = unique("aggregated");
    env.create_stream(&stream, 2);
    let config = env.kinesis_config(&stream, "").replace(
        "linger_ms = 5",
        &format!("linger_ms = 5\n            aggregate_streams = [\"{stream}\"]"),
    );
    let gateway = std::sync::Arc::new(Gateway::start(
        &config.replace("linger_ms = 5", "linger_ms = 50"),
    ));
    // 50 devices, 4 messages each (one batch request per device), 100-byte payloads,
    // sent by 10 concurrent clients.
    let payload = |device: &str, round: usize| {
        let mut payload = format!(r#"{{"d":"{device}","r":{round},"pad":""#).into_bytes();
        payload.resize(98, b'x');
        payload.extend_from_slice(b"\"}");
        payload
    };
    let mut sent: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let clients: Vec<_> = (0..10)
        .map(|client| {
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                for device in (0..50).filter(|d| d % 10 == client) {
                    let device = format!("sensor-{device:03}");
                    use base64::Engine as _;
                    let messages: Vec<Value> = (0..4)
                        .map(|round| json!({"topic": "t", "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload(&device, round))}))
                        .collect();
                    let body = serde_json::to_vec(&json!({"messages": messages})).unwrap();
                    let reply = gateway.post("/batch", &device, body, None);
                    assert_eq!(reply.status, 200, "{:?}", reply.body);
                    assert!(reply.body["results"].as_array().unwrap().iter().all(|r| r["status"] == "accepted"));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    for device in 0..50 {
        let device = format!("sensor-{device:03}");
        let payloads = (0..4).map(|round| payload(&device, round)).collect();
        sent.insert(device, payloads);
    }
    gateway.settle();
    let raw = env.read_stream_raw(&stream);
    let users = deaggregate_with_kcl_library(&raw);
    assert!(
        users.iter().all(|(_, _, aggregated)| *aggregated),
        "every record is a KPL aggregate"
    );
    let mut got: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (key, data, _) in users {
        got.entry(key).or_default().push(data);
    }
    assert_eq!(got, sent, "every user record, intact, in order per device");
    // The gateway's own decoder agrees with the library.
    let own: usize = raw
        .iter()
        .map(|(_, _, _, data)| {
            sluice_gateway::sink::kinesis::aggregate::deaggregate(data)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(own, 200);
    assert!(
        raw.len() <= 50,
        "{} Kinesis records for 200 messages",
        raw.len()
    );
}

/// Sends 4 messages from each of `devices` devices (one batch request per device) from
/// 8 concurrent clients.
fn send_from_devices(gateway: &std::sync::Arc<Gateway>, prefix: &str, devices: usize) {
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let gateway = gateway.clone();
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                for device in (0..devices).filter(|d| d % 8 == client) {
                    let messages: Vec<Value> = (0..4)
                        .map(|n| json!({"topic": "t", "payload": {"d": device, "n": n}}))
                        .collect();
                    let body = serde_json::to_vec(&json!({"messages": messages})).unwrap();
                    let reply = gateway.post("/batch", &format!("{prefix}-{device}"), body, None);
                    assert_eq!(reply.status, 200, "{:?}", reply.body);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

#[test]
fn aggregation_follows_the_shards_after_a_split() {
    // moto keeps writing to a split shard's closed parent; kinesalite routes records to
    // the children as Kinesis does, so this test runs against kinesalite.
    let _env = TestEnv::get();
    let endpoint = std::env::var("SLUICE_TEST_KINESALITE_ENDPOINT").expect("run scripts/test");
    let client = kinesis_client(&endpoint);
    let runtime = TestEnv::runtime();
    let stream = unique("resharded");
    runtime
        .block_on(
            client
                .create_stream()
                .stream_name(&stream)
                .shard_count(1)
                .send(),
        )
        .unwrap();
    let config = format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n[sinks.kinesis]\nlinger_ms = 50\naggregate_streams = [\"{stream}\"]\n[routing]\ndefault_destination = \"kinesis\"\nkinesis_stream = \"{stream}\"\n"
    );
    let gateway = std::sync::Arc::new(Gateway::start(&config));
    send_from_devices(&gateway, "before", 16);
    // Delivered before the split, into the parent.
    gateway.settle();

    let parent = "shardId-000000000000";
    runtime
        .block_on(
            client
                .split_shard()
                .stream_name(&stream)
                .shard_to_split(parent)
                .new_starting_hash_key((1u128 << 127).to_string())
                .send(),
        )
        .unwrap();
    // The first record after the split lands on a child the gateway's map does not know;
    // the gateway notices from the answer and lists the shards again.
    assert_eq!(gateway.publish("t", "probe", "{}").status, 200);
    gateway.settle();
    send_from_devices(&gateway, "after", 16);

    let shards = runtime
        .block_on(client.list_shards().stream_name(&stream).send())
        .unwrap();
    gateway.settle();
    let records = read_records(&client, &stream);
    let mut after_split = 0;
    for shard in shards.shards().iter().filter(|s| s.shard_id() != parent) {
        let range = shard.hash_key_range().unwrap();
        let (start, end): (u128, u128) = (
            range.starting_hash_key().parse().unwrap(),
            range.ending_hash_key().parse().unwrap(),
        );
        for (_, _, _, data) in records.iter().filter(|r| r.0 == shard.shard_id()) {
            let users = sluice_gateway::sink::kinesis::aggregate::deaggregate(data)
                .expect("an aggregated record");
            for (key, _) in users {
                let hash = sluice_gateway::sink::kinesis::aggregate::hash_key(&key);
                assert!(
                    (start..=end).contains(&hash),
                    "{key} aggregated into {} outside its range",
                    shard.shard_id()
                );
                after_split += 1;
            }
        }
    }
    assert_eq!(
        after_split,
        16 * 4 + 1,
        "every message sent after the split, on the child shard its key maps to"
    );
}

#[test]
fn a_sink_that_cannot_confirm_in_time_keeps_the_record_spooled_until_it_can() {
    let env = TestEnv::get();
    let (gateway, stream) = env.gateway_with_refusing_kinesis("throttled", 700);
    let reply = gateway.publish("t", "dev-1", r#"{"late": true}"#);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "accepted");
    eventually(Duration::from_secs(30), "several refused attempts", || {
        let stats = env.control(reqwest::Method::GET, "stats", None);
        (stats["put_records_calls"].as_u64().unwrap() >= 3).then_some(())
    });
    assert_eq!(
        gateway.spooled(),
        1,
        "still spooled while Kinesis refuses it"
    );
    // Not ready once a delivery window has failed (after its 700 ms timeout).
    let reasons = eventually(Duration::from_secs(30), "readiness to turn false", || {
        let readiness = reqwest::blocking::get(format!("{}/readyz", gateway.url)).ok()?;
        (readiness.status() == 503)
            .then(|| readiness.json::<Value>().unwrap()["reasons"].to_string())
    });
    assert!(reasons.contains("kinesis"), "{reasons}");

    // Once Kinesis takes records again, the spooled record goes through.
    env.control(reqwest::Method::DELETE, "faults", None);
    gateway.settle();
    let stored = env.read_stream(&stream);
    assert!(!stored.is_empty(), "delivered");
    let readiness = reqwest::blocking::get(format!("{}/readyz", gateway.url)).unwrap();
    assert_eq!(
        readiness.status(),
        200,
        "ready again once the sink delivers"
    );
    assert!(
        stored
            .iter()
            .all(|(_, _, data)| data == br#"{"late": true}"#)
    );
}

#[test]
fn a_message_whose_expiry_passes_in_the_spool_becomes_a_dead_letter() {
    let env = TestEnv::get();
    let (gateway, stream) = env.gateway_with_refusing_kinesis("expiry", 500);
    let short = gateway.publish("t?messageExpiry=1", "dev-1", r#"{"short": true}"#);
    assert_eq!(short.status, 200, "{:?}", short.body);
    let long = gateway.publish("t?messageExpiry=3600", "dev-1", r#"{"long": true}"#);
    assert_eq!(long.status, 200, "{:?}", long.body);
    // Kinesis refuses everything for well over a second, then recovers.
    eventually(
        Duration::from_secs(30),
        "refused attempts past the expiry",
        || {
            let stats = env.control(reqwest::Method::GET, "stats", None);
            (stats["put_records_calls"].as_u64().unwrap() >= 3).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1200)); // the expiry itself: 1 s of wall time
    env.control(reqwest::Method::DELETE, "faults", None);
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], short.body["id"]);
    assert_eq!(letters[0]["origin"]["stage"], "expired");
    let stored = env.read_stream(&stream);
    assert_eq!(stored.len(), 1, "only the unexpired message arrives");
    assert_eq!(stored[0].2, br#"{"long": true}"#);
}

/// Every dead letter, page by page at `limit` per page: (keys of each page, letters).
fn dead_letter_pages(gateway: &Gateway, limit: usize) -> (Vec<Vec<u64>>, Vec<Value>) {
    gateway.settle();
    let mut pages = Vec::new();
    let mut letters = Vec::new();
    let mut from = 0u64;
    loop {
        let page = gateway.admin_get(&format!("/admin/dlq?from={from}&limit={limit}"));
        let items = page["dead_letters"].as_array().unwrap().clone();
        assert!(items.len() <= limit, "{page}");
        pages.push(items.iter().map(|l| l["key"].as_u64().unwrap()).collect());
        letters.extend(items);
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    (pages, letters)
}

#[test]
fn rule_and_sink_dead_letters_are_listed_by_page_discarded_and_redriven_to_kinesis() {
    let env = TestEnv::get();
    let stream = unique("redrive");
    let absent = unique("absent");
    env.create_stream(&stream, 1);
    let rules = format!(
        "[[routing.rules]]\nname = \"trash\"\ntopic = \"bad/#\"\ndestination = \"dead-letter\"\n\
         [[routing.rules]]\nname = \"lost\"\ntopic = \"lost/#\"\ndestination = \"kinesis\"\nstream = \"{absent}\"\n"
    );
    let gateway = Gateway::start(&env.kinesis_config(&stream, &rules));
    let mut ids = HashMap::new();
    for n in 0..5 {
        let reply = gateway.publish(&format!("bad/{n}"), "dev-d", format!(r#"{{"bad":{n}}}"#));
        assert_eq!(reply.body["status"], "dead-lettered", "{:?}", reply.body);
        ids.insert(
            reply.body["id"].as_str().unwrap().to_string(),
            format!("bad/{n}"),
        );
    }
    for n in 0..2 {
        let reply = gateway.publish(&format!("lost/{n}"), "dev-d", format!(r#"{{"lost":{n}}}"#));
        assert_eq!(
            reply.body["status"], "accepted",
            "spooled first: {:?}",
            reply.body
        );
        ids.insert(
            reply.body["id"].as_str().unwrap().to_string(),
            format!("lost/{n}"),
        );
    }

    // Pages of 3: 3 + 3 + 1, keys ascending and none twice.
    let (pages, letters) = dead_letter_pages(&gateway, 3);
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 1], "{pages:?}");
    let keys: Vec<u64> = pages.concat();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    let origins: Vec<&str> = letters
        .iter()
        .map(|l| l["origin"]["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        origins.iter().filter(|o| **o == "rule").count(),
        5,
        "{origins:?}"
    );
    assert_eq!(
        origins.iter().filter(|o| **o == "sink").count(),
        2,
        "{origins:?}"
    );

    // Discard one rule letter: gone from the list and from `show`.
    let discarded = letters
        .iter()
        .find(|l| l["origin"]["stage"] == "rule")
        .unwrap()
        .clone();
    let key = discarded["key"].as_u64().unwrap();
    let delete = reqwest::blocking::Client::new()
        .delete(format!("{}/admin/dlq/{key}", gateway.admin))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(delete.status().as_u16(), 204);
    let shown = reqwest::blocking::Client::new()
        .get(format!("{}/admin/dlq/{key}", gateway.admin))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(shown.status().as_u16(), 404);
    let (_, left) = dead_letter_pages(&gateway, 1000);
    assert_eq!(left.len(), 6);

    // Fix what sent them there: the rule routes to Kinesis now, the missing stream
    // exists. Then re-drive all: rule letters run through the chain again (to the
    // default stream), sink letters go straight back to their stream.
    env.create_stream(&absent, 1);
    let path = gateway.dir.path().join("sluice.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("destination = \"dead-letter\"", "destination = \"kinesis\""),
    )
    .unwrap();
    let reload = gateway.admin_post("/admin/reload", "");
    assert_eq!(reload.status, 200, "{:?}", reload.body);
    let redrive = gateway.admin_post("/admin/dlq/redrive", json!({"all": true}).to_string());
    assert_eq!(redrive.status, 200, "{:?}", redrive.body);
    assert_eq!(
        redrive.body["redriven"].as_array().map(Vec::len),
        Some(6),
        "{:?}",
        redrive.body
    );
    let (_, after) = dead_letter_pages(&gateway, 1000);
    assert!(after.is_empty(), "{after:?}");

    let discarded_id = discarded["id"].as_str().unwrap();
    let payloads = |name: &str| -> Vec<Value> {
        env.read_stream(name)
            .into_iter()
            .map(|(_, _, data)| serde_json::from_slice(&data).unwrap())
            .collect()
    };
    let mut main = payloads(&stream);
    main.sort_by_key(|v| v["bad"].as_u64());
    let discarded_topic = &ids[discarded_id];
    let expected_bad: Vec<Value> = (0..5)
        .filter(|n| format!("bad/{n}") != *discarded_topic)
        .map(|n| json!({"bad": n}))
        .collect();
    assert_eq!(
        main, expected_bad,
        "the rule letters, but not the discarded one"
    );
    let mut lost = payloads(&absent);
    lost.sort_by_key(|v| v["lost"].as_u64());
    assert_eq!(
        lost,
        [json!({"lost": 0}), json!({"lost": 1})],
        "the sink letters"
    );
}

#[test]
fn an_expired_dead_letter_is_redriven_to_its_sink() {
    let env = TestEnv::get();
    let (gateway, stream) = env.gateway_with_refusing_kinesis("expired-redrive", 500);
    let short = gateway.publish("t?messageExpiry=1", "dev-1", r#"{"short": true}"#);
    assert_eq!(short.status, 200, "{:?}", short.body);
    eventually(
        Duration::from_secs(30),
        "refused attempts past the expiry",
        || {
            let stats = env.control(reqwest::Method::GET, "stats", None);
            (stats["put_records_calls"].as_u64().unwrap() >= 3).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1200)); // the expiry itself: 1 s of wall time
    env.control(reqwest::Method::DELETE, "faults", None);
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["origin"]["stage"], "expired");
    let redrive = gateway.admin_post(
        "/admin/dlq/redrive",
        json!({"keys": [letters[0]["key"]]}).to_string(),
    );
    assert_eq!(redrive.status, 200, "{:?}", redrive.body);
    assert_eq!(
        redrive.body["redriven"][0]["status"], "accepted",
        "{:?}",
        redrive.body
    );
    let again = gateway.dead_letters();
    assert!(
        again.is_empty(),
        "re-driven, not dead-lettered again: {again:?}"
    );
    let stored = env.read_stream(&stream);
    assert_eq!(stored.len(), 1, "delivered to its stream");
    assert_eq!(stored[0].2, br#"{"short": true}"#);
}

#[test]
fn the_partition_key_counts_in_the_kinesis_record_limit() {
    let env = TestEnv::get();
    let stream = unique("keyed");
    env.create_stream(&stream, 1);
    let gateway = Gateway::start(&env.kinesis_config(&stream, ""));
    let limit = 1024 * 1024;
    let device = "pk-dev"; // the partition key: 6 bytes
    // Data plus key exactly at the limit: delivered.
    let fits = gateway.publish("t", device, vec![b'a'; limit - device.len()]);
    assert_eq!(fits.status, 200, "{:?}", fits.body);
    // One byte more: the payload alone is within the limit (accepted), but not with its
    // key, so the sink dead-letters it with that reason.
    let over = gateway.publish("t", device, vec![b'b'; limit - device.len() + 1]);
    assert_eq!(over.status, 200, "{:?}", over.body);
    assert_eq!(over.body["status"], "accepted", "{:?}", over.body);
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], over.body["id"]);
    assert_eq!(
        letters[0]["origin"],
        json!({"stage": "sink", "sink": "kinesis"})
    );
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("partition key"), "{reason}");
    let stored = env.read_stream(&stream);
    assert_eq!(stored.len(), 1, "only the record that fits");
    assert_eq!(stored[0].2.len(), limit - device.len());
    assert_eq!(stored[0].1, device);
}
