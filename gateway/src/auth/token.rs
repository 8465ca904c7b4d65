//! Bearer tokens: JWTs signed with HMAC-SHA256 (`jsonwebtoken`), the key chosen by the
//! `kid` in the token's header.
//!
//! Claims: `sub` (the device id), `iss` (the configured issuer), `iat`, `exp`, and
//! optional `groups`. `sluice token issue` mints them.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::auth::verified::Verified;
use crate::auth::{AuthError, Identity, Method, check_device_id};
use crate::config::TokensConfig;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    iat: u64,
    exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
}

/// The configured keys, ready to sign and verify.
pub struct TokenKeys {
    keys: HashMap<String, (EncodingKey, DecodingKey)>,
    signing: String,
    issuer: String,
    max_ttl: Duration,
    /// Verified tokens, kept until `exp` plus the leeway.
    verified: Verified,
}

impl TokenKeys {
    /// From `[auth.tokens]` (validated).
    pub fn new(config: &TokensConfig) -> TokenKeys {
        let keys = config
            .keys
            .iter()
            .map(|key| {
                let secret = key.secret.as_bytes();
                (
                    key.id.clone(),
                    (
                        EncodingKey::from_secret(secret),
                        DecodingKey::from_secret(secret),
                    ),
                )
            })
            .collect();
        let signing = config
            .signing_key
            .clone()
            .or_else(|| config.keys.last().map(|k| k.id.clone()))
            .unwrap_or_default();
        TokenKeys {
            keys,
            signing,
            issuer: config.issuer.clone(),
            max_ttl: Duration::from_secs(config.max_ttl_secs),
            verified: Verified::default(),
        }
    }

    /// Mints a token for `device` valid for `ttl` (at most `max_ttl_secs`), signed with
    /// `key_id` or the signing key.
    pub fn issue(
        &self,
        device: &str,
        groups: &[String],
        ttl: Duration,
        key_id: Option<&str>,
    ) -> anyhow::Result<String> {
        check_device_id(device).map_err(|why| anyhow::anyhow!("device id `{device}` {why}"))?;
        anyhow::ensure!(
            ttl <= self.max_ttl,
            "--ttl {} is over auth.tokens.max_ttl_secs ({} s)",
            humantime::format_duration(ttl),
            self.max_ttl.as_secs()
        );
        anyhow::ensure!(!ttl.is_zero(), "--ttl must be more than zero");
        let kid = key_id.unwrap_or(&self.signing);
        let (encoding, _) = self
            .keys
            .get(kid)
            .ok_or_else(|| anyhow::anyhow!("no key `{kid}` in auth.tokens.keys"))?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: device.to_string(),
            iss: self.issuer.clone(),
            iat: now,
            exp: now + ttl.as_secs(),
            groups: groups.to_vec(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_string());
        Ok(jsonwebtoken::encode(&header, &claims, encoding)?)
    }

    /// Checks a token and returns the device it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(identity) = self.verified.get(token, now) {
            return Ok(identity);
        }
        let (identity, exp) = self.verify_uncached(token)?;
        self.verified
            .put(token, &identity, exp.saturating_add(LEEWAY_SECS));
        Ok(identity)
    }

    /// Checks a token's signature and claims; returns the device and the token's `exp`.
    fn verify_uncached(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::TokenMalformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::TokenMalformed);
        }
        let kid = header.kid.ok_or(AuthError::TokenUnknownKey)?;
        let (_, decoding) = self.keys.get(&kid).ok_or(AuthError::TokenUnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, decoding, &validation).map_err(|error| {
                match error.kind() {
                    ErrorKind::ExpiredSignature => AuthError::TokenExpired,
                    ErrorKind::ImmatureSignature => AuthError::TokenNotYetValid,
                    ErrorKind::InvalidSignature => AuthError::TokenBadSignature,
                    ErrorKind::InvalidIssuer => AuthError::TokenWrongIssuer,
                    _ => AuthError::TokenMalformed,
                }
            })?;
        let claims = data.claims;
        check_device_id(&claims.sub)
            .map_err(|why| AuthError::BadDeviceId(format!("`sub` {why}")))?;
        Ok((
            Identity {
                device_id: claims.sub,
                groups: claims.groups,
                method: Method::Token,
                expires_at_secs: Some(claims.exp.saturating_add(LEEWAY_SECS)),
                certificate: None,
                claims: Vec::new(),
            },
            claims.exp,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenKeyConfig;

    fn keys(ids: &[&str]) -> TokenKeys {
        TokenKeys::new(&TokensConfig {
            issuer: "sluice".to_string(),
            max_ttl_secs: 3600,
            signing_key: None,
            keys: ids
                .iter()
                .map(|id| TokenKeyConfig {
                    id: id.to_string(),
                    secret: format!("{id}-secret-0123456789abcdef0123456789"),
                })
                .collect(),
        })
    }

    #[test]
    fn a_token_names_its_device_and_groups() {
        let keys = keys(&["k1"]);
        let token = keys
            .issue(
                "dev-1",
                &["sensors".to_string()],
                Duration::from_secs(60),
                None,
            )
            .unwrap();
        let identity = keys.verify(&token).unwrap();
        assert_eq!(identity.device_id, "dev-1");
        assert_eq!(identity.groups, ["sensors"]);
        assert_eq!(identity.method, Method::Token);
    }

    #[test]
    fn a_verified_token_is_refused_from_the_cache_once_it_expires() {
        let keys = keys(&["k1"]);
        // Expired a moment ago, but within the leeway: valid for about one more second.
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: "dev-1".to_string(),
            iss: "sluice".to_string(),
            iat: now - 60,
            exp: now + 1 - LEEWAY_SECS,
            groups: Vec::new(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".to_string());
        let token = jsonwebtoken::encode(&header, &claims, &keys.keys["k1"].0).unwrap();
        assert_eq!(keys.verify(&token).unwrap().device_id, "dev-1");
        assert_eq!(
            keys.verify(&token).unwrap().device_id,
            "dev-1",
            "from the cache"
        );
        assert_eq!(keys.verified.count(), 1);
        // Real time has to pass: the check compares with the wall clock.
        std::thread::sleep(Duration::from_millis(2_100));
        assert_eq!(keys.verify(&token), Err(AuthError::TokenExpired));
        assert_eq!(keys.verified.count(), 0);
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_their_key_is_removed() {
        let old = keys(&["k1"]);
        let token = old
            .issue("dev-1", &[], Duration::from_secs(60), None)
            .unwrap();
        let both = keys(&["k1", "k2"]);
        assert!(both.verify(&token).is_ok(), "the old key still verifies");
        let new_token = both
            .issue("dev-1", &[], Duration::from_secs(60), None)
            .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&new_token)
                .unwrap()
                .kid
                .as_deref(),
            Some("k2"),
            "new tokens are signed with the newest key"
        );
        let only_new = keys(&["k2"]);
        assert_eq!(only_new.verify(&token), Err(AuthError::TokenUnknownKey));
        assert!(only_new.verify(&new_token).is_ok());
    }

    #[test]
    fn tampered_foreign_and_malformed_tokens_are_refused_each_with_its_code() {
        let keys = keys(&["k1"]);
        let token = keys
            .issue("dev-1", &[], Duration::from_secs(60), None)
            .unwrap();
        // Change the claims, keep the signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = String::from_utf8(engine.decode(&parts[1]).unwrap()).unwrap();
        parts[1] = engine.encode(claims.replace("dev-1", "dev-2"));
        assert_eq!(
            keys.verify(&parts.join(".")),
            Err(AuthError::TokenBadSignature)
        );
        assert_eq!(keys.verify("not a token"), Err(AuthError::TokenMalformed));
        assert!(
            keys.issue("dev-1", &[], Duration::from_secs(7200), None)
                .is_err(),
            "over max_ttl"
        );
        assert!(
            keys.issue("a/b", &[], Duration::from_secs(60), None)
                .is_err()
        );
    }
}
