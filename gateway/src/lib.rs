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
//! (the decision) → [`record`] → [`spool`] (durable) → [`sink`] (delivery). What a device
//! receives comes through its own session at IoT Core, [`upstream`], whatever its
//! protocol.
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
//! - [`handover`]: `sluice spool drain`, another (dead) instance's data directory
//!   delivered to the sinks.
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
//! - [`upstream`]: each receiving device's own MQTT 5 session at IoT Core, under its
//!   client id: subscriptions, shadow and jobs requests, messages for the device.
//! - [`sink`]: delivery to Kinesis, IoT Core (MQTT or HTTPS), or the local sink, the
//!   embedded default that needs no cloud.
//! - [`shadow`]: Device Shadow calls made over HTTPS, passed to IoT Core's data plane.
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
//! - [`backoff`]: the pauses between attempts of every retry loop.
//! - [`disk_thread`]: the threads that write and sync files, under `SCHED_BATCH` so that
//!   the disk's answers do not preempt request work.
//! - [`tls`]: PEM files into rustls server and client configurations.
//! - [`logging`]: the log subscriber `SLUICE_LOG` configures.
//! - [`metrics`]: the Prometheus metrics.
//! - [`progress`]: progress of long work at start (a large plugin's first compile).
//! - [`instance`]: which of the fleet's gateways this process is (the instance id its
//!   own connections at IoT Core are named after).
//! - `shutdown`: the signal every task stops on, and leaving before it.

pub(crate) mod admin;
pub mod auth;
pub(crate) mod backoff;
pub mod config;
pub(crate) mod console;
pub mod disk_thread;
pub mod handover;
pub(crate) mod ingress;
pub(crate) mod instance;
pub mod logging;
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
pub(crate) mod shadow;
mod shutdown;
pub mod sink;
pub(crate) mod spool;
pub(crate) mod template;
/// In-process gateways for unit tests and the fuzz targets (`gateway/fuzz`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
pub mod tls;
pub(crate) mod topic;
pub(crate) mod upstream;
pub(crate) mod wit;

use std::sync::Arc;

use anyhow::Context as _;

pub use crate::config::Config;
pub use crate::shutdown::Shutdown;
pub use crate::sink::aws::sdk_config as aws_sdk_config;

/// Starts the gateway described by `config` (read from `source`, which a reload reads
/// again) and serves until `shutdown` fires (or `POST /admin/drain`): it leaves for
/// `server.leave_delay_ms`, then stops (`shutdown::Leave`).
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
    let instance = instance::resolve(
        config.server.instance_id.as_deref(),
        &config.server.data_dir,
    )?;
    tracing::info!(%instance, "instance id");
    let spool = Arc::new(spool::Spool::open(
        &config.server.data_dir,
        config.spool.max_bytes_per_sink,
    )?);
    spool.set_dead_letter_limit(config.spool.max_dead_letter_bytes);
    let local = Arc::new(sink::local::LocalSink::open(&config.server.data_dir)?);
    let plugins = plugin::Plugins::start(&config)?;
    let registry_settings = config.auth.as_ref().and_then(|auth| auth.registry.as_ref());
    // The AWS configuration (credential chain, region), loaded once for the registry and
    // the shadow routes that need it.
    let aws = match registry_settings.is_some() || config.sinks.iot_core.is_some() {
        true => Some(sink::aws::sdk_config(&config.aws).await),
        false => None,
    };
    let registry = match (registry_settings, &aws) {
        (Some(settings), Some(aws)) => {
            let data_dir = &config.server.data_dir;
            let registry = auth::registry::Registry::open(settings, data_dir, aws)?;
            // Without a snapshot kept from before, the first one is read before devices
            // are let in; with one, devices it knows get in while it is refreshed.
            let first = match registry.age_secs() {
                None => {
                    let _ = registry.refresh(true).await;
                    std::time::Duration::from_secs(settings.refresh_secs)
                }
                Some(_) => std::time::Duration::ZERO,
            };
            registry.keep_fresh(first, std::time::Duration::from_secs(settings.refresh_secs));
            Some(registry)
        }
        _ => None,
    };
    let live = ingress::live::Live::new(&config, registry)?;
    let upstream = config
        .upstream
        .clone()
        .map(upstream::Upstream::new)
        .transpose()?;
    let shadows = match (&config.sinks.iot_core, &aws) {
        (Some(iot_core), Some(shared)) => {
            let endpoint = iot_core.endpoint_url.as_deref();
            let data_plane = sink::aws::with_endpoint(shared, endpoint);
            Some(Arc::new(shadow::Shadows::new(&data_plane)))
        }
        _ => None,
    };
    let sinks =
        Arc::new(sink::Sinks::build(&config, &instance, local.clone(), upstream.as_ref()).await?);
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
    let leave = shutdown::Leave::start(
        shutdown,
        std::time::Duration::from_millis(config.server.leave_delay_ms),
    );
    let sessions = Arc::new(ingress::sessions::Sessions::default());
    let held = upstream.as_ref().map(|upstream| {
        let idle = std::time::Duration::from_secs(upstream.settings().session_expiry_secs.into());
        upstream::held::Held::start(upstream.clone(), idle, leave.stop.clone())
    });
    let admin = match (&config.admin.listen, &config.admin.token) {
        (Some(listen), Some(token)) => Some(
            admin::serve(
                *listen,
                token.clone(),
                admin::Parts {
                    pipeline: pipeline.clone(),
                    sessions: sessions.clone(),
                    reloader: reloader.clone(),
                    leave: leave.trigger.clone(),
                },
                leave.stop.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    let state = ingress::state::AppState::new(ingress::state::Shared {
        pipeline,
        live,
        shutdown: leave.stop,
        leaving: leave.leaving,
        sessions,
        upstream,
        held,
        shadows,
        mqtt_clients: Default::default(),
    });
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
