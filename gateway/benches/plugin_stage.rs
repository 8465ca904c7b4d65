//! The plugin stage on its own: one worker's store, reused across batches, running a
//! pass-through plugin (the host's own cost: the call, and copying messages in and out)
//! and the JSON enricher, over 200-byte JSON messages in batches of 1, 10 and 100.
//!
//! Run with `scripts/bench` (it builds the plugins first) or, with the plugins built,
//! `cargo bench -p sluice-gateway --bench plugin_stage`.

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_gateway::config::Config;
use sluice_gateway::message::Message;
use sluice_gateway::plugin::Plugins;
use sluice_gateway::plugin::worker::LocalRunner;

// The same allocator as the `sluice` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of every message's payload, as the issue's target specifies.
const PAYLOAD_BYTES: usize = 200;

fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins first",
        path.display()
    );
    path
}

/// A 200-byte JSON telemetry message.
fn message(n: usize) -> Message {
    let mut payload = format!(
        r#"{{"site_id":"site-{}","seq":{n},"temp":21.5,"humidity":40.25,"pad":""#,
        n % 16
    );
    let pad = PAYLOAD_BYTES - payload.len() - 2;
    payload.push_str(&"x".repeat(pad));
    payload.push_str("\"}");
    assert_eq!(payload.len(), PAYLOAD_BYTES);
    Message {
        id: format!("0193a1b2-0000-7000-8000-{n:012}"),
        device_id: format!("device-{}", n % 100),
        topic: "sites/12/telemetry".to_string(),
        content_type: "application/json".to_string(),
        qos: 1,
        attributes: Vec::new(),
        received_at_ms: 1_764_000_000_000 + n as u64,
        payload: payload.into_bytes(),
    }
}

fn plugin_stage(c: &mut Criterion) {
    // A call's time limit is a timer on the runtime, as in the gateway and `sluice plugin
    // run`: the stage runs inside one's context.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _context = runtime.enter();
    let cache = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.plugins.cache_dir = Some(cache.path().to_path_buf());
    for name in ["passthrough", "json_enricher"] {
        let plugins = Plugins::single(&config, &plugin(name), Vec::new()).unwrap();
        let mut runner = LocalRunner::default();
        let mut group = c.benchmark_group(format!("plugin_stage/{name}"));
        for batch_size in [1usize, 10, 100] {
            let batch: Vec<Message> = (0..batch_size).map(message).collect();
            let check = runner.run(&plugins, batch.clone());
            assert!(
                check
                    .iter()
                    .all(|r| r.outputs.len() == 1 && r.failures.is_empty())
            );
            group.throughput(Throughput::Elements(batch_size as u64));
            group.bench_function(format!("batch_{batch_size}"), |b| {
                // The results are dropped inside the timed routine, as the gateway drops them.
                b.iter_batched(
                    || batch.clone(),
                    |batch| drop(runner.run(&plugins, batch)),
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
        plugins.stop();
    }
}

criterion_group!(benches, plugin_stage);
criterion_main!(benches);
