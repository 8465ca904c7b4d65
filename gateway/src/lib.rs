//! Sluice: an ingestion gateway for IoT fleets.
//!
//! Devices publish over HTTPS, WebSockets or MQTT; every message runs through the
//! configured WebAssembly plugins (transforms, then a router), the routing policy picks
//! its destination (AWS IoT Core, a Kinesis data stream, the local sink, the dead-letter
//! store, or nowhere), the spool keeps it on disk before the device gets its
//! acknowledgement, and a sink delivers it from there.
//!
//! # Layout
//!
//! A message's way: [`ingress`] (a device's protocol) → [`auth`] and [`policy`] (who it
//! is, what it may do) → [`pipeline`] → [`plugin`] (transforms, a router) → [`route`]
//! (the decision) → [`record`] → [`spool`] (durable) → [`sink`] (delivery). Commands come
//! back through [`downlink`].
//!
//! The modules stand on floors, the top floor first. A module imports only modules on
//! its own floor or below (`scripts/check-imports` fails the tests otherwise), so that
//! the shared words are on the ground floor and nothing runs back up.
//!
//! **The operators' side.**
//! - [`admin`]: the operators' API (spool state, dead letters, plugins, reload, metrics);
//!   the binary's `admin_client` holds the `sluice dlq` and `sluice admin` commands
//!   that call it.
//! - [`console`]: the operator's console, a page on the admin listener, and the
//!   in-memory time series it charts.
//! - [`reconfigure`]: configuration reload without a restart (admin API and `SIGHUP`).
//!
//! **The device side.**
//! - [`ingress`]: the listeners and their protocols (HTTP, the `sluice.v1` WebSocket
//!   dialect, MQTT) over one device core: one accept path, one credential, one session
//!   shell, one admission step, one verdict per message.
//! - [`readiness`]: why the gateway is not ready (`GET /readyz`, the console).
//!
//! **The way.**
//! - [`pipeline`]: one batch's way through plugins and routing to the spool, and what
//!   the device is told; re-drives of dead letters.
//! - [`policy`]: what a device may do: per-grant topics, sizes and rates.
//! - [`auth`]: who a device is: client certificates (with revocation) or bearer tokens.
//!
//! **The engines.**
//! - [`plugin`]: the wasmtime host: engine, compiled-component cache, instances reused
//!   across batches, time and memory limits, hot reload, uploaded versions.
//! - [`spool`]: the durable queue per sink (group commit), delivery from it, best-effort
//!   hand-over beside it, and the dead-letter store.
//! - [`downlink`]: commands from the cloud to devices, through the MQTT broker.
//! - [`sink`]: delivery to Kinesis, IoT Core (MQTT or HTTPS), or the local sink, the
//!   embedded default that needs no cloud.
//!
//! **The decision.**
//! - [`record`]: a routed message ([`record::Record`]) and the sink that delivers it
//!   ([`record::SinkId`]), shared by the spool and the sinks.
//! - [`route`]: the routing decision: the built-in policy, config rules, router-plugin
//!   overrides.
//!
//! **The configuration.**
//! - [`config`]: the configuration file, its defaults, and validation that reports every
//!   error at once.
//!
//! **The ground floor: the shared words.**
//! - [`message`]: the message record shared by every step.
//! - [`wit`]: the host bindings of the WIT package (the message record is one of its
//!   types).
//! - [`topic`]: MQTT topic names and filters, as IoT Core reads them.
//! - [`template`]: `${device.id}`-style templates.
//! - [`quota`]: the AWS quotas (IoT Core, Kinesis).
//! - [`tls`]: PEM files into rustls server and client configurations.
//! - [`metrics`]: the Prometheus metrics.
//! - [`progress`]: progress of long work at start (a large plugin's first compile).
//! - `shutdown`: the signal every task stops on.

pub(crate) mod admin;
pub mod auth;
pub mod config;
pub(crate) mod console;
pub(crate) mod downlink;
pub(crate) mod ingress;
pub mod message;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub mod plugin;
pub(crate) mod policy;
pub(crate) mod progress;
pub(crate) mod quota;
pub(crate) mod readiness;
pub mod reconfigure;
pub mod record;
pub mod route;
mod shutdown;
pub mod sink;
pub(crate) mod spool;
pub(crate) mod template;
#[cfg(test)]
mod testing;
pub mod tls;
pub(crate) mod topic;
pub(crate) mod wit;

use std::sync::Arc;

use anyhow::Context as _;

pub use crate::config::Config;
pub use crate::shutdown::Shutdown;

/// Starts the gateway described by `config` (read from `source`, which a reload reads
/// again) and serves until `shutdown` fires.
///
/// Everything that can fail because of the configuration (plugin files, TLS material,
/// the listen address) fails here, before the first request is accepted.
pub async fn run(
    source: reconfigure::ConfigSource,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let spool = Arc::new(spool::Spool::open(
        &config.server.data_dir,
        config.spool.max_bytes_per_sink,
    )?);
    spool.set_dead_letter_limit(config.spool.max_dead_letter_bytes);
    let local = Arc::new(sink::local::LocalSink::open(&config.server.data_dir)?);
    let plugins = plugin::Plugins::start(&config)?;
    let live = ingress::live::Live::new(&config)?;
    let sinks = Arc::new(cloud_sinks(&config, local.clone()).await?);
    let pipeline = Arc::new(pipeline::Pipeline::new(
        &config,
        plugins.clone(),
        sinks.clone(),
        spool.clone(),
    ));
    let (drain, draining) = tokio::sync::watch::channel(false);
    let deliverers = spool::deliver::start(spool.clone(), sinks, config.spool.expired, draining);
    let watcher = if config.plugins.hot_reload {
        Some(Arc::new(plugin::reload::watch(plugins.clone())?))
    } else {
        None
    };
    let reloader = Arc::new(reconfigure::Reloader::new(
        source,
        config.clone(),
        live.clone(),
        pipeline.clone(),
        watcher.clone(),
    ));
    #[cfg(unix)]
    let hangups = reconfigure::reload_on_sighup(reloader.clone())?;
    let sessions = Arc::new(ingress::sessions::Sessions::default());
    let downlink = config
        .downlink
        .clone()
        .map(|settings| downlink::Downlink::start(settings, &config.server.data_dir))
        .transpose()?;
    let admin = match (&config.admin.listen, &config.admin.token) {
        (Some(listen), Some(token)) => Some(
            admin::serve(
                *listen,
                token.clone(),
                admin::Parts {
                    pipeline: pipeline.clone(),
                    sessions: sessions.clone(),
                    downlink: downlink.clone(),
                    reloader: reloader.clone(),
                },
                shutdown.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    let state = ingress::state::AppState {
        pipeline,
        live,
        shutdown,
        sessions,
        downlink,
        mqtt_clients: Default::default(),
        mqtt_sessions: ingress::mqtt::saved::SavedSessions::open(&config.server.data_dir)?,
    };
    let listeners = match ingress::listener::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            if let Some(admin) = admin {
                admin.abort();
            }
            return Err(error);
        }
    };
    ingress::listener::serve(listeners, &config, state).await;
    #[cfg(unix)]
    hangups.abort();
    drop(reloader);
    drop(watcher);
    // In-flight requests are done: deliver what the sinks take within the grace period,
    // and leave the rest in the spool for the next start.
    let _ = drain.send(true);
    let grace = std::time::Duration::from_millis(config.server.shutdown_grace_ms);
    let aborts: Vec<_> = deliverers.iter().map(|d| d.abort_handle()).collect();
    let drained = tokio::time::timeout(grace, futures_util::future::join_all(deliverers)).await;
    if drained.is_err() {
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
    }
    let left: u64 = spool.stats().queues.iter().map(|q| q.records).sum();
    if left > 0 {
        tracing::warn!(
            left,
            "stopping with records still spooled; they are delivered after the next start"
        );
    } else {
        tracing::info!("every spooled record was delivered");
    }
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    plugins.stop();
    local.close();
    spool.close();
    Ok(())
}

/// Builds the configured cloud sinks around the local sink.
async fn cloud_sinks(
    config: &Config,
    local: Arc<sink::local::LocalSink>,
) -> anyhow::Result<sink::Sinks> {
    use std::time::Duration;

    let needs_aws = config.sinks.kinesis.is_some()
        || config
            .sinks
            .iot_core
            .as_ref()
            .is_some_and(|iot| iot.transport == config::IotTransport::Https);
    let aws = if needs_aws {
        Some(aws_sdk_config(&config.aws).await)
    } else {
        None
    };
    let with_endpoint = |shared: &aws_config::SdkConfig, endpoint: &Option<String>| match endpoint {
        Some(url) => shared.to_builder().endpoint_url(url).build(),
        None => shared.clone(),
    };
    let kinesis = match (&config.sinks.kinesis, &aws) {
        (Some(settings), Some(shared)) => {
            let api = sink::kinesis::service::AwsKinesis::new(&with_endpoint(
                shared,
                &settings.endpoint_url,
            ));
            Some(Arc::new(sink::kinesis::KinesisSink::new(
                Arc::new(api),
                sink::kinesis::KinesisSettings {
                    linger: Duration::from_millis(settings.linger_ms),
                    delivery_timeout: Duration::from_millis(settings.delivery_timeout_ms),
                    max_record_bytes: config.routing.kinesis_max_record_bytes,
                    aggregate_streams: settings.aggregate_streams.clone(),
                    envelope: settings.envelope,
                },
            )) as Arc<dyn sink::Sink>)
        }
        _ => None,
    };
    let iot_core = match &config.sinks.iot_core {
        None => None,
        Some(iot) => Some(match (&iot.mqtt, &aws) {
            (Some(mqtt), _) => Arc::new(sink::iot_core::mqtt::MqttSink::start(
                sink::iot_core::mqtt::MqttSettings {
                    host: mqtt.host.clone(),
                    port: mqtt.port,
                    client_id: mqtt.client_id.clone(),
                    ca: mqtt.ca.clone(),
                    cert: mqtt.cert.clone(),
                    key: mqtt.key.clone(),
                    keep_alive: Duration::from_secs(mqtt.keep_alive_secs),
                    delivery_timeout: Duration::from_millis(iot.delivery_timeout_ms),
                    basic_ingest_rule: iot.basic_ingest_rule.clone(),
                },
            )?) as Arc<dyn sink::Sink>,
            (None, Some(shared)) => Arc::new(sink::iot_core::https::HttpsSink::new(
                &with_endpoint(shared, &iot.endpoint_url),
                iot.basic_ingest_rule.clone(),
                Duration::from_millis(iot.delivery_timeout_ms),
            )),
            (None, None) => anyhow::bail!("sinks.iot_core: no transport could be set up"),
        }),
    };
    Ok(sink::Sinks::new(local, kinesis, iot_core))
}

/// The shared AWS configuration: the standard credential chain, our region and endpoint,
/// rustls with ring for TLS, and no SDK retries (the sinks retry per record).
pub async fn aws_sdk_config(aws: &config::AwsConfig) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;

    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https(); // Bounded calls: a hung connection must not stall a sink past its delivery timeout.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(std::time::Duration::from_secs(10))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::disabled());
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}
