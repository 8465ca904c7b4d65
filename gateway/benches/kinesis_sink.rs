//! The Kinesis sink against a local Kinesis endpoint (moto, started by
//! `scripts/test-env`): 20,000 user messages of 100 bytes from 2,000 devices, handed to
//! the sink by 200 concurrent requests of 100 messages, with and without KPL
//! aggregation. Reports user messages per second, `PutRecords` calls, Kinesis records
//! per call and user messages per Kinesis record (counted by the endpoint, not by the
//! sink).
//!
//! Run with `scripts/bench-kinesis` (starts the servers). It measures a whole pipeline
//! stage against a real server, so it is a load measurement with a custom harness rather
//! than a criterion micro-benchmark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_gateway::config::AwsConfig;
use sluice_gateway::message::Message;
use sluice_gateway::record::Record;
use sluice_gateway::route::{Decision, Destination};
use sluice_gateway::sink::kinesis::service::AwsKinesis;
use sluice_gateway::sink::kinesis::{KinesisSettings, KinesisSink};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MESSAGES: usize = 20_000;
const DEVICES: usize = 2_000;
const PER_REQUEST: usize = 100;
const PAYLOAD_BYTES: usize = 100;

fn record(stream: &str, n: usize) -> Record {
    let device = format!("device-{:05}", n % DEVICES);
    let mut payload = format!(r#"{{"n":{n},"pad":""#).into_bytes();
    payload.resize(PAYLOAD_BYTES - 2, b'x');
    payload.extend_from_slice(b"\"}");
    Record {
        message: Message {
            id: format!("m{n}"),
            device_id: device.clone(),
            topic: "t".to_string(),
            content_type: String::new(),
            qos: 0,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload,
        },
        decision: Decision {
            destination: Destination::Kinesis {
                stream: stream.to_string(),
                partition_key: device,
                explicit_hash_key: None,
            },
            rule: "bench".to_string(),
            reason: String::new(),
        },
    }
}

fn control(endpoint: &str, method: reqwest::Method, path: &str) -> Value {
    let response = reqwest::blocking::Client::new()
        .request(method, format!("{endpoint}/_sluice/{path}"))
        .send()
        .unwrap();
    response.json().unwrap_or(Value::Null)
}

fn run(endpoint: &str, runtime: &tokio::runtime::Runtime, aggregate: bool) {
    let stream = format!(
        "bench-{}-{}",
        if aggregate { "agg" } else { "plain" },
        std::process::id()
    );
    let aws = AwsConfig {
        region: Some("us-east-1".to_string()),
        endpoint_url: Some(endpoint.to_string()),
    };
    let shared = runtime.block_on(sluice_gateway::aws_sdk_config(&aws));
    let client = aws_sdk_kinesis::Client::new(&shared);
    runtime
        .block_on(
            client
                .create_stream()
                .stream_name(&stream)
                .shard_count(4)
                .send(),
        )
        .unwrap();
    control(endpoint, reqwest::Method::DELETE, "stats");
    let sink = Arc::new(KinesisSink::new(
        Arc::new(AwsKinesis::new(&shared)),
        KinesisSettings {
            linger: Duration::from_millis(10),
            delivery_timeout: Duration::from_secs(120),
            max_record_bytes: 1024 * 1024,
            aggregate_streams: if aggregate {
                vec![stream.clone()]
            } else {
                Vec::new()
            },
            envelope: false,
        },
    ));
    let started = Instant::now();
    runtime.block_on(async {
        let mut requests = tokio::task::JoinSet::new();
        for first in (0..MESSAGES).step_by(PER_REQUEST) {
            let sink = sink.clone();
            let records: Vec<Record> = (first..first + PER_REQUEST)
                .map(|n| record(&stream, n))
                .collect();
            requests
                .spawn(async move { sink.deliver(records).await.map(|rejected| rejected.len()) });
        }
        while let Some(done) = requests.join_next().await {
            assert_eq!(done.unwrap().unwrap(), 0, "no record refused");
        }
    });
    let elapsed = started.elapsed();
    let stats = control(endpoint, reqwest::Method::GET, "stats");
    let calls = stats["put_records_calls"].as_u64().unwrap() as f64;
    let kinesis_records = stats["put_records_records"].as_u64().unwrap() as f64;
    println!(
        "{:<12} {:>8.0} msg/s  {:>6} calls  {:>7.1} records/call  {:>7.1} messages/record  ({:.2} s)",
        if aggregate { "aggregated" } else { "plain" },
        MESSAGES as f64 / elapsed.as_secs_f64(),
        calls,
        kinesis_records / calls,
        MESSAGES as f64 / kinesis_records,
        elapsed.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` passes nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let Ok(endpoint) = std::env::var("SLUICE_TEST_AWS_ENDPOINT") else {
        eprintln!("SLUICE_TEST_AWS_ENDPOINT is not set: run scripts/bench-kinesis");
        std::process::exit(1);
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "{MESSAGES} messages of {PAYLOAD_BYTES} B from {DEVICES} devices, {} concurrent requests of {PER_REQUEST}",
        MESSAGES / PER_REQUEST
    );
    run(&endpoint, &runtime, false);
    run(&endpoint, &runtime, true);
}
