//! Configuration reload without a restart: `POST /admin/reload` and `SIGHUP`.
//!
//! The file is read and validated again; then everything new that can fail is built
//! before anything is swapped in: the plugins that changed are loaded and initialised,
//! new TLS material is read. If any step fails, the running configuration stays whole
//! and the error says why. Nothing closes a connection: listeners keep running, open
//! WebSocket sessions keep their window and timeouts, and from the swap on every
//! request, frame and batch is checked against the new rules.
//!
//! Live sections: `[plugins]` chain (`transform`, `router`, their configuration,
//! `on_failure`), `[routing]`, `spool.durability`, `spool.max_dead_letter_bytes`,
//! `[auth]` (a certificate revoked this way also ends its open WebSocket sessions),
//! `[policy]`, `[limits]`,
//! `[websocket]` (for new sessions), and the certificate, key and CAs of
//! `[server.tls]` / `[auth.mtls]`, read again on every reload (for new connections). The rest (addresses, the data
//! directory, the connection limits and timeouts, the spool's size, `spool.expired`, the
//! sinks, AWS, the admin listener, `[upstream]`, the
//! plugin host's workers and limits, turning TLS on or off) is only read at start: a
//! reload that changes it applies the live sections and lists the others under
//! `restart_required`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::ingress::live::Live;
use crate::pipeline::{Pipeline, RoutingRules};
use crate::plugin::reload::ReloadWatcher;

/// Where the configuration comes from: the file and the command-line overrides, which
/// a reload applies again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file; `None`: the embedded default (nothing to reload).
    pub path: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--instance-id`.
    pub instance_id: Option<String>,
}

impl ConfigSource {
    /// Reads and validates the configuration.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(data_dir) = &self.data_dir {
            config.server.data_dir.clone_from(data_dir);
        }
        if let Some(instance_id) = &self.instance_id {
            config.server.instance_id = Some(instance_id.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Live sections that changed and now apply.
    pub applied: Vec<String>,
    /// Plugins loaded anew (new, changed file or changed configuration).
    pub plugins_loaded: Vec<String>,
    /// Plugins no longer in the chain.
    pub plugins_removed: Vec<String>,
    /// Settings that changed but only apply after a restart.
    pub restart_required: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway runs on the embedded default.
    #[error("the gateway was started without --config: there is no file to reload")]
    NoFile,
    /// The file does not parse or validate, or its plugins or TLS material do not load.
    #[error("{0:#}")]
    Invalid(anyhow::Error),
}

/// Applies configuration reloads to the running gateway.
pub struct Reloader {
    source: ConfigSource,
    /// The configuration running now (with restart-only settings as they were at start).
    running: tokio::sync::Mutex<Config>,
    live: Arc<Live>,
    pipeline: Arc<Pipeline>,
    watcher: Option<Arc<ReloadWatcher>>,
}

impl Reloader {
    /// Who devices are now (the running configuration's `[auth]`).
    pub fn auth(&self) -> Arc<crate::auth::Authenticator> {
        self.live.rules.load().auth.clone()
    }

    /// The certificates registered at AWS IoT (`[auth.registry]`, set at start).
    pub fn registry(&self) -> Option<Arc<crate::auth::registry::Registry>> {
        self.live.registry.clone()
    }

    /// A reloader for the gateway started with `config` from `source`.
    pub fn new(
        source: ConfigSource,
        config: Config,
        live: Arc<Live>,
        pipeline: Arc<Pipeline>,
        watcher: Option<Arc<ReloadWatcher>>,
    ) -> Reloader {
        Reloader {
            source,
            running: tokio::sync::Mutex::new(config),
            live,
            pipeline,
            watcher,
        }
    }

    /// The configuration running now, and the file it came from (`None`: the embedded
    /// default).
    pub async fn running(&self) -> (Option<PathBuf>, Config) {
        (self.source.path.clone(), self.running.lock().await.clone())
    }

    /// Reads the file again and applies what changed; all or nothing for the live
    /// sections. One reload at a time.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        if self.source.path.is_none() {
            return Err(ReloadError::NoFile);
        }
        let source = self.source.clone();
        let new = tokio::task::spawn_blocking(move || source.load())
            .await
            .map_err(|e| ReloadError::Invalid(e.into()))?
            .map_err(ReloadError::Invalid)?;
        let mut running = self.running.lock().await;
        let (effective, restart_required) = split(&running, &new);
        // Routing rules are checked against the sinks that actually run.
        effective.validate().map_err(|e| {
            ReloadError::Invalid(anyhow::anyhow!(
                "{e}\n(the sinks, spool and listeners stay as they were started; changing \
                 them needs a restart)"
            ))
        })?;
        let device = self
            .live
            .prepare(&running, &effective)
            .map_err(ReloadError::Invalid)?;
        let plugins = self.pipeline.plugins().clone();
        let entries = crate::plugin::configured_entries(&effective);
        let (plugins_loaded, plugins_removed) =
            tokio::task::spawn_blocking(move || plugins.reconfigure(&entries))
                .await
                .map_err(|e| ReloadError::Invalid(e.into()))?
                .map_err(|e| ReloadError::Invalid(e.into()))?;
        // Nothing below can fail.
        let mut applied: Vec<String> = self
            .live
            .commit(device)
            .into_iter()
            .map(String::from)
            .collect();
        if running.routing != effective.routing
            || running.plugins.on_failure != effective.plugins.on_failure
            || running.spool.durability != effective.spool.durability
        {
            self.pipeline.set_rules(RoutingRules::new(&effective));
            for (changed, name) in [
                (running.routing != effective.routing, "routing"),
                (
                    running.plugins.on_failure != effective.plugins.on_failure,
                    "plugins.on_failure",
                ),
                (
                    running.spool.durability != effective.spool.durability,
                    "spool.durability",
                ),
            ] {
                if changed {
                    applied.push(name.to_string());
                }
            }
        }
        if running.spool.max_dead_letter_bytes != effective.spool.max_dead_letter_bytes {
            let limit = effective.spool.max_dead_letter_bytes;
            self.pipeline.spool().set_dead_letter_limit(limit);
            applied.push("spool.max_dead_letter_bytes".to_string());
        }
        if running.plugins.transform != effective.plugins.transform
            || running.plugins.router != effective.plugins.router
            || !plugins_loaded.is_empty()
        {
            applied.push("plugins".to_string());
        }
        if let Some(watcher) = &self.watcher
            && let Err(error) = watcher.follow()
        {
            tracing::warn!(%error, "cannot watch the new plugin folders; hot reload misses them");
        }
        *running = effective;
        let report = ReloadReport {
            applied,
            plugins_loaded,
            plugins_removed,
            restart_required,
        };
        tracing::info!(applied = ?report.applied, plugins = ?report.plugins_loaded, removed = ?report.plugins_removed, restart_required = ?report.restart_required, "configuration reloaded");
        Ok(report)
    }
}

/// The configuration to run after a reload from `running` to `new`: the live sections
/// of `new`, the rest of `running`; with the names of the settings that differ but wait
/// for a restart.
fn split(running: &Config, new: &Config) -> (Config, Vec<String>) {
    let (old_server, new_server) = (&running.server, &new.server);
    let (old_plugins, new_plugins) = (&running.plugins, &new.plugins);
    let tls_switch = old_server.tls.is_some() != new_server.tls.is_some();
    // mTLS on or off changes what the TLS handshake asks for, which is part of turning
    // client certificates on: that too waits for a restart.
    let mtls_switch = running.auth.as_ref().is_some_and(|a| a.mtls.is_some())
        != new.auth.as_ref().is_some_and(|a| a.mtls.is_some());
    // The registry is read and kept fresh from the start on; the rest of `[auth]` applies.
    let registry = |config: &Config| config.auth.as_ref().and_then(|a| a.registry.clone());
    let registry_changed = registry(running) != registry(new);
    let restart: Vec<String> = [
        (old_server.listen != new_server.listen, "server.listen"),
        (
            old_server.data_dir != new_server.data_dir,
            "server.data_dir",
        ),
        (
            old_server.instance_id != new_server.instance_id,
            "server.instance_id",
        ),
        (
            old_server.shutdown_grace_ms != new_server.shutdown_grace_ms,
            "server.shutdown_grace_ms",
        ),
        (
            old_server.leave_delay_ms != new_server.leave_delay_ms,
            "server.leave_delay_ms",
        ),
        (tls_switch, "server.tls (turning TLS on or off)"),
        (
            old_server.allow_unauthenticated != new_server.allow_unauthenticated,
            "server.allow_unauthenticated",
        ),
        (
            old_server.max_connections != new_server.max_connections,
            "server.max_connections",
        ),
        (
            old_server.handshake_timeout_secs != new_server.handshake_timeout_secs
                || old_server.header_timeout_secs != new_server.header_timeout_secs
                || old_server.idle_timeout_secs != new_server.idle_timeout_secs,
            "server.*_timeout_secs",
        ),
        (
            old_plugins.workers != new_plugins.workers,
            "plugins.workers",
        ),
        (
            old_plugins.call_timeout_ms != new_plugins.call_timeout_ms,
            "plugins.call_timeout_ms",
        ),
        (
            old_plugins.memory_limit_mib != new_plugins.memory_limit_mib,
            "plugins.memory_limit_mib",
        ),
        (
            old_plugins.hot_reload != new_plugins.hot_reload,
            "plugins.hot_reload",
        ),
        (
            old_plugins.cache_dir != new_plugins.cache_dir,
            "plugins.cache_dir",
        ),
        (
            running.spool.max_bytes_per_sink != new.spool.max_bytes_per_sink,
            "spool.max_bytes_per_sink",
        ),
        (
            running.spool.best_effort_max_in_flight != new.spool.best_effort_max_in_flight,
            "spool.best_effort_max_in_flight",
        ),
        (running.spool.expired != new.spool.expired, "spool.expired"),
        (running.mqtt.listen != new.mqtt.listen, "mqtt.listen"),
        (running.aws != new.aws, "aws"),
        (running.sinks != new.sinks, "sinks"),
        (running.admin != new.admin, "admin"),
        (running.upstream != new.upstream, "upstream"),
        (
            mtls_switch,
            "auth (turning client certificates on or off; the whole [auth] change waits)",
        ),
        (registry_changed, "auth.registry"),
    ]
    .into_iter()
    .filter(|(changed, _)| *changed)
    .map(|(_, name)| name.to_string())
    .collect();

    let mut effective = new.clone();
    effective.server = crate::config::ServerConfig {
        tls: if tls_switch {
            running.server.tls.clone()
        } else {
            new.server.tls.clone()
        },
        ..running.server.clone()
    };
    effective.plugins = crate::config::PluginsConfig {
        on_failure: new.plugins.on_failure,
        transform: new.plugins.transform.clone(),
        router: new.plugins.router.clone(),
        ..running.plugins.clone()
    };
    effective.spool = crate::config::SpoolConfig {
        durability: new.spool.durability,
        max_dead_letter_bytes: new.spool.max_dead_letter_bytes,
        ..running.spool.clone()
    };
    effective.aws = running.aws.clone();
    effective.sinks = running.sinks.clone();
    effective.admin = running.admin.clone();
    effective.upstream = running.upstream.clone();
    effective.mqtt.listen = running.mqtt.listen;
    if mtls_switch {
        // The whole `[auth]` section waits with it: half of it (tokens without the
        // certificates they were configured with, or the reverse) could lock devices out.
        effective.auth.clone_from(&running.auth);
    } else if let Some(auth) = effective.auth.as_mut() {
        auth.registry = registry(running);
    }
    (effective, restart)
}

/// Reloads on every `SIGHUP` until the gateway stops; the outcome goes to the log.
#[cfg(unix)]
pub fn reload_on_sighup(reloader: Arc<Reloader>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if let Err(error) = reloader.reload().await {
                tracing::error!(%error, "configuration reload refused; the running configuration stays");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_stay_and_are_listed() {
        let running = Config::parse(
            r#"
            [server]
            listen = "127.0.0.1:8080"
            [plugins]
            workers = 2
            [routing]
            default_destination = "local"
            "#,
        )
        .unwrap();
        let new = Config::parse(
            r#"
            [server]
            listen = "127.0.0.1:9999"
            [plugins]
            workers = 4
            on_failure = "dead-letter"
            [routing]
            default_destination = "kinesis"
            "#,
        )
        .unwrap();
        let (effective, restart) = split(&running, &new);
        assert_eq!(restart, ["server.listen", "plugins.workers"]);
        assert_eq!(effective.server.listen, running.server.listen);
        assert_eq!(effective.plugins.workers, 2);
        assert_eq!(effective.plugins.on_failure, new.plugins.on_failure);
        assert_eq!(effective.routing, new.routing);
        let (same, nothing) = split(&running, &running);
        assert_eq!(same, running);
        assert!(nothing.is_empty());
    }
}
