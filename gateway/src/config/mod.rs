//! The configuration file (TOML): types, documented defaults, and validation that reports
//! every problem at once before anything binds a port.
//!
//! An empty file (or no file) is the embedded default: plain HTTP on loopback, no
//! plugins, every routed message written by the local sink under `./sluice-data`.
//!
//! One file per section, each with its types, defaults and checks: `server` (with
//! `[limits]`, `[admin]`, `[websocket]`), `auth` (with `[policy]`), `plugins`,
//! `routing`, `spool`, `sinks` (with `[aws]`), `upstream`, `mqtt`. The AWS quotas the
//! defaults and checks use are on the ground floor ([`crate::quota`]), with the topic
//! filters and templates they parse.

mod auth;
mod mqtt;
mod plugins;
mod routing;
mod server;
mod sinks;
mod spool;
mod upstream;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use auth::{
    AuthConfig, DeviceIdSource, GrantConfig, JwtConfig, MtlsConfig, PolicyConfig, RegistryConfig,
    TokenKeyConfig, TokensConfig, parse_hex,
};
pub use mqtt::MqttConfig;
pub use plugins::{
    DEFAULT_PLUGIN_MEMORY_MIB, DEFAULT_PLUGIN_TIMEOUT_MS, FailurePath, PluginEntry, PluginsConfig,
    plugin_config_value,
};
pub use routing::{DefaultDestination, RoutingConfig, RuleConfig, RuleDestination};
pub use server::{
    AdminConfig, DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_MESSAGES, LimitsConfig, ServerConfig, TlsConfig, WebSocketConfig,
};
pub use sinks::{
    AwsConfig, IotCoreSinkConfig, IotTransport, KinesisSinkConfig, MqttSinkConfig, SinksConfig,
    validate_stream_name,
};
pub use spool::{Durability, ExpiredPath, SpoolConfig};
pub use upstream::UpstreamConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, TLS and data directory.
    #[serde(default)]
    pub server: ServerConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The plugin host and the plugin chain.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The routing policy.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Region, endpoint and credentials for the AWS sinks.
    #[serde(default)]
    pub aws: AwsConfig,
    /// The cloud sinks; a destination without one goes to the local sink.
    #[serde(default)]
    pub sinks: SinksConfig,
    /// The spool between routing and the sinks.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The admin listener (dead letters, spool state).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Device authentication; present: every device must authenticate (no more
    /// `x-device-id`).
    pub auth: Option<AuthConfig>,
    /// What each device may do; enforced (default deny) when present or when `[auth]`
    /// is.
    pub policy: Option<PolicyConfig>,
    /// WebSocket sessions (`GET /ws`).
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// The shared command subscription of earlier versions, replaced by `[upstream]`:
    /// present, it is refused with a pointer to its replacement.
    pub downlink: Option<toml::Value>,
    /// IoT Core's MQTT endpoint, where each device that receives gets its own session;
    /// absent: devices cannot subscribe.
    pub upstream: Option<UpstreamConfig>,
    /// Devices speaking MQTT.
    #[serde(default)]
    pub mqtt: MqttConfig,
}

/// Everything wrong with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// The file parsed, but some values are wrong.
    #[error("{}", Problems(.0))]
    Invalid(Vec<String>),
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative plugin paths are
    /// resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let relative_to_file = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
            // Absolute, so that hot-reload events name the same file.
            if let Ok(absolute) = std::path::absolute(&*path) {
                *path = absolute;
            }
        };
        let plugins = config
            .plugins
            .transform
            .iter_mut()
            .chain(config.plugins.router.as_mut());
        for entry in plugins {
            relative_to_file(&mut entry.path);
        }
        if let Some(tls) = config.server.tls.as_mut() {
            relative_to_file(&mut tls.cert);
            relative_to_file(&mut tls.key);
        }
        if let Some(upstream) = config.upstream.as_mut() {
            for path in [&mut upstream.ca, &mut upstream.cert, &mut upstream.key] {
                relative_to_file(path);
            }
        }
        if let Some(mtls) = config.auth.as_mut().and_then(|auth| auth.mtls.as_mut()) {
            for path in &mut mtls.ca {
                relative_to_file(path);
            }
        }
        if let Some(file) = config
            .auth
            .as_mut()
            .and_then(|auth| auth.jwt.as_mut())
            .and_then(|jwt| jwt.jwks_file.as_mut())
        {
            relative_to_file(file);
        }
        if let Some(mqtt) = config
            .sinks
            .iot_core
            .as_mut()
            .and_then(|iot| iot.mqtt.as_mut())
        {
            for path in [&mut mqtt.ca, &mut mqtt.cert, &mut mqtt.key] {
                relative_to_file(path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    /// The directory of compiled plugins.
    pub fn cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("plugin-cache"))
    }

    /// Checks every value and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.validate_server(&mut problems);
        self.validate_plugins(&mut problems);
        self.validate_routing(&mut problems);
        self.validate_sinks(&mut problems);
        self.validate_spool(&mut problems);
        self.validate_admin(&mut problems);
        self.validate_auth_and_policy(&mut problems);
        self.validate_websocket(&mut problems);
        if self.downlink.is_some() {
            problems.push(
                "[downlink] is gone: commands now come through each device's own session at IoT Core; configure [upstream] (host, ca, cert, key, command_topics, reply_topic) instead".to_string(),
            );
        }
        self.validate_upstream(&mut problems);
        self.validate_mqtt(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// A problem for each of a section's TLS files (`ca`, `cert`, `key`) that is not a file.
fn check_tls_files(
    section: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    problems: &mut Vec<String>,
) {
    for (what, path) in [("ca", ca), ("cert", cert), ("key", key)] {
        if !path.is_file() {
            problems.push(format!(
                "{section}.{what}: file {} does not exist",
                path.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems validation finds in `text` (it must find some).
    fn problems_of(text: &str) -> Vec<String> {
        let config = Config::parse(text).unwrap();
        let ConfigError::Invalid(problems) = config.validate().unwrap_err() else {
            panic!("expected validation problems");
        };
        problems
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(config.server.tls.is_none());
        assert!(config.plugins.transform.is_empty());
        assert_eq!(config.routing.kinesis_max_record_bytes, 1024 * 1024);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let error = Config::parse("[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(error.contains("listen_on"), "{error}");
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let problems = problems_of(
            r#"
            [plugins]
            workers = 0
            memory_limit_mib = 0
            [[plugins.transform]]
            name = "a"
            path = "/nonexistent/a.wasm"
            config = { list = [1, 2] }
            [[plugins.transform]]
            name = "a"
            path = "/nonexistent/b.wasm"
            [routing]
            kinesis_max_record_bytes = 20000000
            kinesis_stream = "bad stream"
            [[routing.rules]]
            name = "r"
            topic = "a/#/b"
            destination = "kinesis"
            qos = 2
            "#,
        );
        let all = problems.join("\n");
        for expected in [
            "plugins.workers",
            "memory_limit_mib",
            "/nonexistent/a.wasm",
            "/nonexistent/b.wasm",
            "`a` is used twice",
            "config `list`",
            "kinesis_max_record_bytes",
            "`bad stream`",
            "topic filter",
            "qos must be 0 or 1",
            "need destination = \"iot-core\"",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(problems.len(), 11, "{all}");
    }

    /// `[auth.jwt]`: one readable source of keys, known algorithms, usable names; a
    /// grant's `${claims.` variable closed.
    #[test]
    fn identity_provider_settings_are_checked() {
        let problems = problems_of(
            r#"
            [auth.jwt]
            jwks_url = "ftp://idp/keys"
            jwks_file = "/nonexistent/jwks.json"
            issuer = ""
            algorithms = ["HS256"]
            refresh_secs = 1
            token_key_name = "a b"
            [[policy.grants]]
            name = "g"
            devices = ["*"]
            publish = ["sites/${claims.site/#"]
            "#,
        );
        let all = problems.join("\n");
        for expected in [
            "give jwks_url or jwks_file",
            "issuer must not be empty",
            "`HS256` is not one of RS256, ES256, EdDSA",
            "refresh_secs must be at least 10",
            "token_key_name `a b`",
            "without its closing",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "{\"keys\": 1}").unwrap();
        let problems = problems_of(&format!(
            "[auth.jwt]\njwks_file = \"{}\"\nissuer = \"i\"\n[[policy.grants]]\nname = \"g\"\ndevices = [\"*\"]\n",
            file.path().display()
        ));
        assert!(
            problems.join("\n").contains("not a JWKS document"),
            "{problems:?}"
        );
    }

    /// `[upstream]`'s command topics, reply topic and session expiry are checked; the
    /// `[downlink]` of earlier versions is refused with a pointer to `[upstream]`.
    #[test]
    fn upstream_commands_are_checked_and_downlink_points_to_upstream() {
        let problems = problems_of(
            r#"
            [downlink]
            host = "broker"
            [upstream]
            host = "broker"
            ca = "/nonexistent/ca.pem"
            cert = "/nonexistent/c.pem"
            key = "/nonexistent/k.pem"
            command_topics = ["cmd/${device.id}/#/x"]
            reply_topic = "replies/+"
            session_expiry_secs = 0
            "#,
        );
        let all = problems.join("\n");
        for expected in [
            "[downlink] is gone",
            "configure [upstream]",
            "upstream.command_topics: `cmd/${device.id}/#/x` is not a topic filter",
            "upstream.reply_topic: `replies/+`",
            "upstream.session_expiry_secs: 0",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }
}
