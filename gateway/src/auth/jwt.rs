//! Tokens from the operator's identity provider (`[auth.jwt]`): JWTs signed with RS256,
//! ES256 or EdDSA, verified (`jsonwebtoken`) with the public keys the provider publishes
//! as a JWKS document, at a URL or in a file.
//!
//! A token is accepted when its algorithm is one configured, its key (by `kid`; without a
//! `kid`, the only key of its algorithm) is in the key set, its signature matches, and its
//! `iss`, `aud`, `exp` and `nbf` hold (with `leeway_secs` of clock skew). The device id
//! is the `device_id_claim`, the groups the `groups_claim`; every claim with a string or
//! number value is kept for the policy's `${claims.NAME}`.
//!
//! The keys are read by a thread of their own: at start (a file before the first
//! connection, a URL as soon as it answers), every `refresh_secs`, and when a token names
//! a key id the set does not have (a provider that rotated its keys; at most once every
//! [`MIN_REFETCH`]). Until the first read succeeds, tokens are refused with
//! `token_keys_unavailable` and the gateway is not ready; a failed refresh keeps the last
//! keys read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::auth::verified::Verified;
use crate::auth::{AuthError, Identity, Method, check_device_id};
use crate::config::JwtConfig;

/// The shortest time between two reads of the keys asked for by unknown key ids, so that
/// tokens naming made-up keys cannot make the gateway hammer the provider.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);

/// How long one read of a JWKS URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The key set last read from each source, so that a verifier built again for the same
/// provider (a configuration reload that changed `[auth]`) starts with its keys rather
/// than none: its tokens would be refused until the first read, or for good while the
/// provider is unreachable.
static LAST_READ: Mutex<Vec<(String, Arc<KeySet>)>> = Mutex::new(Vec::new());

/// The set last read from `source`, if any.
fn last_read(source: &Source) -> Option<Arc<KeySet>> {
    let last = LAST_READ.lock().unwrap_or_else(|p| p.into_inner());
    let name = source.describe();
    last.iter()
        .find(|(read_from, _)| *read_from == name)
        .map(|(_, set)| set.clone())
}

/// The keys of one JWKS document, ready to verify.
#[derive(Default)]
struct KeySet {
    by_id: HashMap<String, (DecodingKey, Algorithm)>,
    /// Keys without a `kid`.
    unnamed: Vec<(DecodingKey, Algorithm)>,
}

impl KeySet {
    /// The usable signature keys of `set` (others are left out: encryption keys,
    /// algorithms this gateway does not verify).
    fn new(set: &JwkSet) -> KeySet {
        let mut keys = KeySet::default();
        for jwk in &set.keys {
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                continue;
            }
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
                (Some(_), _) => continue,
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(ec))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (None, AlgorithmParameters::OctetKeyPair(okp))
                    if okp.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                (None, _) => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(id) => {
                    keys.by_id.insert(id.clone(), (key, algorithm));
                }
                None => keys.unnamed.push((key, algorithm)),
            }
        }
        keys
    }

    fn len(&self) -> usize {
        self.by_id.len() + self.unnamed.len()
    }

    /// The key `kid` names, or without one the only key of `algorithm`.
    fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Option<&(DecodingKey, Algorithm)> {
        match kid {
            Some(kid) => self.by_id.get(kid),
            None => {
                let mut fitting = self
                    .by_id
                    .values()
                    .chain(&self.unnamed)
                    .filter(|(_, a)| *a == algorithm);
                let only = fitting.next();
                fitting.next().is_none().then_some(only).flatten()
            }
        }
    }
}

/// Where the keys come from.
#[derive(Debug, Clone)]
enum Source {
    Url(String),
    File(PathBuf),
}

impl Source {
    fn read(&self, http: &mut Option<reqwest::blocking::Client>) -> Result<JwkSet, String> {
        let bytes = match self {
            Source::File(path) => std::fs::read(path).map_err(|e| e.to_string())?,
            Source::Url(url) => {
                let client = match http {
                    Some(client) => client,
                    None => http.insert(
                        reqwest::blocking::Client::builder()
                            .timeout(FETCH_TIMEOUT)
                            .build()
                            .map_err(|e| e.to_string())?,
                    ),
                };
                let response = client.get(url).send().map_err(|e| e.to_string())?;
                let status = response.status();
                if !status.is_success() {
                    return Err(format!("HTTP {status}"));
                }
                response.bytes().map_err(|e| e.to_string())?.to_vec()
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| format!("not a JWKS document: {e}"))
    }

    fn describe(&self) -> String {
        match self {
            Source::Url(url) => url.clone(),
            Source::File(path) => path.display().to_string(),
        }
    }
}

/// The key set now, and how its last read went; shared with the thread that reads it.
struct Keys {
    source: Source,
    set: ArcSwapOption<KeySet>,
    /// The last read's error, `None` when it succeeded.
    error: Mutex<Option<String>>,
}

impl Keys {
    /// Reads the keys again; a failure keeps the ones read before.
    fn load(&self, http: &mut Option<reqwest::blocking::Client>) {
        let outcome = self.source.read(http).map(|set| KeySet::new(&set));
        let mut error = self.error.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(set) => {
                let name = self.source.describe();
                tracing::info!(source = %name, keys = set.len(), "JWKS read");
                let set = Arc::new(set);
                self.set.store(Some(set.clone()));
                *error = None;
                let mut last = LAST_READ.lock().unwrap_or_else(|p| p.into_inner());
                last.retain(|(read_from, _)| *read_from != name);
                last.push((name, set));
            }
            Err(why) => {
                tracing::warn!(source = %self.source.describe(), error = %why, "cannot read the JWKS");
                *error = Some(why);
            }
        }
    }
}

/// Reads `keys` every `every` (the first time after `first_wait`), and when kicked (but
/// never twice within [`MIN_REFETCH`]), until the verifier that owns them is gone.
fn keep_fresh(keys: Weak<Keys>, every: Duration, kicks: Receiver<()>, first_wait: Duration) {
    let mut http = None;
    let mut wait = first_wait;
    let mut last_read: Option<Instant> = None;
    loop {
        if let Err(RecvTimeoutError::Disconnected) = kicks.recv_timeout(wait) {
            return;
        }
        if let Some(last) = last_read {
            std::thread::sleep(MIN_REFETCH.saturating_sub(last.elapsed()));
        }
        let Some(keys) = keys.upgrade() else { return };
        keys.load(&mut http);
        drop(keys);
        // Kicks that came meanwhile are answered by this read.
        while kicks.try_recv().is_ok() {}
        last_read = Some(Instant::now());
        wait = every;
    }
}

/// The identity provider's tokens.
pub struct ProviderTokens {
    keys: Arc<Keys>,
    /// Asks the reading thread for a read now (a key id not in the set).
    kick: SyncSender<()>,
    algorithms: Vec<Algorithm>,
    issuer: String,
    audience: Vec<String>,
    device_id_claim: String,
    groups_claim: Option<String>,
    leeway: u64,
    verified: Verified,
}

impl ProviderTokens {
    /// From `[auth.jwt]` (validated): a JWKS file is read now, a URL by the thread this
    /// starts, which keeps both fresh.
    pub fn new(config: &JwtConfig) -> ProviderTokens {
        let source = match (&config.jwks_url, &config.jwks_file) {
            (Some(url), _) => Source::Url(url.clone()),
            (None, file) => Source::File(file.clone().unwrap_or_default()),
        };
        let before = last_read(&source);
        let keys = Arc::new(Keys {
            error: Mutex::new(before.is_none().then(|| "not read yet".to_string())),
            set: ArcSwapOption::new(before),
            source,
        });
        let every = Duration::from_secs(config.refresh_secs);
        let first_wait = match keys.source {
            Source::File(_) => {
                keys.load(&mut None);
                every
            }
            Source::Url(_) => Duration::ZERO,
        };
        let (kick, kicks) = std::sync::mpsc::sync_channel(1);
        let weak = Arc::downgrade(&keys);
        let spawned = std::thread::Builder::new()
            .name("sluice-jwks".to_string())
            .spawn(move || keep_fresh(weak, every, kicks, first_wait));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the thread that reads the JWKS");
        }
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        ProviderTokens {
            keys,
            kick,
            algorithms,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            device_id_claim: config.device_id_claim.clone(),
            groups_claim: config.groups_claim.clone(),
            leeway: config.leeway_secs,
            verified: Verified::default(),
        }
    }

    /// Why tokens cannot be verified now: the keys were never read.
    pub fn not_ready(&self) -> Option<String> {
        if self.keys.set.load().is_some() {
            return None;
        }
        let error = self.keys.error.lock().unwrap_or_else(|p| p.into_inner());
        Some(format!(
            "auth.jwt: the identity provider's keys could not be read from {}: {}",
            self.keys.source.describe(),
            error.as_deref().unwrap_or("not read yet")
        ))
    }

    /// Checks `token` and returns the device it names; `None` when it is not this
    /// verifier's kind: its header unreadable, or signed with an algorithm not accepted
    /// (the gateway's own HS256 tokens). A token verified lately is answered from the
    /// cache, its header not read again.
    pub fn verify(&self, token: &str) -> Option<Result<Identity, AuthError>> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(identity) = self.verified.get(token, now) {
            return Some(Ok(identity));
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !self.algorithms.contains(&header.alg) {
            return None;
        }
        Some(
            self.verify_uncached(token, header)
                .map(|(identity, until)| {
                    self.verified.put(token, &identity, until);
                    identity
                }),
        )
    }

    /// Asks for a read of the keys (answered by the reading thread, at most once per
    /// [`MIN_REFETCH`]).
    fn refetch(&self) {
        match self.kick.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    /// The identity in `token` and the second it stops being valid.
    fn verify_uncached(
        &self,
        token: &str,
        header: jsonwebtoken::Header,
    ) -> Result<(Identity, u64), AuthError> {
        let Some(set) = self.keys.set.load_full() else {
            self.refetch();
            return Err(AuthError::TokenKeysUnavailable);
        };
        let Some((key, algorithm)) = set.find(header.kid.as_deref(), header.alg) else {
            if header.kid.is_some() {
                self.refetch();
            }
            return Err(AuthError::TokenUnknownKey);
        };
        if *algorithm != header.alg {
            return Err(AuthError::TokenUnknownKey);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        let mut required = vec!["exp", "iss", self.device_id_claim.as_str()];
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let claims =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation)
                .map_err(|error| match error.kind() {
                    ErrorKind::ExpiredSignature => AuthError::TokenExpired,
                    ErrorKind::ImmatureSignature => AuthError::TokenNotYetValid,
                    ErrorKind::InvalidSignature => AuthError::TokenBadSignature,
                    ErrorKind::InvalidIssuer => AuthError::TokenWrongIssuer,
                    ErrorKind::InvalidAudience => AuthError::TokenWrongAudience,
                    ErrorKind::MissingRequiredClaim(claim) => {
                        AuthError::TokenMissingClaim(claim.clone())
                    }
                    _ => AuthError::TokenMalformed,
                })?
                .claims;
        let device_id = match claims.get(&self.device_id_claim) {
            Some(Value::String(id)) => id.clone(),
            _ => return Err(AuthError::TokenMissingClaim(self.device_id_claim.clone())),
        };
        check_device_id(&device_id).map_err(|why| {
            AuthError::BadDeviceId(format!("the claim `{}` {why}", self.device_id_claim))
        })?;
        let groups = match self.groups_claim.as_ref().and_then(|name| claims.get(name)) {
            Some(Value::String(group)) => vec![group.clone()],
            Some(Value::Array(groups)) => groups
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let until = exp.saturating_add(self.leeway);
        let kept = claims
            .into_iter()
            .filter_map(|(name, value)| match value {
                Value::String(text) => Some((name, text)),
                Value::Number(number) => Some((name, number.to_string())),
                _ => None,
            })
            .collect();
        Ok((
            Identity {
                device_id,
                groups,
                method: Method::Token,
                expires_at_secs: Some(until),
                certificate: None,
                claims: kept,
            },
            until,
        ))
    }
}
