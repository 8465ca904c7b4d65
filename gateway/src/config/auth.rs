//! `[auth]` and `[policy]`: how devices prove who they are, and what each may do.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::Config;
use crate::topic::TopicFilter;

/// `[auth]`: how devices prove who they are. At least one method.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Client certificates (mutual TLS); needs `[server.tls]`.
    pub mtls: Option<MtlsConfig>,
    /// Short-lived signed tokens (JWT, HS256) in `Authorization: Bearer`.
    pub tokens: Option<TokensConfig>,
    /// JWTs from the operator's identity provider (RS256, ES256, EdDSA), verified with
    /// the keys of its JWKS.
    pub jwt: Option<JwtConfig>,
    /// Client certificates registered at AWS IoT (the account's registry, through the IoT
    /// control plane), whatever CA issued them; the device is the certificate's thing.
    pub registry: Option<RegistryConfig>,
}

/// `[auth.registry]`: the account's registered certificates, as IoT Core admits them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The IoT control plane's endpoint, overriding `aws.endpoint_url` (default: the
    /// SDK's for the region, `https://iot.<region>.amazonaws.com`).
    pub endpoint_url: Option<String>,
    /// How often the snapshot is refreshed, in seconds. Default 300.
    #[serde(default = "default_registry_refresh")]
    pub refresh_secs: u64,
    /// A snapshot older than this (no refresh succeeded meanwhile) makes the gateway
    /// not ready, in seconds. Default 3600.
    #[serde(default = "default_registry_max_age")]
    pub max_age_secs: u64,
}

fn default_registry_refresh() -> u64 {
    300
}

fn default_registry_max_age() -> u64 {
    3600
}

/// `[auth.jwt]`: tokens an identity provider issues, as IoT Core's custom authorizers
/// take them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Where the provider publishes its keys (a JWKS document), fetched at start, every
    /// `refresh_secs`, and when a token names a key id not seen yet.
    pub jwks_url: Option<String>,
    /// A JWKS document on disk instead (read at start and every `refresh_secs`).
    pub jwks_file: Option<PathBuf>,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// Accepted `aud` values (a token must name one); empty: `aud` is not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted signature algorithms, of `RS256`, `ES256`, `EdDSA` (the default: all).
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// The claim that holds the device id. Default `sub`.
    #[serde(default = "default_device_id_claim")]
    pub device_id_claim: String,
    /// The claim that holds the device's groups (a list of strings, or one string).
    pub groups_claim: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 60.
    #[serde(default = "default_jwt_leeway")]
    pub leeway_secs: u64,
    /// How often the keys are read again, in seconds. Default 300.
    #[serde(default = "default_jwks_refresh")]
    pub refresh_secs: u64,
    /// The name the token travels under besides `Authorization: Bearer` and the MQTT
    /// password (IoT Core's custom authorizer `tokenKeyName`): an HTTP header, a query
    /// parameter of the request's URL (the WebSocket URL), a query parameter of the MQTT
    /// user name (`user?x-amz-customauthorizer-name=…&token=…`). Default `token`.
    #[serde(default = "default_token_key_name")]
    pub token_key_name: String,
}

/// The algorithms `[auth.jwt]` can verify.
pub const JWT_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

fn default_jwt_algorithms() -> Vec<String> {
    JWT_ALGORITHMS.iter().map(|a| a.to_string()).collect()
}

fn default_device_id_claim() -> String {
    "sub".to_string()
}

fn default_jwt_leeway() -> u64 {
    60
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_token_key_name() -> String {
    "token".to_string()
}

/// Where a client certificate names its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceIdSource {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS name among the subject alternative names.
    SanDns,
    /// The first URI among the subject alternative names.
    SanUri,
    /// The first e-mail address among the subject alternative names.
    SanEmail,
}

/// `[auth.mtls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM bundles of the CAs that sign device certificates ("bring your own CA").
    pub ca: Vec<PathBuf>,
    /// Where the device id is read from. Default `cn`.
    #[serde(default)]
    pub device_id: DeviceIdSource,
    /// Serial numbers of revoked certificates, in hex (colons allowed).
    #[serde(default)]
    pub revoked_serials: Vec<String>,
    /// SHA-256 fingerprints (of the DER certificate) of revoked certificates, in hex.
    #[serde(default)]
    pub revoked_fingerprints: Vec<String>,
}

/// `[auth.tokens]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// The `iss` claim tokens carry and must carry. Default `sluice`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Longest lifetime `sluice token issue` grants, in seconds. Default 86400.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
    /// The key `sluice token issue` signs with. Default: the last one listed.
    pub signing_key: Option<String>,
    /// Keys, by id (`kid`); all of them are accepted, so keys rotate by adding the new
    /// one, signing with it, and removing the old one once its tokens expired.
    pub keys: Vec<TokenKeyConfig>,
}

/// `[[auth.tokens.keys]]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyConfig {
    /// The key id, carried in each token's header.
    pub id: String,
    /// The shared secret (HMAC-SHA256), at least 32 bytes.
    pub secret: String,
}

impl fmt::Debug for TokenKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeyConfig")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `[policy]`: grants; what no grant allows is denied.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Grants, in order; the first that allows a publish also sets its limits.
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
}

/// `[[policy.grants]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Name reported when the grant's limits refuse a message.
    pub name: String,
    /// Devices it applies to, by id; `*` for every device.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Groups it applies to (token `groups`, certificate OUs).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Topic filters the devices may publish to; `${device.id}` is the device's id,
    /// `${claims.NAME}` a claim of its `[auth.jwt]` token.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters the devices may receive commands on.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// The devices' thing name at IoT Core (its registry, `$aws/things/<name>/…`), as
    /// `${thing.name}` in this grant's filters and client ids; `${device.id}` is the
    /// device id. Default: the device id.
    pub thing_name: Option<String>,
    /// MQTT client ids the devices may connect as besides their device id:
    /// `${device.id}` is the device's id, a trailing `*` matches any rest
    /// (`["${device.id}-*"]`).
    #[serde(default)]
    pub client_ids: Vec<String>,
    /// Messages per second per device (bursts up to this many).
    pub max_messages_per_sec: Option<u32>,
    /// Payload bytes per second per device (bursts up to this many).
    pub max_bytes_per_sec: Option<u32>,
    /// Largest payload per message.
    pub max_payload_bytes: Option<usize>,
}

fn default_issuer() -> String {
    "sluice".to_string()
}

fn default_max_ttl() -> u64 {
    86_400
}

/// Hex digits (colons and spaces allowed between them) as bytes, as certificate serial
/// numbers and fingerprints are written in `[auth.mtls]`.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits: String = text.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
    if digits.is_empty() {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    hex::decode(padded).ok()
}

/// `[auth.jwt]`: one source of keys that can be read, known algorithms, sane periods.
fn validate_jwt(jwt: &JwtConfig, problems: &mut Vec<String>) {
    match (&jwt.jwks_url, &jwt.jwks_file) {
        (Some(_), Some(_)) | (None, None) => {
            problems.push("auth.jwt: give jwks_url or jwks_file (one of them)".to_string())
        }
        (Some(url), None) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                problems.push(format!("auth.jwt.jwks_url: `{url}` is not an http(s) URL"));
            }
        }
        (None, Some(file)) => {
            let read = std::fs::read(file).map_err(|error| error.to_string());
            let parsed = read.and_then(|bytes| {
                serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(&bytes)
                    .map_err(|error| format!("not a JWKS document: {error}"))
            });
            if let Err(why) = parsed {
                problems.push(format!("auth.jwt.jwks_file: {}: {why}", file.display()));
            }
        }
    }
    if jwt.issuer.is_empty() {
        problems.push("auth.jwt.issuer must not be empty".to_string());
    }
    if jwt.algorithms.is_empty() {
        problems.push("auth.jwt.algorithms must name at least one algorithm".to_string());
    }
    for algorithm in &jwt.algorithms {
        if !JWT_ALGORITHMS.contains(&algorithm.as_str()) {
            problems.push(format!(
                "auth.jwt.algorithms: `{algorithm}` is not one of {}",
                JWT_ALGORITHMS.join(", ")
            ));
        }
    }
    if jwt.device_id_claim.is_empty() {
        problems.push("auth.jwt.device_id_claim must not be empty".to_string());
    }
    if jwt.refresh_secs < 10 {
        problems.push("auth.jwt.refresh_secs must be at least 10".to_string());
    }
    if jwt.token_key_name.is_empty()
        || !jwt
            .token_key_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        problems.push(format!(
            "auth.jwt.token_key_name `{}` must be letters, digits, `-` and `_` (it is a header and a query parameter)",
            jwt.token_key_name
        ));
    }
}

impl Config {
    pub(super) fn validate_auth_and_policy(&self, problems: &mut Vec<String>) {
        if let Some(auth) = &self.auth {
            if auth.mtls.is_none()
                && auth.tokens.is_none()
                && auth.jwt.is_none()
                && auth.registry.is_none()
            {
                problems.push(
                    "[auth] needs at least one of [auth.mtls], [auth.registry], [auth.tokens], [auth.jwt]"
                        .to_string(),
                );
            }
            if let Some(registry) = &auth.registry {
                if self.server.tls.is_none() {
                    problems.push(
                        "auth.registry needs [server.tls]: client certificates come with TLS"
                            .to_string(),
                    );
                }
                if registry.refresh_secs < 10 {
                    problems.push("auth.registry.refresh_secs must be at least 10".to_string());
                }
                if registry.max_age_secs < registry.refresh_secs {
                    problems.push(
                        "auth.registry.max_age_secs must be at least refresh_secs".to_string(),
                    );
                }
            }
            if let Some(jwt) = &auth.jwt {
                validate_jwt(jwt, problems);
            }
            if let Some(mtls) = &auth.mtls {
                if self.server.tls.is_none() {
                    problems.push(
                        "auth.mtls needs [server.tls]: client certificates come with TLS"
                            .to_string(),
                    );
                }
                if mtls.ca.is_empty() {
                    problems.push("auth.mtls.ca must name at least one CA bundle".to_string());
                }
                for path in &mtls.ca {
                    if !path.is_file() {
                        problems.push(format!("auth.mtls.ca: {} does not exist", path.display()));
                    }
                }
                for (what, list) in [
                    ("revoked_serials", &mtls.revoked_serials),
                    ("revoked_fingerprints", &mtls.revoked_fingerprints),
                ] {
                    for value in list {
                        if parse_hex(value).is_none() {
                            problems.push(format!("auth.mtls.{what}: `{value}` is not hex"));
                        }
                    }
                }
            }
            if let Some(tokens) = &auth.tokens {
                if tokens.keys.is_empty() {
                    problems.push("auth.tokens.keys must list at least one key".to_string());
                }
                let mut ids = std::collections::BTreeSet::new();
                for key in &tokens.keys {
                    if !ids.insert(key.id.as_str()) {
                        problems.push(format!("auth.tokens.keys: id `{}` appears twice", key.id));
                    }
                    if key.secret.len() < 32 {
                        problems.push(format!(
                            "auth.tokens.keys: the secret of `{}` must be at least 32 bytes",
                            key.id
                        ));
                    }
                }
                if let Some(signing) = &tokens.signing_key
                    && !ids.contains(signing.as_str())
                {
                    problems.push(format!("auth.tokens.signing_key: no key `{signing}`"));
                }
                if tokens.max_ttl_secs == 0 {
                    problems.push("auth.tokens.max_ttl_secs must be at least 1".to_string());
                }
            }
            if self.policy.as_ref().is_none_or(|p| p.grants.is_empty()) {
                problems.push(
                    "[auth] is set but no [[policy.grants]]: every device would be denied everything"
                        .to_string(),
                );
            }
        }
        if let Some(policy) = &self.policy {
            let mut names = std::collections::BTreeSet::new();
            for grant in &policy.grants {
                let at = format!("policy.grants `{}`", grant.name);
                if !names.insert(grant.name.as_str()) {
                    problems.push(format!("{at}: the name appears twice"));
                }
                if grant.devices.is_empty() && grant.groups.is_empty() {
                    problems.push(format!("{at}: give `devices` or `groups`"));
                }
                for filter in grant.publish.iter().chain(&grant.subscribe) {
                    let Some(sample) = crate::template::with_claims(filter, |_| Some("claim"))
                    else {
                        problems.push(format!(
                            "{at}: filter `{filter}`: a `${{claims.` without its closing `}}`"
                        ));
                        continue;
                    };
                    let sample = crate::template::for_device(&sample, "device");
                    if let Err(why) = TopicFilter::parse(&sample) {
                        problems.push(format!("{at}: filter `{filter}`: {why}"));
                    }
                }
                for (what, value) in [
                    ("max_messages_per_sec", grant.max_messages_per_sec),
                    ("max_bytes_per_sec", grant.max_bytes_per_sec),
                ] {
                    if value == Some(0) {
                        problems.push(format!("{at}: {what} must be at least 1"));
                    }
                }
            }
        }
    }
}
