//! Sluice: an ingestion gateway for IoT fleets.
//!
//! Devices publish over HTTPS; every message runs through the configured WebAssembly
//! plugins (transforms, then a router), the routing policy picks its destination (AWS IoT
//! Core, a Kinesis data stream, the local sink, the dead-letter store, or nowhere), and a
//! sink delivers it before the device gets its acknowledgement.
//!
//! # Layout
//!
//! One module per step of a message's way:
//!
//! - [`config`]: the configuration file, its defaults, and validation that reports every
//!   error at once.
//! - [`ingress`]: the HTTP(S) listener and its routes (`POST /topics/{topic}`, batches).
//! - [`plugin`]: the wasmtime host: engine, compiled-component cache, worker threads with
//!   reused stores, time and memory limits, hot reload.
//! - [`route`]: the routing decision: topic filters, the built-in policy, router-plugin
//!   overrides.
//! - [`pipeline`]: one message batch's way from ingress through plugins and routing to the
//!   sink, and what the device is told.
//! - [`sink`]: delivery; [`sink::local`] is the embedded default that needs no cloud.
//! - [`message`]: the message record shared by every step.

pub mod config;
pub mod ingress;
pub mod message;
pub mod pipeline;
pub mod plugin;
pub mod route;
mod shutdown;
pub mod sink;

use std::sync::Arc;

use anyhow::Context as _;

pub use crate::config::Config;
pub use crate::shutdown::Shutdown;

/// Starts the gateway described by `config` and serves until `shutdown` fires.
///
/// Everything that can fail because of the configuration (plugin files, TLS material,
/// the listen address) fails here, before the first request is accepted.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let sink = Arc::new(sink::local::LocalSink::open(&config.server.data_dir)?);
    let plugins = plugin::Plugins::start(&config)?;
    let pipeline = Arc::new(pipeline::Pipeline::new(
        &config,
        plugins.clone(),
        sink.clone(),
    ));
    let watcher = if config.plugins.hot_reload {
        Some(plugin::reload::watch(plugins.clone())?)
    } else {
        None
    };
    let result = ingress::serve(&config, pipeline, shutdown).await;
    drop(watcher);
    plugins.stop();
    sink.close();
    result
}
